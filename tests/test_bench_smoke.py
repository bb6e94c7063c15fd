"""The benchmark scripts run end to end in their ``--smoke`` mode (tiny configs on CPU), so a GPU session
never finds one broken: every chronipatch row is written without an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(script: str, tmp_path: Path, *args: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")]),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),  # nothing compiled by another version
    }
    cmd = [sys.executable, str(ROOT / "bench" / script), "--smoke", "--out", str(tmp_path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp_path / f"{Path(script).stem}.json").read_text())


def test_ops_bench_smoke(tmp_path):
    rows = _run("ops.py", tmp_path)["rows"]
    ours = [r for r in rows if r["impl"].startswith("chronipatch")]
    assert {r["op"] for r in ours} == {"rms_norm", "rope", "swiglu_mlp", "swiglu", "lce"}
    for r in ours:
        assert not r["note"].startswith("error"), r
        assert r["ms"] > 0 and r["fwd_err"] < 0.1, r


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
    rows = _run("sft.py", tmp_path, "--variants", "stock_packing,chronipatch_packing,lora_chronipatch")[
        "rows"
    ]
    for r in rows:
        assert not r.get("error"), r
        assert r["supervised tok/s"] > 0, r
