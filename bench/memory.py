"""What is alive at a training step's peak of CUDA memory, by the code that allocated it (``bench/train.py
--memory``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def memory_at_peak(fn: Callable[[], Any], top: int = 24, marker: str | None = None) -> dict[str, Any]:
    """What is alive when one call of ``fn`` reaches its peak of allocated CUDA memory.

    Records the allocator's history for the call, replays it to the peak, and sums the live blocks by the
    innermost frame of the code that allocated them (chronipatch, transformers, torch's compiled graphs);
    blocks from before the call are one line. Also names where the peak was reached. ``marker``: the name of
    a function that ``fn`` calls to allocate one small block at a point worth comparing (a forward's end);
    the live blocks at that point are summed the same way.
    """
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        fn()
        torch.cuda.synchronize()
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    cur = peak = before
    at = -1
    allocated = []  # bytes allocated after each event
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            cur += ev["size"]
            if cur > peak:
                peak, at = cur, i
        elif ev["action"] == "free_requested":
            cur -= ev["size"]
        allocated.append(cur)
    live = _live_blocks(trace, at)
    freed_early = before + sum(ev["size"] for ev in live) - peak  # blocks of before freed by then
    out = {
        "peak_GiB": peak / 2**30,
        "before_GiB": before / 2**30,
        "before_freed_GiB": freed_early / 2**30,
        "peak_reached_in": _alloc_site(trace[at].get("frames", []), depth=4)
        if at >= 0
        else "before the call",
        "live_at_peak_MiB": _by_site(live, top),
    }
    mark = next((i for i, ev in enumerate(trace) if marker and _called(ev, marker)), None)
    if mark is not None:
        out["at_marker_GiB"] = allocated[mark] / 2**30
        out["live_at_marker_MiB"] = _by_site(_live_blocks(trace, mark), top)
    return out


def _live_blocks(trace: list[dict], at: int) -> list[dict]:
    """The blocks allocated within the trace and not yet freed at its event ``at``."""
    live: dict[int, dict] = {}
    for ev in trace[: at + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
        elif ev["action"] == "free_requested":
            live.pop(ev["addr"], None)
    return list(live.values())


def _by_site(blocks: list[dict], top: int) -> list[tuple[str, float, int]]:
    """(site, MiB, blocks) of the ``top`` sites by bytes, and the rest as one row."""
    by_site: dict[str, list] = {}
    for ev in blocks:
        entry = by_site.setdefault(_alloc_site(ev.get("frames", [])), [0, 0])
        entry[0] += ev["size"]
        entry[1] += 1
    rows = sorted(by_site.items(), key=lambda kv: -kv[1][0])
    rest = rows[top:]
    out = [(site, round(size / 2**20, 1), n) for site, (size, n) in rows[:top]]
    if rest:
        out.append(("(the rest)", round(sum(v[0] for _, v in rest) / 2**20, 1), sum(v[1] for _, v in rest)))
    return out


def _called(ev: dict, name: str) -> bool:
    """Whether the event is an allocation made inside a call of the function ``name``."""
    return ev["action"] == "alloc" and any(f["name"] == name for f in ev.get("frames", []))


def memory_sections(rows: Sequence[dict], labels: Sequence[str]) -> list:
    """Markdown sections of the rows' ``memory`` summaries (``memory_at_peak``), one per row."""
    sections = []
    for r in rows:
        mem = r.get("memory")
        if not mem:
            continue
        name = " / ".join(str(r.get(k)) for k in labels)
        head = (
            f"peak {mem['peak_GiB']:.3f} GiB, {mem['before_GiB']:.3f} GiB allocated before the step"
            f" ({mem['before_freed_GiB']:.3f} of it freed by the peak); reached in {mem['peak_reached_in']}"
        )
        table = [{"allocated by": s, "MiB": m, "blocks": n} for s, m, n in mem["live_at_peak_MiB"]]
        sections.append((f"live at the memory peak, {name} (--memory): {head}", table, None))
        if "live_at_marker_MiB" in mem:
            table = [{"allocated by": s, "MiB": m, "blocks": n} for s, m, n in mem["live_at_marker_MiB"]]
            head = f"{mem['at_marker_GiB']:.3f} GiB allocated"
            sections.append((f"live at the end of the forward, {name} (--memory): {head}", table, None))
    return sections


def _alloc_site(frames: list[dict], depth: int = 2) -> str:
    """The innermost frames worth naming: chronipatch, transformers, compiled graphs, bench scripts."""
    keep = ("chronipatch", "transformers", "torchinductor", "bench/", "torch/autograd", "torch/optim")
    named = [f for f in frames if any(k in f["filename"] for k in keep)] or frames[:1]
    return " < ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in named[:depth])
