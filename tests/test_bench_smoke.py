"""The benchmark scripts run end to end in their ``--smoke`` mode (tiny configs on CPU), so a GPU session
never finds one broken: every chronipatch row is written without an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(script: str, tmp_path: Path, *args: str, result: str = "") -> dict:
    """``script --smoke`` run into ``tmp_path``; its JSON (``<stem><result>.json``)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")]),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),  # nothing compiled by another version
    }
    cmd = [sys.executable, str(ROOT / "bench" / script), "--smoke", "--out", str(tmp_path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp_path / f"{Path(script).stem}{result}.json").read_text())


def test_ops_bench_smoke(tmp_path):
    rows = _run("ops.py", tmp_path)["rows"]
    ours = [r for r in rows if r["impl"].startswith("chronipatch") and r["note"] != "n/a"]
    ops = {"rms_norm", "rms_norm_qkv", "add_rms_norm_gate_up", "rope", "swiglu_mlp", "swiglu", "lce"}
    assert {r["op"] for r in ours} == ops
    # The prefetched label check is the loss's variant alone.
    assert {r["op"] for r in ours if r["impl"] == "chronipatch_prefetched"} == {"lce"}
    stock = {}
    for r in rows:
        if r["impl"] in ("hf_eager", "hf_compile") and r["fwd_err"] is not None:
            worst = stock.setdefault((r["op"], r["shape"]), [0.0, 0.0])
            worst[:] = max(worst[0], r["fwd_err"]), max(worst[1], r["grad_err"])
    for r in ours:
        assert not r["note"].startswith("error") and "round failed" not in r["note"], r
        # The script's own error columns: no worse than HF's (eager or compiled) on the same inputs.
        fwd, grad = stock[r["op"], r["shape"]]
        assert r["ms"] > 0 and r["fwd_err"] <= 1.1 * fwd + 1e-6 and r["grad_err"] <= 1.1 * grad + 1e-6, r


def test_train_bench_smoke_with_profile(tmp_path):
    rows = _run(
        "train.py", tmp_path, "--models", "qwen2.5-0.5b", "--variants", "hf,chronipatch", "--profile"
    )["rows"]
    assert [r["variant"] for r in rows] == ["hf", "chronipatch"]
    for r in rows:
        assert not r.get("error") and not r.get("profile_error"), r
        assert r["tok/s"] > 0 and r["profile"]["categories_ms"], r
    assert rows[0]["first loss"] == pytest.approx(rows[1]["first loss"], rel=1e-5)


def test_sft_bench_smoke(tmp_path):
    variants = ["stock_packing", "chronipatch_packing", "lora_chronipatch_packing"]
    rows = _run("sft.py", tmp_path, "--variants", ",".join(variants))["rows"]
    assert [r["variant"] for r in rows] == variants
    for r in rows:
        assert not r.get("error"), r
        assert r["supervised tok/s"] > 0, r
    # Same weights and rows: the first step's loss is the same with and without chronipatch.
    assert rows[1]["first loss"] == pytest.approx(rows[0]["first loss"], rel=1e-4)
    assert "linear_cross_entropy" in rows[1]["patched"]


def test_host_time_bench_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])}
    cmd = [sys.executable, str(ROOT / "bench" / "host_time.py"), "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = (tmp_path / "host_time_b1_t16.md").read_text()
    assert "## hf" in text and "## chronipatch" in text and "Traceback" not in text, text


def test_host_time_stub_takes_the_eager_cuda_path(tmp_path):
    """``--stub`` times chronipatch's CUDA eager path on CPU: its autograd nodes are the eager Functions'."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])}
    args = ["--stub", "--steps", "2", "--seq", "4", "--out", str(tmp_path)]
    cmd = [sys.executable, str(ROOT / "bench" / "host_time.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = (tmp_path / "host_time_stub_b1_t4.md").read_text()
    assert "## hf" in text and "## chronipatch" in text and "Traceback" not in text, text
    ours = text.split("## chronipatch")[1]
    assert "_AddRMSNormSwiGLUEagerBackward" in ours and "_RMSNormLinearRoPEEagerBackward" in ours, ours


def test_lce_host_bench_smoke():
    """``bench/lce_host.py``: the eager loss's CUDA path on CPU, launches stubbed; the check's counts and the
    references queued before the host waits, then the tiles'."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])}
    env.pop("TRITON_INTERPRET", None)  # the launches are stubbed; the kernels need no interpreter
    cmd = [sys.executable, str(ROOT / "bench" / "lce_host.py"), "--calls", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "to the first tile launch" in proc.stdout
    assert "from the check's wait to the first tile launch" in proc.stdout, proc.stdout
    # 8192 rows on 132 SMs: the references in groups, then their merge, all before the wait
    order = (
        "launches: _label_counts_kernel _references_kernel _references_merge_kernel |wait| _fwd_tiles_kernel"
    )
    assert order in proc.stdout, proc.stdout


def test_lce_prologue_bench_smoke(tmp_path):
    """``bench/lce_prologue.py --smoke``: the label count and reference kernels against the torch ops they
    replaced, results equal, through the interpreter."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])}
    cmd = [sys.executable, str(ROOT / "bench" / "lce_prologue.py"), "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = (tmp_path / "lce_prologue_smoke.md").read_text()
    assert "| 4,099 |" in text and "| 65x24 V=777 |" in text, text


def test_padded_attention_bench_smoke(tmp_path):
    """``bench/padded_attention.py --smoke``: every kernel choice runs and agrees on the first batch."""
    rows = _run("padded_attention.py", tmp_path)["rows"]
    assert [r["backends"] for r in rows] == ["SDPA's choice (stock)", "without cuDNN", "chronipatch"], rows
    assert all(r[c] > 0 for r in rows for c in ("pass 1 ms", "pass 2 ms", "pass 3 ms", "kernel ms")), rows
    assert all(r["out_err"] < 0.05 for r in rows), rows


def test_padded_compile_bench_smoke(tmp_path):
    """``bench/padded_compile.py --smoke``: both compiled graphs run every pass and agree on one batch."""
    rows = _run("padded_compile.py", tmp_path)["rows"]
    assert [r["graph"] for r in rows] == ["stock", "chronipatch"], rows
    assert all(r[c] > 0 for r in rows for c in ("first step ms", "pass 1 ms", "pass 2 ms", "pass 3 ms")), rows
    assert all(r["out_diff"] < 0.05 for r in rows), rows


def test_rms_kernels_bench_smoke(tmp_path):
    """``bench/rms_kernels.py --smoke``: every row count and program count it would time gives the default's
    results (one warp count each: the interpreter ignores num_warps)."""
    shapes = _run("rms_kernels.py", tmp_path, result="_smoke")["shapes"]
    assert [s["shape"] for s in shapes] == ["33x96", "40x256"] and all(len(s["bwd_us"]) > 10 for s in shapes)


def test_lce_sass_bench_smoke(tmp_path):
    """``bench/lce_sass.py``: the loss's tile kernels compiled for sm_90 and their epilogues counted (no GPU);
    the TMA kernels spill nothing and keep a wgmma in flight through their K loop."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])
    cmd = [sys.executable, str(ROOT / "bench" / "lce_sass.py"), "--cases", "fwd_p,bwd"]
    cmd += ["--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    if proc.returncode != 0 and "ptxas" in proc.stderr.lower():
        pytest.skip(f"no ptxas for sm_90: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "lce_sass.json").read_text())["rows"]
    assert [r["case"] for r in rows] == ["fwd_p", "bwd"]
    for r in rows:
        assert 500 < r["per_tile"] < 5000 and r["stack"] == 0 and r["mma_in_flight"], r


def test_invariant_probe_bench_smoke(tmp_path):
    """``bench/invariant_probe.py --smoke``: per seed the eager patched model's gradient errors against the
    fp32 truth, beside stock's (on CPU the reference ops: within a few times stock's bf16 error)."""
    rows = _run("invariant_probe.py", tmp_path, "--seeds", "0,1")["rows"]
    assert [(r["seed"], r["variant"]) for r in rows] == [(0, "eager"), (1, "eager")]
    for r in rows:
        assert 0 < r["e"] < 0.5 and 0 < r["stock worst"] < 0.5 and r["means ratio"] < 3, r
    record = torch.load(tmp_path / "invariant_probe_seed1.pt")
    loss_err, grad_err = record["errors"]["eager"]
    assert loss_err.shape == (3,) and len(record["curve"]) == 3
    assert grad_err.shape == (3, len(record["names"]))
    # The records alone give the same summary, with the run's meta.
    again = _run("invariant_probe.py", tmp_path / "again", "--records", str(tmp_path))
    assert again["rows"] == rows and again["meta"]["commit"] == record["meta"]["commit"]
    assert {k["kind"] for k in again["paired medians by parameter kind"]} >= {"self_attn.q_proj.weight"}


def test_lce_grad_error_bench_smoke(tmp_path):
    """``bench/lce_grad_error.py --smoke``: a row per regime, each with its ratios to stock."""
    rows = _run("lce_grad_error.py", tmp_path)["rows"]
    assert [r["regime"] for r in rows] == ["init", "peaked", "confident", "certain"]
    # On the CPU both of the loss's columns run its torch reference: the same gradients, the same ratios.
    assert all(
        r[f"{g} one pass / stock"] == r[f"{g} recompute / stock"] > 0 for r in rows for g in ("dh", "dW")
    )


def test_rms_dw_sum_bench_smoke(tmp_path):
    """``bench/rms_dw_sum.py --smoke``: the op's sum kernel at every tile it would time gives torch's sum."""
    assert [s["shape"] for s in _run("rms_dw_sum.py", tmp_path, result="_smoke")["shapes"]] == [
        "40x96",
        "8x300",
    ]
