"""Instructions a thread issues per tile in the loss's tile epilogues on sm_90, counted without a GPU.

    python bench/lce_sass.py [--out DIR]

The tile kernels (``ops/_lce_tiles.py``, ``_lce_tiles_bwd.py``) run their epilogue (max, exp, sums, the
stores) on the warps that run the GEMM: triton 3.6 applies no warp specialization or ping-pong on sm_90, so
the tensor cores wait while it runs, and an instruction it saves is time (at 8192 x 151,936 each of a
thread's instructions per tile costs the forward ~0.3 us: 288 tiles per SM, 2 warps per scheduler). This
compiles each kernel for sm_90 at its launch config with the installed triton and its bundled ptxas,
disassembles it (nvdisasm, also bundled) and counts the SASS from the last wgmma wait to the tile loop's back
edge, by source line, with the kernel's registers and spilled bytes (cuobjdump) and whether its K loop keeps a
wgmma in flight. Compare trees, or triton versions, on one machine.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

# (case, module, kernel, dtype, TMA loads, constexprs beyond the tile's); the forward as each path runs it:
# statistics alone (recompute path, no grad), with token stats, and storing p (bf16 training, one pass).
FWD, BWD = ("_lce_tiles", "_fwd_tiles_kernel", "bf16"), ("_lce_tiles_bwd", "_bwd_tiles_kernel", "fp16")
CASES = [
    ("fwd", *FWD, True, dict(TOKEN_STATS=False, STORE_P=False)),
    ("fwd_stats", *FWD, True, dict(TOKEN_STATS=True, STORE_P=False)),
    ("fwd_p", *FWD, True, dict(TOKEN_STATS=False, STORE_P=True)),
    ("fwd_p_capture", *FWD, True, dict(TOKEN_STATS=False, STORE_P=True, CAPTURE=True)),  # with dW's labels
    ("fwd_p_stats", *FWD, True, dict(TOKEN_STATS=True, STORE_P=True)),
    ("fwd_p_even_v", *FWD, True, dict(TOKEN_STATS=False, STORE_P=True, EVEN_V=True)),  # no column mask
    ("fwd_ptr", *FWD, False, dict(TOKEN_STATS=False, STORE_P=False)),
    ("bwd", *BWD, True, {}),
    ("bwd_ptr", *BWD, False, {}),
]


def _type(name: str, dt: str, tma: bool, tile: tuple, store_p: bool) -> str:
    """A kernel argument's type by its name (the kernels' naming: upper case pointers, lower case ints)."""
    bm, bn, bk = tile[:3]
    descriptors = {"HD": f"{dt}[{bm}, {bk}]", "WD": f"{dt}[{bn}, {bk}]", "PD": f"bf16[{bm}, {bn}]"}
    descriptors["GD"] = f"{dt}[{bm}, {bn}]"
    if name in descriptors:
        return f"tensordesc<{descriptors[name]}>" if tma and (name != "PD" or store_p) else f"*{dt}"
    if name in ("H", "W", "G"):
        return f"*{dt}"
    if name == "P":
        return "*bf16" if store_p else f"*{dt}"
    if name in ("AP", "LABELS"):
        return "*i64"
    if name == "SLOT":
        return "*i32"
    if name == "LP":
        return "*bf16" if store_p else f"*{dt}"
    return "*fp32" if name[0].isupper() else "i32"


def compile_case(mod: str, name: str, dt: str, tma: bool, extra: dict):
    """The kernel compiled for sm_90 as a launch of its default config specialises it (16-byte aligned
    pointers, strides and widths multiples of 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tiles = importlib.import_module("chronipatch.ops._lce_tiles")
    kernel = getattr(importlib.import_module(f"chronipatch.ops.{mod}"), name)
    tile = tiles.TILE if tma else tiles.TILE_PTR
    bm, bn, bk, warps, stages, per_sm = tile
    store_p = extra.get("STORE_P", False)
    constexprs = dict(BM=bm, BN=bn, BK=bk, EVEN_K=True, UPCAST=False, TMA=tma, NUM_PROGS=132 * per_sm)
    # The forward at Qwen's vocabulary (151,936 = 593.5 tiles of 256) unless a case says EVEN_V (Llama's).
    fwd = {"MARGIN": tiles.REF_MARGIN, "EVEN_V": False, "CAPTURE": False}
    constexprs |= (fwd if "STORE_P" in extra else {}) | extra
    signature = {p.name: _type(p.name, dt, tma, tile, store_p) for p in kernel.params}
    signature |= {p.name: "constexpr" for p in kernel.params if p.is_constexpr}
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, p in enumerate(kernel.params)
        if signature[p.name][0] == "*" or p.name.startswith("stride") or p.name == "hdim"
    }
    tma_store = tma and (store_p or name == "_bwd_tiles_kernel")  # their shared memory holds the tile too
    options = {"num_warps": warps, "num_stages": min(stages, tiles.P_STAGES) if tma_store else stages}
    return triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned),
        target=GPUTarget("cuda", 90, 32),
        options=options,
    )


def _tool(name: str, cubin: bytes, workdir: Path, *flags: str) -> str:
    """The output of one of triton's bundled CUDA binary tools on the cubin."""
    import triton

    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return subprocess.run([str(exe), *flags, str(path)], capture_output=True, text=True, check=True).stdout


def sass(cubin: bytes, workdir: Path) -> list[str]:
    """The cubin's SASS with source lines."""
    return _tool("nvdisasm", cubin, workdir, "-c", "-g").splitlines()


def resources(cubin: bytes, workdir: Path) -> dict[str, int]:
    """Registers a thread and bytes of stack a thread (spilled registers) of the cubin's kernel."""
    usage = _tool("cuobjdump", cubin, workdir, "-res-usage")
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK):(\d+)", usage)}


LABEL = re.compile(r"^(\.L_x_\d+):")
INSTR = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)")
BRANCH = re.compile(r"BRA `\((\.L_x_\d+)\)")


def epilogue(lines: list[str]) -> dict:
    """Instructions of the tile loop's epilogue, all and by source line: from the wait for every wgmma (to 0)
    after the loop's first MMA group to the loop's back edge (the flattened loop runs the epilogue in a block
    of its own after the last K step's wait)."""
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := LABEL.match(line))}
    mma = [i for i, line in enumerate(lines) if "HGMMA" in line or "HMMA" in line]
    if not mma:
        raise RuntimeError("no MMA in the kernel")
    first = mma[0]
    start = next((i for i in range(first, len(lines)) if "DEPBAR.LE gsb0, 0x0" in lines[i]), mma[-1])
    end = next(
        i
        for i in range(start, len(lines))
        if (m := BRANCH.search(lines[i])) and labels.get(m.group(1), len(lines)) < start
    )
    by_line, src = collections.Counter(), "?"
    for line in lines[start : end + 1]:
        if m := re.search(r'File "([^"]+)", line (\d+)', line):
            src = f"{Path(m.group(1)).name}:{m.group(2)}"
        elif INSTR.match(line):
            by_line[src] += 1
    # Whether the K loop keeps a wgmma in flight (a wait to 1); a wait to 0 after each one idles the tensor
    # cores while the next tile's operands are checked (a branch in the tile loop did that).
    in_flight = any("DEPBAR.LE gsb0, 0x1" in line for line in lines[first:start])
    top = dict(by_line.most_common(12))
    return {"per_tile": sum(by_line.values()), "mma_in_flight": in_flight, "by_line": top}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="write lce_sass.json and lce_sass.md here")
    p.add_argument("--cases", default=",".join(c[0] for c in CASES))
    args = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    wanted = set(args.cases.split(","))
    rows = []
    for case, mod, name, dt, tma, extra in CASES:
        if case not in wanted:
            continue
        compiled = compile_case(mod, name, dt, tma, extra)
        cubin, shared = compiled.asm["cubin"], compiled.metadata.shared
        r = {"case": case, "kernel": name, "dtype": dt, "tma": tma, **extra, "shared": shared}
        with tempfile.TemporaryDirectory() as tmp:
            r |= epilogue(sass(cubin, Path(tmp))) | resources(cubin, Path(tmp))
        rows.append(r)
        print(
            f"{case:12s} {r['per_tile']:5d} per tile, {r['reg']} registers, {r['stack']} B stack, "
            f"{r['shared']} B shared, wgmma in flight: {r['mma_in_flight']}"
        )
        for src, k in r["by_line"].items():
            print(f"    {k:5d} {src}")
    head = f"triton {triton.__version__}, sm_90; instructions a thread issues per tile in the epilogue"
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"triton": triton.__version__, "commit": os.environ.get("CHRONIPATCH_COMMIT", "")}
        (args.out / "lce_sass.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        keys = ("per_tile", "reg", "stack", "shared", "mma_in_flight")
        table = ["| case | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        table += [f"| {r['case']} | " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
        (args.out / "lce_sass.md").write_text(head + "\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
