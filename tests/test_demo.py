"""examples/sft_demo.py end to end on CPU: stock and chronipatch SFT runs give the same fp32 loss curve."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import transformers

DEMO = Path(__file__).resolve().parents[1] / "examples" / "sft_demo.py"
STEPS = 8


def _load_demo():
    spec = importlib.util.spec_from_file_location("sft_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# Padded batches, and TRL's padding-free packing (chronipatch's varlen attention: its masked path on CPU).
@pytest.fixture(scope="module", params=[[], ["--packing"]], ids=["padded", "packed"])
def demo(request, tmp_path_factory):
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("demo") / "loss.png"
    verbosity = transformers.logging.get_verbosity()
    argv = ["--steps", str(STEPS), "--hidden", "64", "--layers", "2", "--samples", "2", "--out", str(out)]
    argv += request.param
    try:
        yield _load_demo().main(argv), out
    finally:  # main() sets process-wide switches; leave the other tests as they were
        torch.set_flush_denormal(False)
        transformers.logging.set_verbosity(verbosity)


def test_both_runs_train(demo):
    result, _ = demo
    stock, ours = result["runs"]
    for run in (stock, ours):
        assert len(run.losses) == STEPS, run.name
        assert all(math.isfinite(x) for x in run.losses), run.name
        assert run.supervised_tokens > 0 and run.tokens_per_s > 0, run.name
    assert ours.report is not None and "linear_cross_entropy" in ours.report
    # Under TRL the loss bypasses the patched forward: the wrapped fused head counts what really ran.
    assert ours.fused_loss_calls == STEPS and stock.fused_loss_calls == 0
    assert stock.losses[-1] < stock.losses[0]
    assert len(result["samples"]) == 2


def test_patched_loss_curve_matches_stock(demo):
    # Same weights, same batches, fp32 on CPU: the fused ops may differ from HF only by rounding.
    stock, ours = demo[0]["runs"]
    for step, (a, b) in enumerate(zip(stock.losses, ours.losses), start=1):
        assert b == pytest.approx(a, rel=1e-4), f"step {step}: stock {a} vs chronipatch {b}"


def test_png_written(demo):
    pytest.importorskip("matplotlib")
    result, out = demo
    assert result["png"] == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
