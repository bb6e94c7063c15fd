"""Randomized accuracy sweep of every op against the fp64 truth, by the error-versus-stock rule.

The case generator, the stock formulas and the rule live in ``bench/sweep.py`` (``python bench/sweep.py
--cases 500`` runs the same cases at scale on a GPU): each forward output and input gradient must be no
further from the fp64 truth than the plain torch formula in the same dtype (times 1.1, plus a few fp32
roundings / one ulp of the dtype at the truth's scale). Cases are drawn from a fixed seed, so a failing id
such as ``linear_cross_entropy-public-fp32-016`` names the same inputs on every run.

- CPU: (a) the public ops, which run the torch reference path, in fp32 with small shapes; (b) the Triton
  launchers through the interpreter (TRITON_INTERPRET=1) on CPU tensors, in fp32 and fp16 with tiny shapes.
- CUDA: the public ops on the GPU in bf16/fp16/fp32 with large shapes (vocabulary up to 256k, one loss case
  with N·V above 2^31); these cases carry the ``gpu`` marker.

``CHRONIPATCH_SWEEP_CASES=N`` sets the number of cases per op (defaults: 50 public, 25 kernel). A summary
(cases, mismatches, worst error ratio per op and dtype) is printed at the end of the session; with
``CHRONIPATCH_SWEEP_REPORT=1`` (or a directory) it is also written to ``bench/out/sweep.{json,md}``.
A mismatch inside the error bound of a reported defect (``sweep_report.KNOWN_DEFECTS``) is an xfail naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import sweep
import sweep_report
from helpers import INTERPRET

CUDA = torch.cuda.is_available()
_ENV_CASES = os.environ.get("CHRONIPATCH_SWEEP_CASES")
N_PUBLIC = int(_ENV_CASES) if _ENV_CASES else 50
N_KERNEL = int(_ENV_CASES) if _ENV_CASES else 25

if CUDA:
    PUBLIC = dict(device="cuda", dtypes=("bf16", "fp16", "fp32"), size="large")
else:
    PUBLIC = dict(device="cpu", dtypes=("fp32",), size="small")
KERNEL = dict(device="cpu", dtypes=("fp32", "fp16"), size="tiny")

_RESULTS: list[sweep_report.Result] = []


def _params(impl: str, count: int, plan: dict) -> list:
    marks = [pytest.mark.gpu] if plan["device"] == "cuda" else []
    return [
        pytest.param(case, id=str(case), marks=marks)
        for op in sweep.OPS
        for case in sweep.make_cases(op, count, impl=impl, **plan)
    ]


class _Summary:
    """Terminal summary (and optional report files) of every case this session ran."""

    def pytest_terminal_summary(self, terminalreporter):
        if not _RESULTS:
            return
        tr = terminalreporter
        tr.section("chronipatch sweep")
        for row in sweep_report.summarize(_RESULTS):
            tr.write_line(
                f"{row['op']:<21} {row['impl']:<6} {row['dtype']:<4} {row['device']:<4} "
                f"cases {row['cases']:4d}  mismatches {row['mismatches']:3d} "
                f"(known defects {row['known_defect']:3d})  worst ratio {row['worst_ratio']:.3f} "
                f"{row['worst_output']} @ {row['worst_case']}"
            )
        target = os.environ.get("CHRONIPATCH_SWEEP_REPORT")
        if target:
            out = Path(tr.config.rootpath, "bench", "out") if target in ("1", "true", "yes") else Path(target)
            json_path, _ = sweep_report.write_report(_RESULTS, out, ["run by tests/test_sweep.py"])
            tr.write_line(f"wrote {json_path}")


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("chronipatch-sweep-summary"):
        manager.register(_Summary(), "chronipatch-sweep-summary")


def _check(case: sweep.Case) -> None:
    result = sweep.run_case(case)
    _RESULTS.append(result)
    if result.ok:
        return
    if result.known:  # the reported defect, described in sweep_report.KNOWN_DEFECTS
        worst = result.worst
        pytest.xfail(f"known defect {result.known}: {worst.name} error ratio {worst.ratio:.2f} vs stock")
    pytest.fail(result.describe(), pytrace=False)


@pytest.mark.parametrize("case", _params("public", N_PUBLIC, PUBLIC))
def test_public_op(case):
    _check(case)


@pytest.mark.skipif(CUDA, reason="on CUDA the public-op cases run these kernels natively")
@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 to run kernels on CPU tensors")
@pytest.mark.parametrize("case", _params("kernel", N_KERNEL, KERNEL))
def test_triton_kernel(case):
    _check(case)


def test_generator_is_reproducible_and_covers_the_brief():
    """Same seed, same cases; the plans reach the shapes, layouts and label mixes the sweep is for."""
    again = [sweep.make_cases(op, N_PUBLIC, impl="public", **PUBLIC) for op in sweep.OPS]
    assert [c for cs in again for c in cs] == [p.values[0] for p in _params("public", N_PUBLIC, PUBLIC)]
    assert sweep.make_cases("rope", 3, impl="public", **PUBLIC) == again[2][:3]  # prefix-stable in N
    many = {op: sweep.make_cases(op, 200, impl="public", **PUBLIC) for op in sweep.OPS}
    rms = [c.p for c in many["rms_norm"]]
    assert {1, 3, 7}.issubset({p["n"] for p in rms}) and any(p["lead"][0] == 1 for p in rms)
    assert {"contiguous", "row_strided", "permuted"}.issubset({p["layout"] for p in rms})
    rope = [c.p for c in many["rope"]]
    assert {p["hq"] // p["hk"] for p in rope} >= {1, 2, 4}
    assert {"hf_view", "fused_qkv"}.issubset({p["layout"] for p in rope})
    lce = [c.p for c in many["linear_cross_entropy"]]
    assert {0.0, 0.5, 1.0}.issubset({p["ignore_frac"] for p in lce})
    assert {"normal", "extreme"} == {p["logits"] for p in lce}
    assert len({p["v"] for p in lce}) >= 5
    if CUDA:
        huge = many["linear_cross_entropy"][0].p
        assert huge["n"] * huge["v"] > 2**31 and max(p["v"] for p in lce) >= 256 * 1024
