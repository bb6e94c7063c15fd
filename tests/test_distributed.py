"""DDP, FSDP2 and FSDP1 on CPU (gloo, 2 processes): a patched model's loss and gradients equal those of the
single-process stock model on the whole batch.

Every rank gets its own rows of one batch. As Trainer does with ``average_tokens_across_devices``,
each rank passes ``num_items_in_batch`` = the global count of scored labels and multiplies its loss by
the world size, so the gradient average of DDP / FSDP2 is the global-sum / global-count gradient.

All scenarios run once, in one pair of spawned processes (module fixture); the tests read the results.
The patched CausalLM forward reads ``self.lm_head.weight`` without calling ``lm_head``, so under FSDP2
it depends on which FSDP unit owns the head: the root (gathered by the root's pre-forward) or the head
itself (never gathered by FSDP, since the head's own forward never runs).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.slow

WORLD = 2
FAMILY = "qwen2"
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Scenario:
    wrap: str  # "ddp", "fsdp2" or "fsdp1" (FullyShardedDataParallel, a unit per decoder layer)
    patch: str | None = None  # None (stock), "before" or "after" wrapping
    own_head: bool = False  # FSDP2: lm_head is its own fully_shard unit
    tied: bool = False  # tie_word_embeddings (Qwen2.5-0.5B ties them)
    trl: bool = False  # the loss comes from chronipatch.trl's fused head (model(..., fused_lm_head=True))
    between: str = ""  # "logits": the loss call returns logits too; "forward": a forward before backward
    orig_params: bool = True  # FSDP1's use_orig_params (False: the weights leave _parameters in forward)


SCENARIOS = {
    "ddp-stock": Scenario("ddp"),
    "ddp-apply-before": Scenario("ddp", "before"),
    "ddp-apply-after": Scenario("ddp", "after"),
    "ddp-tied": Scenario("ddp", "before", tied=True),
    "fsdp1-apply-before": Scenario("fsdp1", "before"),
    "fsdp1-flat-params": Scenario("fsdp1", "before", orig_params=False),
    "fsdp2-stock": Scenario("fsdp2"),
    "fsdp2-stock-own-head": Scenario("fsdp2", own_head=True),
    "fsdp2-apply-before": Scenario("fsdp2", "before"),
    "fsdp2-apply-after": Scenario("fsdp2", "after"),
    "fsdp2-tied": Scenario("fsdp2", "before", tied=True),
    "fsdp2-own-head": Scenario("fsdp2", "before", own_head=True),
    "fsdp2-trl": Scenario("fsdp2", "before", trl=True),
    "fsdp2-trl-own-head": Scenario("fsdp2", "before", own_head=True, trl=True),
    # The head's own forward between the loss and its backward reshards it (freeing what a fused loss keeps).
    "fsdp2-own-head-logits": Scenario("fsdp2", "before", own_head=True, between="logits"),
    "fsdp2-own-head-forward": Scenario("fsdp2", "before", own_head=True, between="forward"),
    "fsdp2-stock-own-head-forward": Scenario("fsdp2", own_head=True, between="forward"),
}
PATCHED = [name for name, s in SCENARIOS.items() if s.patch]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    from tiny import batch

    ids, labels = batch(b=2 * WORLD, t=17, seed=3)
    return ids, labels


def _global_count(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != -100).sum()  # positions the shifted loss scores


# ------------------------------------------------------------------------------ worker processes


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():  # same order on every rank: full_tensor() is a collective
        g = p.grad
        if isinstance(g, DTensor):
            g = g.full_tensor()
        out[name.removeprefix("module.")] = None if g is None else g.detach().clone()
    return out


def _describe(t) -> str:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return f"DTensor{tuple(t.shape)} local {tuple(t.to_local().shape)} {t.placements}"
    return f"Tensor{tuple(t.shape)}"


def _run(name: str, rank: int) -> dict:
    import chronipatch
    import chronipatch.ops
    from tiny import tiny_model

    spec = SCENARIOS[name]
    ids, labels = _data()
    rows = slice(rank * 2, rank * 2 + 2)
    n_items = _global_count(labels[rows])
    dist.all_reduce(n_items)  # as Trainer: every rank normalises by the global count

    model = tiny_model(FAMILY, tie_word_embeddings=spec.tied).train()
    head = model.lm_head
    report = chronipatch.apply(model) if spec.patch == "before" else None
    if spec.wrap == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif spec.wrap == "fsdp1":  # its forward sets each unit's weights as plain attributes, not parameters
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = ModuleWrapPolicy({type(model.model.layers[0])})
        wrapped = FullyShardedDataParallel(
            model, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=spec.orig_params
        )
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        if spec.own_head:
            fully_shard(model.lm_head, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    if spec.patch == "after":
        report = chronipatch.apply(wrapped)

    # What the fused loss receives, and what the head's parameter is at that moment.
    seen: list[dict] = []
    op = chronipatch.ops.linear_cross_entropy

    def spy(hidden, weight, *args, **kwargs):
        seen.append({"weight": _describe(weight), "head_param": _describe(head.weight)})
        return op(hidden, weight, *args, **kwargs)

    chronipatch.ops.linear_cross_entropy = spy
    try:
        if spec.trl:
            from chronipatch.trl import _make_fused_forward

            model.forward = _make_fused_forward(model.forward, {"calls": 0}).__get__(model)
            out = wrapped(
                input_ids=ids[rows], labels=labels[rows], fused_lm_head=True, num_items_in_batch=n_items
            )
        else:
            extra = {"return_logits": True} if spec.between == "logits" and spec.patch else {}
            out = wrapped(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=n_items, **extra)
            if spec.between == "forward":
                wrapped(input_ids=ids[rows])  # logits for metrics, say: the head's own call
    finally:
        chronipatch.ops.linear_cross_entropy = op
    (out.loss * WORLD).backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)  # sum over ranks of local-sum / global-count = the global loss
    if spec.wrap == "fsdp1" and not spec.orig_params:
        grads = None  # on the flat parameters only: the loss is compared
    elif spec.wrap == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
            grads = {n.replace("_fsdp_wrapped_module.", ""): g for n, g in _grads(wrapped).items()}
    else:
        grads = _grads(wrapped)
    # A forward with nothing to train (a frozen reference model): no backward will reshard the head.
    for p in wrapped.parameters():
        p.requires_grad_(False)
    wrapped(input_ids=ids[rows], labels=labels[rows])
    return {
        "loss": loss,
        "grads": grads,
        "head_after_frozen_forward": type(head.weight).__name__,
        "ops": dict(report.ops()) if report else {},
        "left": list(report.left) if report else [],
        "root_class": type(model).__name__,
        "seen": seen,
    }


def _worker(rank: int, world: int, port: int, out_path: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}
    try:
        for name in names:
            try:
                results[name] = _run(name, rank)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()  # tear down together: a rank leaving while another works can abort gloo's threads
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ pytest side


def _fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (torch >= 2.6)
    except ImportError:
        return False
    return True


def _spawn(names: list[str], out_path: Path, deadline_s: float = 120.0) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _worker,
        args=(WORLD, _free_port(), str(out_path), names),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=2):
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish within {deadline_s:.0f} s")
    return torch.load(out_path, weights_only=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    try:
        _free_port()
    except OSError as e:
        pytest.skip(f"cannot open a localhost port for the process group: {e}")
    names = [n for n, s in SCENARIOS.items() if s.wrap == "ddp" or _fsdp2_available()]
    if not _importable("trl"):
        names = [n for n in names if not SCENARIOS[n].trl]
    return _spawn(names, tmp_path_factory.mktemp("dist") / "results.pt")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


_REFERENCE: dict[bool, tuple[torch.Tensor, dict]] = {}


def _reference(tied: bool):
    """Single-process stock model on the whole batch, same normalisation."""
    if tied not in _REFERENCE:
        from tiny import tiny_model

        ids, labels = _data()
        model = tiny_model(FAMILY, tie_word_embeddings=tied).train()
        out = model(input_ids=ids, labels=labels, num_items_in_batch=_global_count(labels))
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        _REFERENCE[tied] = out.loss.detach(), grads
    return _REFERENCE[tied]


def _result(results, name):
    if name not in results:
        pytest.skip(f"{name}: not run here (FSDP2 needs torch >= 2.6; TRL scenarios need trl)")
    r = results[name]
    assert "error" not in r, f"{name} raised on rank 0:\n{r.get('error')}"
    return r


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_loss_and_grads_match_single_process_stock(results, name):
    r = _result(results, name)
    ref_loss, ref_grads = _reference(SCENARIOS[name].tied)
    torch.testing.assert_close(r["loss"], ref_loss, rtol=1e-5, atol=1e-6)
    if r["grads"] is None:  # FSDP1's flat parameters
        return
    assert r["grads"].keys() == ref_grads.keys()
    bad = [
        n
        for n, g in ref_grads.items()
        if r["grads"][n] is None or not torch.allclose(r["grads"][n], g, rtol=1e-5, atol=1e-6)
    ]
    assert not bad, f"{name}: gradients differ from the single-process stock model in {bad}"


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if s.own_head])
def test_own_head_is_resharded_after_a_forward_without_backward(results, name):
    """A head that is its own FSDP unit holds its shard again after a forward that no backward follows."""
    assert _result(results, name)["head_after_frozen_forward"] == "DTensor"


@pytest.mark.parametrize("name", PATCHED)
def test_fused_loss_ran_on_the_full_head(results, name):
    """The loss came from chronipatch's op (exactly once per forward), fed the whole [V, H] head."""
    r = _result(results, name)
    if not SCENARIOS[name].trl:
        assert r["ops"].get("linear_cross_entropy") == 1, (
            f"{name}: CausalLM head not patched (root class {r['root_class']}); left: {r['left']}"
        )
    assert len(r["seen"]) == 1, f"{name}: the fused loss ran {len(r['seen'])} times"
    from tiny import COMMON

    full = f"Tensor({COMMON['vocab_size']}, {COMMON['hidden_size']})"
    assert r["seen"][0]["weight"] == full, r["seen"][0]


@pytest.mark.parametrize(
    "name, expect",
    [("fsdp2-apply-before", "Tensor("), ("fsdp2-tied", "Tensor("), ("fsdp2-own-head", "Tensor(")],
)
def test_head_param_inside_root_forward(results, name, expect):
    """What ``self.lm_head.weight`` is when the fused loss reads it: gathered by the root's pre-forward when
    the head belongs to the root unit, and by ``head_weight``'s ``unshard()`` when the head is its own
    unit (its forward, which would gather it, never runs under the fused loss)."""
    r = _result(results, name)
    assert r["seen"], f"{name}: the fused loss did not run"
    assert r["seen"][0]["head_param"].startswith(expect), r["seen"][0]


def test_bench_smoke_under_torchrun(tmp_path):
    """``bench/distributed.py --smoke``: tiny config, gloo, 2 ranks, DDP and FSDP2, stock and chronipatch."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}

    def launch():
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={WORLD}",
            "--master-addr=127.0.0.1",
            f"--master-port={_free_port()}",
            str(ROOT / "bench" / "distributed.py"),
            "--smoke",
            "--out",
            str(tmp_path),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=ROOT)

    proc = launch()
    # The port is free when picked but can be taken before torchrun binds it: one retry on a new port.
    if proc.returncode != 0 and any(s in proc.stderr for s in ("EADDRINUSE", "address already in use")):
        proc = launch()
    assert proc.returncode == 0, proc.stderr[-4000:]
    payload = json.loads((tmp_path / "distributed.json").read_text())
    rows = {(r["strategy"], r["variant"]): r for r in payload["rows"]}
    assert set(rows) == {(s, v) for s in ("ddp", "fsdp2") for v in ("stock", "chronipatch")}
    for key, row in rows.items():
        assert not row.get("error"), (key, row["error"])
        assert len(row["losses"]) == payload["meta"]["steps"]
    for strategy in ("ddp", "fsdp2"):
        ours, stock = rows[strategy, "chronipatch"]["losses"], rows[strategy, "stock"]["losses"]
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(stock), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "distributed.md").exists()
