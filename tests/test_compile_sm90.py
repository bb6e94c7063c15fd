"""Every Triton kernel compiles for the H100 (sm_90) on this CPU machine (triton's bundled ptxas), so a
kernel that only the interpreter accepts cannot land; the PTX also carries the instructions the numerics
rely on (IEEE sqrt/division in RMSNorm, the sigmoid and the softmax, fp64 weight-gradient sums, the
reduced-range exp), and no kernel spills registers. The loss's pointer-load tile kernels, what GPUs before
Hopper run, also compile for the A100 (sm_80).

The compiles run in a subprocess without ``TRITON_INTERPRET`` (the test session sets it on CPU machines,
which turns every ``@triton.jit`` into an interpreted function)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ints(*names):
    return dict.fromkeys(names, "i32")


def _cases() -> list[tuple]:
    """(case id, op module, kernel, argument types, constexprs[, launch options]) for every kernel and
    dtype."""
    cases = []
    for dt in ("bf16", "fp16", "fp32"):
        io = {"X": f"*{dt}", "W": f"*{dt}", "Y": f"*{dt}", "RSTD": "*fp32"}
        tiles = {"BLOCK_N": 1024, "ROWS": 2}
        # A direct launch types a Python float fp32; Inductor's wrapper of a triton_op types it fp64.
        cases += [
            (
                f"rms_fwd_{dt}_eps_{eps}" + ("_add" if add else ""),
                "rms_norm",
                "_fwd_kernel",
                io
                | {"R": f"*{dt}", "S": f"*{dt}"}
                | _ints("stride_x", "stride_y", "stride_r", "n_rows", "N")
                | {"eps": eps},
                tiles | {"ADD": add},  # with the residual add (rms_norm_linear's residual form)
            )
            for eps in ("fp32", "fp64")
            for add in (False, True)
        ]
        cases += [
            (
                f"rms_bwd_{dt}" + ("_y" if store_y else "") + name,
                "rms_norm",
                "_bwd_kernel",
                {
                    "DY": f"*{dt}",
                    "DY1": f"*{dt}",
                    "DY2": f"*{dt}",
                    "X": f"*{dt}",
                    "W": f"*{dt}",
                    "RSTD": "*fp32",
                    "DX": f"*{dt}",
                    "DW_PART": "*fp64",
                    "Y": f"*{dt}",
                    "DX_EXT": f"*{dt}",
                }
                | _ints(
                    "stride_dy",
                    "stride_dy1",
                    "stride_dy2",
                    "stride_x",
                    "stride_dx",
                    "stride_y",
                    "stride_dx_ext",
                    "n_rows",
                    "N",
                    "rows_per_prog",
                ),
                # rms_norm's own backward (one dy) and rms_norm_linear's (y again, dy as three terms, dx_ext),
                # at the backward's tiles for 896, 2048 (2 rows, 4 warps) and 128 columns (4 rows, one warp)
                bwd_tiles
                | {"STORE_Y": store_y, "N_DY": 3 if store_y else 1, "ADD_DX": store_y}
                | {"DW_STEP_F32": dt != "fp32" and not store_y},
                {"num_warps": warps},
            )
            for store_y in (False, True)
            for name, bwd_tiles, warps in (
                ("", tiles, 4),
                ("_2048", {"BLOCK_N": 2048, "ROWS": 2}, 4),
                ("_128", {"BLOCK_N": 128, "ROWS": 4}, 1),
            )
        ]
        cases += [  # the sum of dw's partial rows, at both of its tiles
            (
                f"rms_dw_sum_{dt}_r{br}c{bc}",
                "rms_norm",
                "_dw_sum_kernel",
                {"PART": "*fp64", "DW": f"*{dt}"} | _ints("progs", "N", "stride"),
                {"BR": br, "BC": bc, "VIA_F32": dt != "fp32"},
            )
            for br, bc in ((128, 4), (64, 8))
        ]
        cases += [
            (
                f"swiglu_fwd_{dt}",
                "swiglu",
                "_fwd_kernel",
                {"G": f"*{dt}", "U": f"*{dt}", "O": f"*{dt}", "n": "i32"},
                {"BLOCK": 2048, "EXACT": dt == "fp32"},
            ),
        ]
        cases += [
            (
                f"swiglu_bwd_{dt}{'_h' if store_h else ''}",
                "swiglu",
                "_bwd_kernel",
                {p: f"*{dt}" for p in ("DO", "G", "U", "DG", "DU", "H")} | {"n": "i32"},
                {"BLOCK": 2048, "EXACT": dt == "fp32", "STORE_H": store_h},
            )
            for store_h in (False, True)
        ]
        strides = _ints(
            *(f"s{x}_{d}" for x in ("q", "k", "qo", "ko") for d in "bht"), "sc_b", "sc_t", "ss_b", "ss_t"
        )
        rope = (
            {p: f"*{dt}" for p in ("Q", "K", "QO", "KO")}
            | {"C": "*fp32", "S": "*fp32"}
            | strides
            | _ints("n_tok", "T", "HQ", "HK")
        )
        for bwd in (False, True):
            tiles = {"D": 64, "BLOCK_HQ": 16, "BLOCK_HK": 2, "BLOCK_D": 64, "TOKENS": 1, "BACKWARD": bwd}
            cases.append((f"rope_{'bwd' if bwd else 'fwd'}_{dt}", "rope", "_rope_kernel", rope, tiles))
        if dt == "fp32":  # fp32 inputs: cuBLAS logits chunks and these two kernels over them
            stats = dict.fromkeys(("M", "S", "E", "ZLAB"), "*fp32")
            chunk = _ints("stride_z", "vc", "v0", "ignore_index")
            cases += [
                *(
                    (
                        f"lce_fwd_{dt}{'' if token_stats else '_no_token_stats'}",
                        "_lce_chunks",
                        "_fwd_chunk_kernel",
                        {"Z": "*fp32", "LABELS": "*i64", "ARG": "*i64"} | stats | chunk,
                        {"BLOCK_V": 2048, "TOKEN_STATS": token_stats},
                    )
                    for token_stats in (True, False)
                ),
                (
                    f"lce_bwd_{dt}",
                    "_lce_chunks",
                    "_bwd_chunk_kernel",
                    {"Z": "*fp32", "LABELS": "*i64", "STATS": "*fp32", "DROWS": "*fp32"} | chunk,
                    {"BLOCK_V": 1024},
                ),
            ]
            continue
        # 2-byte inputs: the tile kernels, at the launch configs of both load paths
        from chronipatch.ops._lce_tiles import P_STAGES, TILE, TILE_PTR

        for tma, (bm, bn, bk, warps, stages, per_sm) in ((True, TILE), (False, TILE_PTR)):
            loads = (
                {"HD": f"tensordesc<{dt}[{bm}, {bk}]>", "WD": f"tensordesc<{dt}[{bn}, {bk}]>"}
                if tma
                else {"HD": f"*{dt}", "WD": f"*{dt}"}  # stand-ins the kernels never read
            )
            gemm = {"H": f"*{dt}", "W": f"*{dt}"} | loads
            gemm |= _ints("stride_h", "stride_w", "n", "vocab", "hdim")
            labels = {"LABELS": "*i64"} | _ints("ignore_index")
            shape = {"BM": bm, "BN": bn, "BK": bk, "EVEN_K": True, "UPCAST": False, "TMA": tma}
            shape["NUM_PROGS"] = 132 * per_sm  # an H100 SXM's SMs
            parts = dict.fromkeys(("MP", "SP", "EP"), "*fp32") | _ints("n_tiles_v", "group") | {"AP": "*i64"}
            path = "" if tma else "_pointer_loads"
            cases += [
                *(
                    (
                        f"lce_tiles_fwd_{dt}{'' if token_stats else '_no_stats'}{'_p' if p else ''}{path}",
                        "_lce_tiles",
                        "_fwd_tiles_kernel",
                        gemm
                        | parts
                        | {"P": "*bf16" if p else f"*{dt}", "RP": "*fp32", "REF": "*fp32", "LABELS": "*i64"}
                        | {"PD": f"tensordesc<bf16[{bm}, {bn}]>" if p and tma else "*bf16" if p else f"*{dt}"}
                        | {"SLOT": "*i32" if p and tma else "*i64", "LP": "*bf16" if p else f"*{dt}"}
                        | _ints("stride_p", "stride_lp", "ignore_index"),
                        # Both forms of the column mask: bf16 masked (Qwen's vocabulary), fp16 not (EVEN_V).
                        shape
                        | {"TOKEN_STATS": token_stats, "STORE_P": p, "CAPTURE": p and tma, "MARGIN": 32.0}
                        | {"EVEN_V": dt == "fp16"},
                        {"num_warps": warps, "num_stages": min(stages, P_STAGES) if p and tma else stages},
                    )
                    for token_stats in (True, False)
                    for p in ((False, True) if dt == "bf16" else (False,))  # p: the one-pass bf16 path
                ),
                (
                    f"lce_tiles_bwd_{dt}{path}",
                    "_lce_tiles_bwd",
                    "_bwd_tiles_kernel",
                    gemm
                    | labels
                    | {"G": f"*{dt}", "GD": f"tensordesc<{dt}[{bm}, {bn}]>" if tma else f"*{dt}"}
                    | {"STATS": "*fp32", "DROWS": "*fp32"}
                    | _ints("stride_g", "v0", "vc", "group"),
                    shape,
                    {"num_warps": warps, "num_stages": min(stages, P_STAGES) if tma else stages},
                ),
            ]
    cases += [
        (
            f"lce_tiles_merge_{dt}",
            "_lce_tiles",
            "_merge_kernel",
            dict.fromkeys(("MP", "RP", "SP", "EP", "M", "S", "E", "ZLAB", "LOSS"), "*fp32")
            | {"AP": "*i64", "ARG": "*i64", "H": f"*{dt}", "W": f"*{dt}", "LABELS": "*i64"}
            | _ints("stride_h", "stride_w", "vocab", "hdim", "n_tiles_v", "ignore_index"),
            {"BLOCK_T": 1024, "BLOCK_H": 1024, "TOKEN_STATS": True},
        )
        for dt in ("bf16", "fp16")
    ]
    cases.append(
        (
            "lce_rows_settle_bf16",
            "_lce_rows",
            "_settle_kernel",
            dict.fromkeys(("RP", "REF", "M", "S", "ZLAB", "DIVISOR", "R", "GLAB", "QLAB"), "*fp32")
            | {"P": "*bf16", "LABELS": "*i64", "SLOT": "*i32", "LP": "*bf16"}
            | _ints("stride_p", "stride_lp", "vocab", "n_tiles_v", "ignore_index"),
            {"BN": 256, "MARGIN": 32.0, "TILES": 8, "SCAN": 1024, "CAPTURE": True},
        )
    )
    cases.append(
        (
            "lce_rows_scale_bf16",
            "_lce_rows",
            "_scale_rows_kernel",
            {"PW": "*fp32", "H": "*bf16", "R": "*fp32", "GLAB": "*fp32", "QLAB": "*fp32", "W": "*bf16"}
            | {"LABELS": "*i64", "DH": "*bf16", "HR": "*bf16"}
            | _ints(
                "stride_pw", "stride_h", "stride_w", "stride_dh", "stride_hr", "hdim", "vocab", "ignore_index"
            ),
            {"NEED_DH": True, "NEED_DW": True, "BLOCK": 1024},
        )
    )
    from chronipatch.ops._lce_label_rows import LABEL_COLS, LABEL_ROWS, LABEL_RUNS, LABEL_WARPS, SUMS_TILE

    bj, bh, br = SUMS_TILE[:3]
    cases += [
        (
            f"lce_rows_label_sums_bf16{'' if tma else '_pointer_loads'}",
            "_lce_label_rows",
            "_label_sums_kernel",
            {"SUMS": "*fp32", "LP": "*bf16", "HR": "*bf16", "COUNT": "*i32"}
            | {
                "LPD": f"tensordesc<bf16[{bj}, {br}]>" if tma else "*bf16",
                "HRD": f"tensordesc<bf16[{br}, {bh}]>" if tma else "*bf16",
            }
            | _ints("rows", "hdim", "stride_s", "stride_lp", "stride_lp_i", "stride_hr"),
            {"BJ": bj, "BH": bh, "BR": br, "UPCAST": False, "TMA": tma},
            {"num_warps": SUMS_TILE[3], "num_stages": SUMS_TILE[4]},
        )
        for tma in (True, False)
    ]
    cases.append(
        (
            "lce_rows_label_rows_bf16",
            "_lce_label_rows",
            "_label_rows_kernel",
            {"DW": "*bf16", "H": "*bf16", "ORDER": "*i64", "SORTED": "*i64", "SLOTS": "*i32", "END": "*i64"}
            | dict.fromkeys(("SUMS", "R", "GLAB", "QLAB"), "*fp32")
            | _ints("n", "stride_dw", "stride_s", "stride_h", "hdim", "vocab", "ignore_index"),
            {"RUNS": LABEL_RUNS, "ROWS": LABEL_ROWS, "BLOCK": LABEL_COLS},
            {"num_warps": LABEL_WARPS},
        )
    )
    cases += [
        (
            f"lce_rows_references_bf16_bm{bm}",
            "_lce_refs",
            "_references_kernel",
            {
                "H": "*bf16",
                "W": "*bf16",
                "W_NORM": "*fp32",
                "K": "*fp32",
                "bound_scale": "fp32",
                "spread": "fp32",
            }
            | _ints("n", "hdim", "stride_h", "stride_w", "step", "samples", "per_group"),
            {"BM": bm, "BS": 128, "BK": 64, "UPCAST": False, "FINAL": bm != 64},
            {"num_warps": 4, "num_stages": 3},
        )
        for bm in (64, 32, 16)
    ]
    cases += [
        (
            f"label_counts{'_items_' + items if items else ''}",
            "_labels",
            "_label_counts_kernel",
            {"Y": "*i64", "ITEMS": f"*{items or 'i64'}", "OUT": "*i64"} | _ints("n", "vocab", "ignore_index"),
            {"HAS_ITEMS": bool(items), "BLOCK": 4096},
            {"num_warps": 8},
        )
        for items in ("", "i64", "fp32")
    ]
    cases += [
        (
            f"lce_tiles_label_grad_{dt}",
            "_lce_tiles_bwd",
            "_label_grad_kernel",
            {"H": f"*{dt}", "W": f"*{dt}", "LABELS": "*i64"}
            | dict.fromkeys(("STATS", "DROWS", "GY"), "*fp32")
            | _ints("stride_h", "stride_w", "vocab", "hdim", "ignore_index"),
            {"BLOCK_H": 1024},
        )
        for dt in ("bf16", "fp16")
    ]
    cases.append(
        (
            "lce_tiles_put_label_grad",
            "_lce_tiles_bwd",
            "_put_label_grad_kernel",
            {"G": "*bf16", "LABELS": "*i64", "GY": "*fp32"} | _ints("stride_g", "n", "v0", "vc"),
            {"BLOCK": 1024},
        )
    )
    # The pointer-load tile kernels again for an A100 (sm_80, mma.sync): what GPUs before Hopper run.
    cases += [
        (f"sm80_{c[0]}", *c[1:4], c[4] | {"NUM_PROGS": 108}, c[5], 80)
        for c in cases
        if c[0].startswith("lce_tiles_") and c[0].endswith("_pointer_loads")
    ]
    return cases


def _stack_bytes(cubin: bytes) -> int:
    """Bytes of stack a thread (spilled registers), from triton's bundled cuobjdump; -1 where it is absent."""
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"STACK:(\d+)", usage)
    return int(found.group(1)) if found else -1


def _compile_all() -> tuple[dict[str, str], dict[str, int], dict[str, int]]:
    """(case id -> PTX (or "error: ..."), case id -> bytes of shared memory, case id -> bytes of stack a
    thread), compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out, shared, stack = {}, {}, {}
    for case, mod, name, types, constexprs, *launch in _cases():
        options, arch = launch[0] if launch else None, launch[1] if len(launch) > 1 else 90
        kernel = getattr(importlib.import_module(f"chronipatch.ops.{mod}"), name)
        signature = {p.name: "constexpr" if p.is_constexpr else types[p.name] for p in kernel.params}
        # As a launch specialises them at real shapes: base addresses 16-byte aligned, strides and row widths
        # multiples of 16 (vector loads, software pipelining, and their shared memory).
        aligned = {
            (i,): [["tt.divisibility", 16]]
            for i, p in enumerate(kernel.params)
            if signature[p.name][0] == "*" or p.name.startswith("stride") or p.name in ("hdim", "N")
        }
        try:
            compiled = triton.compile(
                ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned),
                target=GPUTarget("cuda", arch, 32),
                options=options,
            )
            out[case] = compiled.asm["ptx"] if compiled.asm.get("cubin") else "error: no cubin"
            shared[case] = compiled.metadata.shared
            stack[case] = _stack_bytes(compiled.asm["cubin"])
        except Exception as e:  # reported per case by the test
            out[case] = f"error: {type(e).__name__}: {str(e)[:2000]}"
    return out, shared, stack


@pytest.fixture(scope="module")
def compiled() -> tuple[dict[str, str], dict[str, int], dict[str, int]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])
    code = "import json, test_compile_sm90 as t; print(json.dumps(t._compile_all()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        if "ptxas" in proc.stderr.lower():
            pytest.skip(f"no ptxas for sm_90: {proc.stderr[-300:]}")
        raise AssertionError(proc.stderr[-4000:])
    out, shared, stack = json.loads(proc.stdout.strip().splitlines()[-1])
    if all(v.startswith("error") and "ptxas" in v.lower() for v in out.values()):
        pytest.skip(f"no ptxas for sm_90 here: {next(iter(out.values()))[:300]}")
    return out, shared, stack


SM90_SHARED = 227 << 10  # an H100's shared memory per block: more fails only at launch


@pytest.fixture
def ptx(compiled, case) -> str:
    return compiled[0][case]


@pytest.mark.parametrize("case", [c[0] for c in _cases()])
def test_kernel_spills_no_registers_on_h100(compiled, case):
    """No stack (spilled registers) a thread, from the cubin's resource usage (triton's bundled cuobjdump)."""
    stack = compiled[2].get(case, -1)
    if stack < 0:
        pytest.skip("no cuobjdump beside triton's ptxas, or the kernel did not compile (its own test says)")
    assert stack == 0, f"{stack} bytes of stack a thread: registers spilled"


@pytest.mark.parametrize("case", [c[0] for c in _cases()])
def test_kernel_compiles_for_h100(compiled, ptx, case):
    assert not ptx.startswith("error"), ptx
    assert compiled[1][case] <= SM90_SHARED, f"{compiled[1][case]} bytes of shared memory"
    if case.startswith("rms_fwd"):
        assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx and "rsqrt.approx" not in ptx
    if case.startswith("rms_bwd"):  # dw accumulates in fp64 (16-bit inputs: of fp32 step sums)
        assert re.search(r"add(\.rn)?\.f64", ptx)
    if case.startswith(("lce_fwd", "lce_bwd")):  # fp32: exp_f32's Cody-Waite floor, IEEE division backward
        assert re.search(r"cvt\.rmi(\.ftz)?\.f32\.f32", ptx)
        assert ("div.rn.f32" in ptx) == case.startswith("lce_bwd")
    if case.startswith("lce_rows_references"):  # the sampled logits on tensor cores too (wgmma: M = 64)
        assert ("wgmma.mma_async" if case.endswith("bm64") else "mma.sync") in ptx
    if case.startswith("lce_rows_label_sums"):  # on wgmma, its operands by TMA where the copy's rows allow
        assert "wgmma.mma_async" in ptx
        assert ("cp.async.bulk.tensor" in ptx) == (not case.endswith("_pointer_loads"))
    if case.startswith(("lce_tiles_fwd", "lce_tiles_bwd")):  # the logits GEMM on Hopper's tensor cores
        assert "wgmma.mma_async" in ptx
        assert ("cp.async.bulk.tensor" in ptx) == (not case.endswith("_pointer_loads"))  # TMA loads
        # ... and p, or the backward's g, stored by TMA (shared to global) where the loads are
        g_by_tma = case.startswith("lce_tiles_bwd") and "_pointer" not in case
        assert ("bulk.tensor.2d.global.shared" in ptx) == (case.endswith("_p") or g_by_tma)
    if case.startswith("sm80_"):  # an A100's tensor cores: mma.sync, no wgmma or TMA
        assert "mma.sync" in ptx and "wgmma" not in ptx and "cp.async.bulk.tensor" not in ptx
    if case.startswith("swiglu"):  # IEEE division always; exp_f32's Cody-Waite floor for fp32 only
        assert "div.rn.f32" in ptx
        assert bool(re.search(r"cvt\.rmi(\.ftz)?\.f32\.f32", ptx)) == ("_fp32" in case)
