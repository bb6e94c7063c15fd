"""Helpers shared by the benchmark scripts: environment capture, timing, peak memory, profiles, results."""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.metadata as _md
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# (key in env_info, import name, distribution name)
_PACKAGES = (
    ("torch", "torch", "torch"),
    ("triton", "triton", "triton"),
    ("transformers", "transformers", "transformers"),
    ("liger_kernel", "liger_kernel", "liger-kernel"),
    ("cut_cross_entropy", "cut_cross_entropy", "cut-cross-entropy"),
    ("chronipatch", "chronipatch", "chronipatch"),
)


def _version(module: str, dist: str) -> str | None:
    """Version of an importable package, or None when it cannot be imported."""
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    ver = getattr(mod, "__version__", None)
    if ver is None:
        try:
            ver = _md.version(dist)
        except _md.PackageNotFoundError:
            ver = "unknown"
    return str(ver)


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device) if device is not None else _default_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def env_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Where and with what a figure was produced: date, host, device, library versions, command line."""
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "device": device_name(device),
        "python": platform.python_version(),
    }
    for key, module, dist in _PACKAGES:
        info[key] = _version(module, dist)
    info["cuda"] = torch.version.cuda
    info["driver"] = _query(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    info["commit"] = _commit()
    info["argv"] = list(sys.argv)
    return info


def _query(cmd: list[str]) -> str | None:
    """The first line a command prints, or None where it cannot run."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _commit() -> str | None:
    """``CHRONIPATCH_COMMIT`` where set (a copied tree, whose own git metadata, if any, may be stale: the GPU
    machine's copy read 7fbb674+dirty for the tree of 9a4aef5), else the checkout's commit (``+dirty`` with
    uncommitted changes to tracked files)."""
    if os.environ.get("CHRONIPATCH_COMMIT"):
        return os.environ["CHRONIPATCH_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    head = _query(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"])
    if head is None:
        return None
    dirty = _query(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    return head + ("+dirty" if dirty else "")


def sync(device: torch.device | None = None) -> None:
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.synchronize()


def timeit(
    fn: Callable[[], Any], warmup: float = 25, rep: float = 100, device: torch.device | None = None
) -> float:
    """Median milliseconds of one call of ``fn``.

    On CUDA this is ``triton.testing.do_bench`` (``warmup``/``rep`` are milliseconds of GPU time, L2
    flushed between calls).  On CPU ``fn`` is warmed up for ``warmup`` ms (at least one call) and then
    timed with ``time.perf_counter`` for about ``rep`` ms (at least three calls).
    """
    device = device or _default_device()
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    t_end = time.perf_counter() + warmup / 1e3
    fn()
    while time.perf_counter() < t_end:
        fn()
    times: list[float] = []
    t_end = time.perf_counter() + rep / 1e3
    while len(times) < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_ms(fn: Callable[[], Any], device: torch.device | None = None, calls: int = 10) -> float | None:
    """GPU time of one call of ``fn``: the device time of everything it launches (``gpu_time_breakdown``),
    mean of ``calls`` back-to-back calls after one warm-up call, L2 warm. What the call costs inside a
    training step whose CPU runs ahead of the GPU: no launch gaps, no host overhead (None on CPU, or when
    the profiler saw no kernels)."""
    device = device or _default_device()
    if device.type != "cuda":
        return None
    fn()
    busy = gpu_time_breakdown(fn, calls=calls)["gpu_busy_ms"]
    return busy if busy > 0 else None


# Kernel-name patterns of the categories a profile is summed into (first match wins).
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "varlen")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "wgmma", "matmul", "mm_", "::mm", "bmm")),
    ("chronipatch", ("_fwd_kernel", "_bwd_kernel", "_rope_kernel", "_chunk_kernel")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("copy/fill", ("memcpy", "memset", "copy", "fill", "cat")),
    ("reduction", ("reduce", "norm", "softmax", "sum")),
)


def gpu_time_breakdown(fn: Callable[[], Any], calls: int = 2, top: int = 12) -> dict[str, Any]:
    """Where the GPU time of ``fn`` goes: torch.profiler over ``calls`` calls, device time per call summed
    by kernel category (``KERNEL_CATEGORIES``, rest "elementwise/other"), busy vs wall time, and the
    ``top`` kernels. Without CUDA the same over the CPU ops' self time (smoke runs)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()  # inside: the profiler's own start and stop are not the step's
        for _ in range(calls):
            fn()
        sync()
        wall_ms = (time.perf_counter() - t0) * 1e3 / calls
    return summarize_profile(prof, calls, wall_ms, top)


def summarize_profile(prof, calls: int, wall_ms: float, top: int = 12) -> dict[str, Any]:
    """``gpu_time_breakdown``'s summary of a finished torch.profiler run over ``calls`` calls."""
    cuda = torch.cuda.is_available()
    want = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    kernels: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == want:
            us = e.device_time_total if cuda else e.self_cpu_time_total
            kernels[e.name] = kernels.get(e.name, 0.0) + us / 1e3 / calls
    cats: dict[str, float] = {}
    for name, ms in kernels.items():
        low = name.lower()
        cat = next((c for c, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "elementwise/other")
        cats[cat] = cats.get(cat, 0.0) + ms
    busy = sum(kernels.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {
        "wall_ms": wall_ms,
        "gpu_busy_ms": busy,
        "idle_pct": max(0.0, 100 * (1 - busy / wall_ms)) if wall_ms else None,
        "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms": [{"kernel": n[:90], "ms": ms} for n, ms in ranked],
    }


def profile_sections(rows: Sequence[dict], labels: Sequence[str]) -> list:
    """Markdown sections of the rows' ``profile`` breakdowns (``gpu_time_breakdown``), each row named by its
    ``labels`` columns: GPU ms per step by kernel category, then the top kernels of each row."""
    prof = [(r, r["profile"]) for r in rows if r.get("profile")]
    if not prof:
        return []
    cats = list(dict.fromkeys(c for _, p in prof for c in p["categories_ms"]))
    table = [
        {
            **{k: r.get(k) for k in labels},
            "wall ms": p["wall_ms"],
            "GPU busy ms": p["gpu_busy_ms"],
            "idle %": p["idle_pct"],
            **p["categories_ms"],
        }
        for r, p in prof
    ]
    sections = [
        (
            "GPU time per step by kernel category, ms (--profile)",
            table,
            [*labels, "wall ms", "GPU busy ms", "idle %", *cats],
        )
    ]
    for r, p in prof:
        name = " / ".join(str(r.get(k)) for k in labels)
        sections.append((f"top kernels, {name}", p["top_kernels_ms"], None))
    return sections


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device | None = None) -> int | None:
    """Peak CUDA memory of one call of ``fn`` above what was allocated before it (None on CPU)."""
    device = device or _default_device()
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) != abs(value):
            return f"{value:.3g}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        if abs(value) >= 0.01:
            return f"{value:.3f}"
        return f"{value:.2e}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (dicts); ``columns`` defaults to the keys of all rows in order."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def meta_header(meta: dict[str, Any]) -> str:
    """Markdown bullet list naming device, versions, date and command of a result."""
    versions = ", ".join(f"{k} {meta.get(k) or 'not installed'}" for k, _, _ in _PACKAGES)
    lines = [
        f"- device: {meta.get('device')} (host {meta.get('hostname')}, CUDA {meta.get('cuda')})",
        f"- versions: python {meta.get('python')}, {versions}",
        f"- date (UTC): {meta.get('date_utc')}; commit {meta.get('commit')}; driver {meta.get('driver')}",
        f"- command: `{' '.join(meta.get('argv') or [])}`",
    ]
    for note in meta.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines)


def write_results(
    name: str,
    rows: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    out_dir: str | os.PathLike = "bench/out",
    columns: Sequence[str] | None = None,
    sections: Sequence[tuple[str, Sequence[dict[str, Any]], Sequence[str] | None]] = (),
) -> tuple[Path, Path]:
    """Write ``<name>.json`` (meta + rows) and ``<name>.md`` (meta header + tables); return both paths.

    ``sections`` are extra ``(title, rows, columns)`` tables put before the main one in the markdown.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    payload = {"meta": meta, "rows": list(rows)}
    payload.update({title: list(r) for title, r, _ in sections})
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    parts = [f"# {name}", "", meta_header(meta), ""]
    for title, sec_rows, sec_cols in sections:
        parts += [f"## {title}", "", markdown_table(sec_rows, sec_cols), ""]
    parts += ["## results", "", markdown_table(rows, columns), ""]
    md_path.write_text("\n".join(parts))
    return json_path, md_path


def smoke_args(doc: str) -> tuple[argparse.Namespace, str]:
    """The arguments of a script that takes only ``--out`` and ``--smoke`` (tiny shapes on the CPU), and its
    device: ``cpu`` for ``--smoke``, else ``cuda``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", default="bench/out")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    return args, "cpu" if args.smoke else "cuda"


def write_lines(name: str, payload: dict[str, Any], lines: Sequence[str], out_dir: str | os.PathLike) -> None:
    """Write ``<name>.json`` (``payload``) and ``<name>.md`` (``lines``), for scripts whose summary is prose
    lines rather than a table (``rms_kernels.py``, ``rms_dw_sum.py``)."""
    write_markdown(name, lines, out_dir)
    (Path(out_dir) / f"{name}.json").write_text(json.dumps(payload, indent=1))


def write_markdown(name: str, lines: Sequence[str], out_dir: str | os.PathLike) -> None:
    """Write ``<name>.md`` (``lines``) into ``out_dir``, made if missing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def short_error(e: BaseException) -> str:
    """One line for a failed variant's row (an OOM message is cut to its first sentence)."""
    msg = " ".join(str(e).split())
    if isinstance(e, torch.OutOfMemoryError):
        msg = "CUDA out of memory. " + msg.split(". ")[0]
    return f"{type(e).__name__}: {msg}"[:300]


RESULT_TAG = "@@bench-result "


def emit_result(row: dict[str, Any]) -> None:
    """A worker process hands its result row to the parent: one tagged JSON line on stdout."""
    print(RESULT_TAG + json.dumps(row, default=str), flush=True)


def run_worker(cmd: list[str], base: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one benchmark variant in its own process (no memory or compile cache shared); its other
    stdout goes to stderr; a timeout or a crash becomes the row's error."""
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timeout after {timeout} s"}
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
        else:
            print(line, file=sys.stderr)
    if result is None:
        return {**base, "error": f"worker exited with code {proc.returncode} and no result"}
    return {**base, **result}
