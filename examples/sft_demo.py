"""SFT with TRL, stock and with chronipatch, on a synthetic addition task; offline, CPU by default.

    python examples/sft_demo.py [--steps N] [--packing] [--lora] [--device cpu|cuda] [--model PATH]
                                [--out demo_out/loss.png]

Both runs start from the same weights and see the same batches in the same order. The patched run calls
``chronipatch.apply(model)`` before the trainer is built and ``chronipatch.trl.integrate(trainer)`` after. The
script prints the patch report, supervised tokens/s and final loss of each run, writes both loss curves to
``--out`` and ends with greedy answers of the patched model to held-out sums.

Nothing is downloaded: the model is a random-init Qwen2 from a config (or a local ``--model`` directory), the
tokenizer is built in memory (``tokenizer.py``) and the data is generated from a seeded RNG.

On CPU chronipatch runs the torch reference of its ops, so the demo shows equal loss curves rather than a
speed-up (none is printed there; the CPU default, 800 steps twice, takes about a minute on two cores,
``--steps 200`` under half that); with ``--packing`` the patched run is the slower one there, since its
varlen attention falls back to a reference attention with an explicit mask off CUDA. ``--device cuda``
trains a larger model in bf16.

The two runs round differently (other summation orders, as any two kernels of the same math), and this small
task trains chaotically: after a few hundred steps a loss drop may come in one run and later or not at all in
the other, as it does between two stock runs whose weights differ by 1e-6. The script says over how many
steps the curves agree. With ``--lora`` the patched run also takes LoRA+'s optimizer groups (``integrate``'s
default), so its curve differs from plain LoRA's by design.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # set before transformers/datasets read it: never touch the network
os.environ["HF_DATASETS_OFFLINE"] = "1"

import datasets
import torch
import transformers
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import SFTConfig, SFTTrainer

import chronipatch
import chronipatch.trl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenizer import build_tokenizer

# Per device: (hidden size, layers, steps) of the random-init Qwen2 and the run length.
DEFAULTS = {"cpu": (128, 3, 800), "cuda": (512, 8, 3000)}
MAX_LENGTH = 128
# A 2-digit example is 30 tokens, so a packed row of MAX_LENGTH holds 4: with --packing a step sees 4x the
# sums, and the default run is 4x shorter.
SUMS_PER_PACKED_ROW = 4
# transformers 5.23 renamed `gradient_checkpointing` (and warns on the old name); older 5.x has only that one.
CHECKPOINTING = next(
    k for k in ("activation_checkpointing", "gradient_checkpointing") if k in SFTConfig.__dataclass_fields__
)


def addition_example(rng: random.Random, digits: int) -> tuple[str, str]:
    """Zero-padded to a fixed width, which lines the digits up by position: "07+60=" -> "067"."""
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    return f"{a:0{digits}d}+{b:0{digits}d}=", f"{a + b:0{digits + 1}d}"


def make_dataset(n: int, seed: int, digits: int) -> datasets.Dataset:
    """``n`` conversational prompt-completion rows, so TRL masks the prompt (completion-only loss)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, a = addition_example(rng, digits)
        rows.append(
            {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
        )
    return datasets.Dataset.from_list(rows)


def build_model(args: argparse.Namespace, tok) -> transformers.PreTrainedModel:
    """Same call, same weights: random init is seeded, a ``--model`` is read from disk."""
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.model, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
        )
        if model.get_input_embeddings().num_embeddings < len(tok):
            model.resize_token_embeddings(len(tok))
        return model
    cfg = transformers.Qwen2Config(
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 32,
        num_key_value_heads=max(1, args.hidden // 64),
        vocab_size=len(tok),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def load_tokenizer(args: argparse.Namespace):
    if args.model and (Path(args.model) / "tokenizer_config.json").exists():
        tok = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        if tok.chat_template is None:
            tok.chat_template = build_tokenizer().chat_template
        return tok
    return build_tokenizer()


class CountSupervised:
    """Collator wrapper recording, per batch, the label positions the loss is taken over (labels[:, 1:])."""

    def __init__(self, collator):
        self.collator, self.counts = collator, []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.counts.append(int((batch["labels"][..., 1:] != -100).sum()))
        return batch


class Progress(TrainerCallback):
    """Step end times, and a short loss line every ``every`` steps instead of Trainer's full per-step dict."""

    def __init__(self, name: str, every: int):
        self.name, self.every, self.step_ends = name, every, []

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        step = state.global_step
        if logs and "loss" in logs and (step % self.every == 0 or step == state.max_steps or step == 1):
            print(f"  [{self.name}] step {step:4d}  loss {logs['loss']:.4f}", flush=True)


@dataclass
class Run:
    name: str
    losses: list[float]
    seconds: float
    supervised_tokens: int
    report: str | None = None
    model: torch.nn.Module | None = None
    fused_loss_calls: int = 0  # steps whose loss chronipatch's linear_cross_entropy computed

    @property
    def tokens_per_s(self) -> float:
        return self.supervised_tokens / self.seconds


def sft_config(args: argparse.Namespace, out_dir: str) -> SFTConfig:
    cuda = args.device == "cuda"
    return SFTConfig(
        output_dir=out_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(20, args.steps // 10),
        max_length=MAX_LENGTH,
        packing=args.packing,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        use_cpu=not cuda,
        bf16=cuda,
        disable_tqdm=True,
        # TRL's default is on; the CPU model is tiny, so recomputing activations there would only cost time.
        **{CHECKPOINTING: cuda},
    )


def train(args: argparse.Namespace, tok, data: datasets.Dataset, patched: bool) -> Run:
    name = "chronipatch" if patched else "stock"
    print(f"\n== {name} run", flush=True)
    model = build_model(args, tok)
    report = None
    if patched:
        report = str(chronipatch.apply(model))  # before the trainer: TRL wraps the forward that apply() swaps
        print(report)
    peft_config = None
    if args.lora:
        import peft

        peft_config = peft.LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = SFTTrainer(
            model=model,
            args=sft_config(args, out_dir),
            train_dataset=data,
            processing_class=tok,
            peft_config=peft_config,
        )
        callback = None
        if patched:
            callback = chronipatch.trl.integrate(trainer, loraplus_ratio=16.0, packing=args.packing)
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        progress = Progress(name, max(1, args.steps // 10))
        trainer.add_callback(progress)
        counter = CountSupervised(trainer.data_collator)
        trainer.data_collator = counter
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # The dataloader may collate a batch ahead of the step that uses it: count only the batches trained on.
    accum = trainer.args.gradient_accumulation_steps
    counts = counter.counts[: trainer.state.global_step * accum]
    ends = progress.step_ends
    if len(ends) > 1:
        # Time from the end of step 1: the first step pays one-time costs (lazy imports, allocator growth)
        # that would otherwise favour whichever run goes second.
        seconds, counts = ends[-1] - ends[0], counts[accum:]
    calls = callback.counter["calls"] if callback is not None else 0
    return Run(name, losses, seconds, sum(counts), report, trainer.model, calls)


def plot(runs: list[Run], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: {path} not written (pip install matplotlib)")
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for run, style in zip(runs, ("-", "--")):
        label = f"{run.name} ({run.tokens_per_s:,.0f} supervised tok/s)"
        ax.plot(range(1, len(run.losses) + 1), run.losses, style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 0.2, not 2 x 10^-1
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title("TRL SFTTrainer: stock vs chronipatch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


@torch.no_grad()
def generate(model: torch.nn.Module, tok, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy answers, one prompt at a time (no padding to get right)."""
    model.eval()
    device = next(model.parameters()).device
    stop = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", tok.eos_token) if t in tok.get_vocab()]
    ids = dict(eos_token_id=stop, pad_token_id=tok.pad_token_id)
    answers = []
    for q in prompts:
        user = [{"role": "user", "content": q}]
        enc = tok.apply_chat_template(user, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        n = enc["input_ids"].shape[1]
        out = model.generate(**enc.to(device), max_new_tokens=max_new_tokens, do_sample=False, **ids)
        answers.append(tok.decode(out[0, n:], skip_special_tokens=True).strip())
    return answers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, help="steps per run (default 800, CUDA 3000; 1/4 with packing)")
    p.add_argument("--hidden", type=int, help="hidden size of the random-init model (default: 128, CUDA 512)")
    p.add_argument("--layers", type=int, help="layers of the random-init model (default: 3, CUDA 8)")
    p.add_argument("--digits", type=int, default=2, help="digits per operand")
    p.add_argument("--packing", action="store_true", help="TRL packing (BFD, padding-free rows)")
    p.add_argument(
        "--lora",
        action="store_true",
        help="LoRA adapter (r=16, all linear layers; LoRA+ when patched)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", help="local model directory to fine-tune instead of the random-init Qwen2")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=6, help="held-out sums answered greedily at the end")
    p.add_argument("--out", default="demo_out/loss.png", help="PNG of both loss curves")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    for key, default in zip(("hidden", "layers", "steps"), DEFAULTS[args.device]):
        if getattr(args, key) is None:
            setattr(args, key, default // SUMS_PER_PACKED_ROW if key == "steps" and args.packing else default)
    if args.hidden % 64:
        p.error("--hidden must be a multiple of 64 (heads of 32, two query heads per key/value head)")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns both runs and the generations (for tests)."""
    args = parse_args(argv)
    # Logits of tokens the task never uses sink towards -inf; their tiny gradients and Adam moments then
    # become fp32 denormals, which made CPU steps several times slower after a few hundred steps.
    torch.set_flush_denormal(True)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    tok = load_tokenizer(args)
    per_step = args.batch_size * (SUMS_PER_PACKED_ROW if args.packing else 1)
    data = make_dataset(args.steps * per_step, args.seed, args.digits)  # about one epoch: no sum seen twice
    example = data[0]["prompt"][0]["content"] + data[0]["completion"][0]["content"]
    print(
        f"task: {args.digits}-digit addition ({len(data)} sums, e.g. {example}); {args.device}, "
        f"{args.steps} steps of {args.batch_size}"
        + (f", model {args.model}" if args.model else f", model hidden {args.hidden} x {args.layers} layers")
        + (", packing" if args.packing else "")
        + (", LoRA r=16" if args.lora else "")
    )
    runs = [train(args, tok, data, patched=False), train(args, tok, data, patched=True)]

    print("\n== results")
    for run in runs:
        print(
            f"{run.name:>12}: {run.tokens_per_s:10,.0f} supervised tok/s ({run.supervised_tokens} tokens in "
            f"{run.seconds:.1f} s after step 1), loss {run.losses[0]:.3f} -> {run.losses[-1]:.3f}"
        )
    stock, ours = runs
    if args.device == "cuda":
        print(f"{'speed-up':>12}: {ours.tokens_per_s / stock.tokens_per_s:.2f}x")
    else:
        print(
            f"{'speed-up':>12}: not measured (on CPU the ops run their torch reference; kernels are CUDA's)"
        )
    agree = next(
        (i for i, (a, b) in enumerate(zip(stock.losses, ours.losses)) if abs(a - b) > 1e-3 * abs(a)),
        len(stock.losses),
    )
    print(
        f"{'curves':>12}: within 0.1% of each other for the first {agree} of {len(stock.losses)} steps"
        + (" (with LoRA+ in the patched run)" if args.lora else "")
        + ("" if agree == len(stock.losses) else "; then rounding and this task's chaotic training part them")
    )
    out = Path(args.out)
    wrote = plot(runs, out)
    if wrote:
        print(f"loss curves: {out}")

    seen = {row[0]["content"] for row in data["prompt"]}
    rng = random.Random(args.seed + 1)
    held_out = []
    while len(held_out) < args.samples:  # sums the model was not trained on
        q, a = addition_example(rng, args.digits)
        if q not in seen:
            held_out.append((q, a))
    answers = generate(ours.model, tok, [q for q, _ in held_out])
    print("\n== greedy answers of the patched model (held-out sums)")
    for (q, want), got in zip(held_out, answers):
        print(f"  {q}{got:<8} expected {want:<6} {'ok' if got == want else 'x'}")
    return {"runs": runs, "samples": list(zip(held_out, answers)), "png": out if wrote else None}


if __name__ == "__main__":
    main()
