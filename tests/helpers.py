"""Shared test helpers: the error-versus-stock rule and input builders."""

from __future__ import annotations

import importlib

import pytest
import torch

INTERPRET = __import__("os").environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tests that run the Triton kernels: natively on CUDA (where conftest marks them ``gpu`` by this reason),
# else through the interpreter.
NEEDS_KERNELS = "needs CUDA or TRITON_INTERPRET=1"
needs_kernels = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason=NEEDS_KERNELS)

# The kernel tests' dtypes (the interpreter's; bf16 natively only) and tolerances against the reference.
KERNEL_DTYPES = [torch.float32, torch.float16]
KERNEL_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def kernel_randn(*shape, dtype, scale=1.0):
    """Random normal values times ``scale``, on the kernels' device in ``dtype``."""
    return (torch.randn(*shape) * scale).to(device=KERNEL_DEVICE, dtype=dtype)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_no_worse_than_stock(ours, stock, truth, dtype, slack=1.1, what=""):
    """A low-precision result passes when its error against the fp32/fp64 truth is at most the stock
    module's error in the same dtype, times ``slack``, plus one ulp of the truth's scale."""
    ours_err, stock_err = max_err(ours, truth), max_err(stock, truth)
    margin = torch.finfo(dtype).eps * truth.double().abs().max().item()
    assert ours_err <= slack * stock_err + margin, (
        f"{what}: error {ours_err:.3e} vs stock {stock_err:.3e} (+margin {margin:.1e})"
    )


def saved_bytes(fn) -> int:
    """Bytes of the storages autograd keeps for the backward while ``fn()`` runs (each storage once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def compiled_saved_shapes(fn, *args) -> list[tuple]:
    """The shapes of what AOTAutograd's forward graph of ``fn(*args)`` (a scalar loss) keeps for the
    backward, under the min-cut partitioner torch.compile uses, sorted."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    saved = []

    def forward_graph(gm, _):
        (outputs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
        saved.extend(tuple(o.meta["val"].shape) for o in outputs[1:])  # after the loss
        return make_boxed_func(gm)

    backward_graph = lambda gm, _: make_boxed_func(gm)
    partition = min_cut_rematerialization_partition
    aot_function(fn, forward_graph, backward_graph, partition_fn=partition)(*args).backward()
    return sorted(saved)


def dynamo_graphs(model, **inputs) -> list:
    """The graphs dynamo captures for one compiled call ``model(**inputs)`` (fullgraph, run by eager)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(**inputs)
    torch._dynamo.reset()
    return graphs


def small_lce_tiles(monkeypatch) -> None:
    """Tiles of 16 x 32 on both load paths (TMA and pointers) of the loss's tile kernels."""
    tiles = importlib.import_module("chronipatch.ops._lce_tiles")
    for name in ("TILE", "TILE_PTR"):
        monkeypatch.setattr(tiles, name, (16, 32, 16, 4, 2, 1))


def hf_view(b: int, t: int, h: int, d: int, **kw) -> torch.Tensor:
    """A [B, H, T, D] view of a [B, T, H, D] buffer, as HF attention passes q and k."""
    return torch.randn(b, t, h, d, **kw).transpose(1, 2)


def rope_cos_sin(b, t, d, dtype=torch.float64, device="cpu"):
    """HF-style cos/sin [b, t, d] at random distinct positions per batch row."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    pos = torch.stack([torch.randperm(4 * t)[:t] for _ in range(b)]).double()
    emb = torch.cat([pos[..., None] * inv, pos[..., None] * inv], -1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)
