"""Case plans of the randomized op sweep (``bench/sweep.py``): which inputs each op is tried on."""

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

OPS = ("rms_norm", "swiglu", "rope", "linear_cross_entropy")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SIZES = ("tiny", "small", "large")
IMPLS = ("public", "kernel")
EXTREME_LOGIT = 1e4
# Loss case forced at index 0 of the large plan: N * V = 8193 * 262144 > 2^31.
HUGE_LCE = dict(n=8193, h=64, v=262144)

# ---------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One reproducible sweep case: the op, how it is called, and the drawn parameters."""

    op: str
    impl: str
    dtype: str
    device: str
    size: str
    index: int
    seed: int
    params: tuple[tuple[str, Any], ...]

    @property
    def p(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def __str__(self) -> str:
        return f"{self.op}-{self.impl}-{self.dtype}-{self.index:03d}"

    def describe(self) -> str:
        kv = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self} [{self.device}, size={self.size}, seed={self.seed}] {kv}"


def _pick(rng: random.Random, options: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    return rng.choices(list(options), weights=weights)[0]


def _lead(rng: random.Random, rows: int) -> tuple[int, ...]:
    """Leading dims with ``rows`` rows in total (or close to it): [rows], [B, T] or [B, T, H]."""
    kind = _pick(rng, ("1d", "2d", "3d"))
    if kind == "1d" or rows < 2:
        return (rows,)
    b = _pick(rng, [d for d in (1, 2, 3, 4) if rows % d == 0])
    if kind == "2d":
        return (b, rows // b)
    h = _pick(rng, [d for d in (1, 2, 3) if (rows // b) % d == 0])
    return (b, rows // b // h, h)


_SHAPES = {
    "tiny": dict(
        rows=(1, 2, 3, 5, 7, 9, 12),
        n=(1, 2, 3, 5, 8, 16, 33, 64, 100, 130),
        numel=(1, 2, 3, 7, 31, 100, 257, 2047, 2048, 2049),
        rope_bt=((1, 1), (1, 2), (2, 1), (1, 3), (2, 3), (1, 5), (3, 2)),
        rope_d=(2, 4, 6, 8, 10, 16, 24),
        rope_hk=(1, 2, 3),
        rope_ratio=(1, 2, 3, 4),
        lce_n=(1, 2, 3, 5, 7, 9),
        lce_h=(1, 2, 3, 8, 16, 33),
        lce_v=(1, 2, 3, 17, 100, 255, 256, 257, 300, 1000, 1025, 2049),
    ),
    "small": dict(
        rows=(1, 2, 3, 7, 16, 31, 33, 64, 127),
        n=(1, 2, 3, 7, 64, 100, 127, 128, 896, 1000, 1031),
        numel=(1, 3, 7, 100, 1001, 2047, 2049, 4096, 5000, 12345),
        rope_bt=((1, 1), (1, 7), (2, 5), (2, 33), (3, 17), (1, 64), (4, 9)),
        rope_d=(2, 6, 8, 24, 64, 80, 96, 128),
        rope_hk=(1, 2, 3, 4),
        rope_ratio=(1, 2, 3, 4, 7, 8),
        lce_n=(1, 2, 7, 16, 33, 64, 127),
        lce_h=(1, 3, 16, 64, 100, 128),
        lce_v=(1, 2, 50, 257, 1000, 3001, 4099, 8192),
    ),
    "large": dict(
        rows=(1, 7, 127, 1024, 4099, 8192),
        n=(1, 64, 127, 896, 1000, 2048, 4096, 5120, 8192),
        numel=(1, 7, 2049, 1 << 16, 3 * 1001, 4099 * 4864, 8192 * 11008),
        rope_bt=((1, 1), (1, 7), (2, 33), (4, 2048), (1, 4096), (8, 512), (2, 1031)),
        rope_d=(2, 64, 80, 96, 128, 256),
        rope_hk=(1, 2, 4, 8),
        rope_ratio=(1, 2, 4, 7, 8),
        lce_n=(1, 7, 127, 1024, 4099, 8192),
        lce_h=(64, 128, 896, 2048, 4096),
        lce_v=(1000, 32000, 50257, 128256, 151936, 262144),
    ),
}
# Caps on the elements of the biggest tensor of a case (memory and time of the fp64 truth).
_MAX_ELEMS = {"tiny": 1 << 13, "small": 1 << 17, "large": 1 << 26}
_MAX_LOGITS = {"tiny": 1 << 13, "small": 1 << 19, "large": 1 << 30}


def _params_rms_norm(rng: random.Random, size: str, low: bool) -> dict[str, Any]:
    s, cap = _SHAPES[size], _MAX_ELEMS[size]
    n = _pick(rng, s["n"])
    rows = _pick(rng, [r for r in s["rows"] if r * n <= cap] or [1])
    return dict(
        lead=_lead(rng, rows),
        n=n,
        layout=_pick(rng, ("contiguous", "row_strided", "permuted", "last_strided"), (4, 3, 2, 1)),
        weight_fp32=low and rng.random() < 0.3,  # Llama keeps fp32 norm weights under autocast-style setups
        eps=_pick(rng, (1e-6, 1e-5, 1e-12)),
        scale=_pick(rng, (1e-3, 1.0, 3.0, 50.0)),
        zero_row=rng.random() < 0.2,
        grad_layout=_pick(rng, ("dense", "expanded"), (5, 1)),
    )


def _params_swiglu(rng: random.Random, size: str, low: bool) -> dict[str, Any]:
    s, cap = _SHAPES[size], _MAX_ELEMS[size]
    numel = _pick(rng, [m for m in s["numel"] if m <= cap] or [1])
    last = _pick(rng, [d for d in (1, 3, 7, 64, 1001, 4864, 11008, numel) if numel % d == 0])
    return dict(
        lead=_lead(rng, numel // last),
        n=last,
        layout=_pick(rng, ("contiguous", "fused", "permuted", "last_strided"), (4, 3, 2, 1)),
        gate_scale=_pick(rng, (1.0, 3.0, 20.0)),
        grad_layout=_pick(rng, ("dense", "expanded"), (5, 1)),
    )


def _params_rope(rng: random.Random, size: str, low: bool) -> dict[str, Any]:
    s, cap = _SHAPES[size], _MAX_ELEMS[size]
    d = _pick(rng, s["rope_d"])
    for _ in range(20):
        b, t = _pick(rng, s["rope_bt"])
        hk = _pick(rng, s["rope_hk"])
        hq = hk * _pick(rng, s["rope_ratio"])
        if b * t * hq * d <= cap:
            break
    else:
        b, t, hk, hq = 1, 1, 1, 1
    return dict(
        b=b,
        t=t,
        hq=hq,
        hk=hk,
        d=d,
        cos_batch=_pick(rng, ("one", "batch", "expanded")),
        layout=_pick(rng, ("hf_view", "contiguous", "fused_qkv", "last_strided"), (4, 2, 3, 1)),
        angles=_pick(rng, ("rotary", "random")),
        theta=_pick(rng, (1e4, 1e6)),
        max_pos=_pick(rng, (t, 4096, 131072)),
        grad_layout=_pick(rng, ("dense", "hf_view", "expanded"), (3, 3, 1)),
    )


def _params_lce(rng: random.Random, size: str, low: bool, impl: str) -> dict[str, Any]:
    s, cap = _SHAPES[size], _MAX_LOGITS[size]
    v = _pick(rng, s["lce_v"])
    n = _pick(rng, [r for r in s["lce_n"] if r * v <= cap] or [1])
    h = _pick(rng, s["lce_h"])
    p: dict[str, Any] = dict(
        n=n,
        h=h,
        v=v,
        ignore_frac=_pick(rng, (0.0, 0.1, 0.5, 1.0), (3, 2, 3, 2)),
        ignore_index=_pick(rng, (-100, -1, 0), (6, 1, 1)),
        logits=_pick(rng, ("normal", "extreme"), (2, 1)),
        edge_labels=rng.random() < 0.3,
    )
    if impl == "kernel":
        p["chunk_bytes"] = _pick(rng, (None, 64))  # 64 bytes: 256-column chunks, a ragged last one
        p["grad_rows"] = _pick(rng, ("ones", "random"))
        return p
    p["shift"] = rng.random() < 0.6
    if p["shift"]:
        b = _pick(rng, [d for d in (1, 2, 3) if n % d == 0])
        p["lead"] = (b, n // b)
    else:
        p["lead"] = (n,)
    p["reduction"] = _pick(rng, ("mean", "sum", "none", "items_int", "items_tensor"), (4, 2, 2, 1, 1))
    p["hidden_layout"] = _pick(rng, ("contiguous", "row_strided", "permuted", "last_strided"), (4, 3, 2, 1))
    p["weight_layout"] = _pick(rng, ("contiguous", "transposed"), (4, 1))
    p["token_stats"] = rng.random() < 0.3
    return p


def make_cases(
    op: str,
    count: int,
    *,
    impl: str = "public",
    dtypes: Sequence[str] = ("fp32",),
    device: str = "cpu",
    size: str = "small",
    seed: int = 0,
) -> list[Case]:
    """``count`` cases of ``op``; case ``i`` depends only on (seed, op, impl, size, i), never on ``count``."""
    if op not in OPS or impl not in IMPLS or size not in SIZES:
        raise ValueError(f"unknown op/impl/size: {op!r}, {impl!r}, {size!r}")
    cases = []
    for i in range(count):
        rng = random.Random(f"chronipatch-sweep:{seed}:{op}:{impl}:{size}:{i}")
        dtype = dtypes[i % len(dtypes)]
        low = dtype != "fp32"
        if op == "rms_norm":
            p = _params_rms_norm(rng, size, low)
        elif op == "swiglu":
            p = _params_swiglu(rng, size, low)
        elif op == "rope":
            p = _params_rope(rng, size, low)
        else:
            p = _params_lce(rng, size, low, impl)
            if size == "large" and i == 0 and impl == "public":
                p.update(HUGE_LCE, lead=(HUGE_LCE["n"],), shift=False, reduction="mean", logits="normal")
                p.update(hidden_layout="contiguous", weight_layout="contiguous", token_stats=False)
                dtype = "bf16" if "bf16" in dtypes else dtype
        cases.append(Case(op, impl, dtype, device, size, i, rng.getrandbits(31), tuple(p.items())))
    return cases
