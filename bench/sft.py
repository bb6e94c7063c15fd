"""TRL SFTTrainer benchmark: the same script stock, with TRL packing, with Liger, and with chronipatch.

Random-init Qwen2.5-0.5B (``models.causal_lm``, SDPA attention) in bf16, the dtype a user's
``from_pretrained(..., dtype="auto")`` gives for the published checkpoint; TRL 1.16 defaults (bf16
autocast, gradient checkpointing, AdamW at 2e-5, TRL's fused lm-head loss), batch 8, ``max_length`` 2048,
30 steps.
The data are seeded synthetic documents of random token ids with log-normal lengths (median 400 tokens),
each split into a prompt (10-50 %, not supervised) and a completion (``completion_only_loss=True``).
Every variant runs in its own subprocess (Liger patches transformers module functions process-wide); one
that fails records its error and the rest go on.

    python bench/sft.py [--variants all] [--steps 30] [--batch 8] [--max-length 2048] [--warmup 3]
                        [--out bench/out] [--smoke]

``--smoke`` runs a tiny config on CPU in fp32: 2 steps, ``max_length`` 128.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # random-init model, in-memory tokenizer, generated data: nothing to fetch
os.environ["HF_DATASETS_OFFLINE"] = "1"

import torch

from common import (
    emit_result,
    env_info,
    markdown_table,
    profile_sections,
    run_worker,
    short_error,
    summarize_profile,
    write_results,
)
from models import SMOKE_CONFIG, causal_lm

MODEL = "qwen2.5-0.5b"
# variant -> (chronipatch, TRL packing, Liger via use_liger_kernel, LoRA, SFTConfig(torch_compile=True))
VARIANTS = {
    "stock": (False, False, False, False, False),
    "stock_packing": (False, True, False, False, False),
    "stock_packing_compile": (False, True, False, False, True),
    "liger": (False, False, True, False, False),
    "chronipatch": (True, False, False, False, False),
    "chronipatch_packing": (True, True, False, False, False),
    "chronipatch_packing_compile": (True, True, False, False, True),
    "lora_stock": (False, False, False, True, False),
    "lora_chronipatch": (True, False, False, True, False),
    "lora_chronipatch_packing": (True, True, False, True, False),
}
MEDIAN_TOKENS, SIGMA = 400, 0.75
PROFILE_STEPS = 2
LORA = dict(r=32, lora_alpha=64, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
COLUMNS = (
    "variant",
    "supervised tok/s",
    "× stock",
    "peak GiB",
    "first loss",
    "final loss",
    "timed s",
    "train s",
    "patched",
    "error",
)
NOTES = [
    "one SFTTrainer script; variants differ only in SFTConfig(packing=…, use_liger_kernel=…), peft_config="
    "LoraConfig(r=32, alpha=64, all-linear) and the two chronipatch lines (apply(model) before the trainer,"
    " chronipatch.trl.integrate(trainer, packing=…) after it)",
    "TRL defaults otherwise: bf16 weights (random init, then .to(bfloat16)) + bf16=True, gradient"
    " checkpointing, AdamW lr 2e-5, linear schedule, TRL's fused lm-head loss; SDPA attention;"
    " logging_steps=1 (a host sync every step, all"
    " variants)",
    "supervised tok/s = completion tokens the loss was taken over (labels[:, 1:] != -100) in the timed steps"
    " / their wall time; the timed steps are those after the first --warmup steps",
    "train s: wall time of trainer.train() (warm-up, Liger/kernel first calls and dataloader start included)",
    "peak GiB: torch.cuda.max_memory_allocated during trainer.train() (weights and data on the GPU before it"
    " included)",
    "stock_packing: TRL's BFD packing is padding-free (one flattened row per batch, no attention mask); stock"
    " SDPA then builds a block-causal mask over the whole flattened row; chronipatch_packing runs it through"
    " the varlen attention instead",
    "liger: use_liger_kernel=True, which TRL 1.16 deprecates and restricts to Liger's layer kernels"
    " (fused_linear_cross_entropy forced off, TRL keeps its own fused lm-head loss)",
    "*_compile: SFTConfig(torch_compile=True), the Trainer's own torch.compile of the model (Inductor's"
    " first compiles fall in the warm-up steps and in train s)",
    "lora_chronipatch*: integrate() also installs LoRA+ groups (lora_B at 16x lr), so its loss curve differs;"
    " lora_chronipatch_packing adds SFTConfig(packing=True), run through the varlen attention",
]


# ----------------------------------------------------------------------------------------- data


def documents(n: int, max_length: int, vocab: int, seed: int) -> dict[str, list[list[int]]]:
    """``n`` documents of random ids: log-normal lengths, median scaled to ``max_length`` (400 at 2048)."""
    g = torch.Generator().manual_seed(seed)
    median = MEDIAN_TOKENS * max_length / 2048
    lengths = torch.exp(math.log(median) + SIGMA * torch.randn(n, generator=g))
    lengths = lengths.round().clamp(8, max_length).long().tolist()
    prompt_frac = (0.1 + 0.4 * torch.rand(n, generator=g)).tolist()
    ids, masks = [], []
    for length, frac in zip(lengths, prompt_frac):
        # ids >= 8 keep clear of the tokenizer's special tokens (pad is 0), so no document holds a pad id.
        ids.append(torch.randint(8, vocab, (length,), generator=g).tolist())
        n_prompt = max(1, round(frac * length))
        masks.append([0] * n_prompt + [1] * (length - n_prompt))
    return {"input_ids": ids, "completion_mask": masks}


# ----------------------------------------------------------------------------------------- worker


def run_variant(args: argparse.Namespace) -> dict:
    import datasets
    import transformers
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from tokenizer import build_tokenizer

    patched, packing, liger, lora, compiled = VARIANTS[args.variant]
    datasets.disable_progress_bars()
    cuda = not args.smoke
    torch.manual_seed(args.seed)  # same initial weights in every variant
    model = causal_lm(MODEL, attn_implementation="sdpa", **(SMOKE_CONFIG if args.smoke else {}))
    if cuda:
        model = model.to(torch.bfloat16)
    row: dict = {}
    if patched:
        import chronipatch

        report = chronipatch.apply(model)
        print(report, file=sys.stderr, flush=True)
        row["patched"] = ", ".join(f"{op} x{n}" for op, n in sorted(report.ops().items()))

    # Enough documents that packed variants (about 4 documents per packed row) also see new data every step.
    n_docs = args.steps * args.batch * round(2048 / MEDIAN_TOKENS)
    docs = documents(n_docs, args.max_length, model.config.vocab_size, args.seed + 1)
    data = datasets.Dataset.from_dict(docs)
    peft_config = None
    if lora:
        import peft

        peft_config = peft.LoraConfig(**LORA)
    cfg = dict(
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
        packing=packing,
        completion_only_loss=True,  # pre-tokenized data: TRL folds completion_mask into the labels only then
        use_liger_kernel=liger,
        torch_compile=compiled,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if args.smoke:
        cfg.update(use_cpu=True, bf16=False)

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, a, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    class Profile(TrainerCallback):
        """torch.profiler (CUDA and CPU) over PROFILE_STEPS steps right after the warm-up (--profile).
        Those steps are timed steps too: a profiled run's tok/s are slowed by the profiler."""

        def __init__(self):
            self.prof, self.t0, self.summary = None, 0.0, None

        def on_step_begin(self, a, state, control, **kwargs):
            if self.prof is None and self.summary is None and state.global_step == args.warmup:
                from torch.profiler import ProfilerActivity, profile

                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kwargs):
            if self.prof is not None and state.global_step == args.warmup + PROFILE_STEPS:
                torch.cuda.synchronize()
                wall_ms = (time.perf_counter() - self.t0) * 1e3 / PROFILE_STEPS
                self.prof.__exit__(None, None, None)
                self.summary = summarize_profile(self.prof, PROFILE_STEPS, wall_ms)
                # Where the host time goes (the GPU idles when the step is CPU-bound): in the worker's log.
                table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
                print(table, file=sys.stderr, flush=True)
                self.prof = None

        def on_train_end(self, a, state, control, **kwargs):
            if self.prof is not None:  # stopped early: no summary, but no profiler left running
                self.prof.__exit__(None, None, None)
                self.prof = None

    class PyProfile(TrainerCallback):
        """cProfile over the steps after the warm-up (--pyprofile FILE): the host's Python, by function."""

        def __init__(self, path: str):
            import cProfile

            self.path, self.prof, self.on = path, cProfile.Profile(), False

        def on_step_begin(self, a, state, control, **kwargs):
            if not self.on and state.global_step == args.warmup:
                self.on = True
                self.prof.enable()

        def on_train_end(self, a, state, control, **kwargs):
            import io
            import pstats

            if self.on:
                self.prof.disable()
                s = io.StringIO()
                stats = pstats.Stats(self.prof, stream=s)
                stats.sort_stats("tottime").print_stats(45)
                stats.sort_stats("cumulative").print_stats(45)
                Path(self.path).write_text(s.getvalue())

    with tempfile.TemporaryDirectory() as out_dir:
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(output_dir=out_dir, **cfg),
            train_dataset=data,
            processing_class=build_tokenizer(),
            peft_config=peft_config,
        )
        if patched:
            import chronipatch.trl

            chronipatch.trl.integrate(trainer, packing=packing)
        clock = Clock()
        trainer.add_callback(clock)
        profiler = Profile() if args.profile and cuda else None
        if profiler is not None:
            trainer.add_callback(profiler)
        if args.pyprofile:
            trainer.add_callback(PyProfile(args.pyprofile))
        collate, counts = trainer.data_collator, []

        def counting_collator(examples):
            batch = collate(examples)
            counts.append(int((batch["labels"][..., 1:] != -100).sum()))
            return batch

        trainer.data_collator = counting_collator
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        transformers.logging.set_verbosity_error()
        t0 = time.perf_counter()
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t0

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    accum = trainer.args.gradient_accumulation_steps
    steps = trainer.state.global_step
    warm = min(args.warmup, steps - 1)  # at least one timed step
    # The dataloader may collate ahead of the step that uses a batch: count only batches of timed steps.
    timed_tokens = sum(counts[warm * accum : steps * accum])
    timed_s = clock.ends[-1] - (clock.ends[warm - 1] if warm > 0 else t0)
    row.update(
        {
            "supervised tok/s": timed_tokens / timed_s,
            "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "first loss": losses[0],
            "final loss": losses[-1],
            "timed s": timed_s,
            "train s": train_s,
            "timed_steps": steps - warm,
            "supervised_tokens_timed": timed_tokens,
            "supervised_tokens_per_batch": counts[: steps * accum],
            "losses": losses,
            "step_s": [b - a for a, b in zip(clock.ends, clock.ends[1:])],
        }
    )
    if profiler is not None:
        row["profile"] = profiler.summary
    return row


def worker(args: argparse.Namespace) -> None:
    try:
        row = run_variant(args)
    except BaseException as e:  # OOM, missing package, rejected option, ...
        traceback.print_exc(file=sys.stderr)
        row = {"error": short_error(e)}
    emit_result(row)


# ----------------------------------------------------------------------------------------- parent


def spawn(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--variant", variant]
    for flag in ("steps", "batch", "max_length", "warmup", "seed"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--profile"] if args.profile else []
    cmd += ["--pyprofile", f"{args.pyprofile}.{variant}.txt"] if args.pyprofile else []
    print(f"== {variant}", file=sys.stderr, flush=True)
    base = {"variant": variant}
    return run_worker(cmd, base, args.timeout)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="all", help=f"comma list of {', '.join(VARIANTS)} or 'all'")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the tok/s timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per variant subprocess")
    p.add_argument("--out", default="bench/out")
    p.add_argument("--smoke", action="store_true", help="tiny config on CPU, fp32, 2 steps, max_length 128")
    p.add_argument(
        "--profile", action="store_true", help="also profile 2 steps after the warm-up: GPU time per category"
    )
    p.add_argument("--pyprofile", metavar="PREFIX", help="cProfile the timed steps into PREFIX.<variant>.txt")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.max_length, args.warmup = 2, 128, 1
    if args.profile and args.steps < args.warmup + PROFILE_STEPS:
        p.error(f"--profile needs --steps >= --warmup + {PROFILE_STEPS}")
    if args.worker:
        return worker(args)

    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    if not args.smoke and not torch.cuda.is_available():
        p.error("needs a CUDA device (use --smoke for a CPU run)")

    meta = {**env_info("cpu" if args.smoke else "cuda"), "notes": list(NOTES)}
    meta.update(
        model=MODEL,
        batch=args.batch,
        max_length=args.max_length,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
        smoke=args.smoke,
        documents=f"log-normal lengths, median {MEDIAN_TOKENS} at max_length 2048, sigma {SIGMA}",
    )
    if args.smoke:
        meta["notes"].append("smoke run: tiny config on CPU in fp32; the figures say nothing about speed")
    meta["notes"].append("× stock: against stock for full fine-tuning rows, against lora_stock for LoRA rows")
    rows: list[dict] = []
    for v in variants:
        rows.append(spawn(args, v))
        # Written after every variant: a run cut short keeps what it measured.
        json_path, md_path = write_results(
            "sft", _with_ratios(rows), meta, args.out, COLUMNS, sections=profile_sections(rows, ["variant"])
        )
    print(markdown_table(rows, COLUMNS))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)


def _with_ratios(rows: list[dict]) -> list[dict]:
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        base = by_name.get("lora_stock" if VARIANTS[r["variant"]][3] else "stock", {})
        if r.get("supervised tok/s") and base.get("supervised tok/s"):
            r["× stock"] = r["supervised tok/s"] / base["supervised tok/s"]
    return rows


if __name__ == "__main__":
    main()
