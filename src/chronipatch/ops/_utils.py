"""Small helpers shared by the op files: argument checks and device facts."""

from __future__ import annotations

import contextlib
import functools
import math
import re
import weakref

import torch
from torch import Tensor


def check(cond: bool, op: str, msg) -> None:
    """Raise a ValueError naming the op when ``cond`` is false. ``msg`` is a string or, to keep the
    per-call cost of the eager path low, a function that formats it only on failure."""
    if not cond:
        raise ValueError(f"chronipatch.ops.{op}: {msg() if callable(msg) else msg}")


def check_tensors(op: str, **values) -> None:
    """Every argument is a tensor (a TypeError naming it otherwise)."""
    for name, value in values.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"chronipatch.ops.{op}: {name} must be a torch.Tensor, got {type(value).__name__}"
            )


def check_same(op: str, **tensors: torch.Tensor) -> None:
    """All tensors share one device and one floating dtype (types: ``check_tensors``, called first)."""
    if same_floats(*tensors.values()):
        return
    names = list(tensors)
    first = tensors[names[0]]
    check(first.is_floating_point(), op, lambda: f"{names[0]} must be floating point, got {first.dtype}")
    for name in names[1:]:
        t = tensors[name]
        check(
            t.device == first.device,
            op,
            lambda name=name, t=t: f"{name} is on {t.device} but {names[0]} is on {first.device}",
        )
        check(
            t.dtype == first.dtype,
            op,
            lambda name=name, t=t: f"{name} has dtype {t.dtype} but {names[0]} has {first.dtype}",
        )


def same_floats(first, *others) -> bool:
    """Whether all are tensors on the first's device with its floating dtype: the checks' fast path, which
    builds no names and no messages (the named checks run only where this is False, to say what is wrong)."""
    if not isinstance(first, torch.Tensor) or not first.is_floating_point():
        return False
    dtype, device = first.dtype, first.device
    return all(isinstance(t, torch.Tensor) and t.dtype == dtype and t.device == device for t in others)


# Per op (torch versions added ``out_dtype`` to mm and addmm apart): whether it took one; None until tried.
OUT_DTYPE_GEMMS: dict[str, bool | None] = {"mm": None, "addmm": None}


def _out_dtype_gemm(name: str, gemm) -> Tensor | None:
    """``gemm()``, the cuBLAS GEMM ``name`` of low-precision operands with an ``out_dtype``; None where this
    torch has none for it (remembered). Other errors (an earlier kernel's, reported late) are raised, not
    taken for that."""
    if OUT_DTYPE_GEMMS[name] is False:
        return None
    try:
        out = gemm()
    except torch.OutOfMemoryError:
        raise
    except (TypeError, NotImplementedError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "dtype" not in str(e):
            raise
        OUT_DTYPE_GEMMS[name] = False
        return None
    OUT_DTYPE_GEMMS[name] = True
    return out


def addmm_acc(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with fp32 accumulation for low-precision a, b (in place: no [N, H] temporary)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    gemm = functools.partial(torch.addmm, acc, a, b, out_dtype=acc.dtype, out=acc)
    if not (a.is_cuda and _out_dtype_gemm("addmm", gemm) is not None):
        acc.addmm_(a.float(), b.float())


def mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in fp32 from low-precision a, b: on CUDA cuBLAS writes the fp32 result itself (no zeroed buffer
    filled, then read and added into); elsewhere ``addmm_acc`` into zeros."""
    gemm = functools.partial(torch.mm, a, b, out_dtype=torch.float32)
    out = _out_dtype_gemm("mm", gemm) if a.is_cuda else None
    if out is None:
        out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
        addmm_acc(out, a, b)
    return out


# A fixed device list, not torch.amp.is_autocast_available: dynamo (torch 2.11) cannot trace that call.
_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")


def autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype autocast would cast ``t``'s device's matmul inputs to, or None outside autocast."""
    device = t.device.type
    if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def autocast_like_linear(dtype: torch.dtype | None, *tensors: Tensor | None):
    """The tensors as ``F.linear`` under autocast to ``dtype`` sees them: floating ones but fp64 cast."""
    if dtype is None:
        return tensors
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def saveable(t: Tensor, *others: Tensor | None) -> Tensor:
    """``t``, or a copy where it is an inference tensor that the op would save for the gradient of
    ``others``: autograd cannot save one, and stock, which saves a result computed from it, trains."""
    if (
        torch.compiler.is_compiling()  # first: dynamo cannot trace is_inference()
        or not t.is_inference()
        or not torch.is_grad_enabled()
        or not any(o is not None and o.requires_grad for o in others)
    ):
        return t
    return t.clone()


def as_rows(t: Tensor) -> Tensor:
    """``t`` as [rows, last dim]: ``reshape(-1, n)``, which cannot infer the row count where n is 0."""
    return t.reshape(-1, t.shape[-1]) if t.shape[-1] else t.reshape(math.prod(t.shape[:-1]), 0)


def unit_stride(w):
    """A norm weight the kernels can index densely: itself, or for a strided view (every element read
    apart) a copy that autograd sees. Anything else is left for the checks to name."""
    return w.contiguous() if isinstance(w, Tensor) and w.dim() == 1 and w.stride(0) != 1 else w


def last_dense(x: Tensor) -> Tensor:
    """``x`` itself when its last dim has unit stride (what the kernels index by), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def on_gpu(t: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors; every other device, and fp64, runs the torch reference
    (the kernels compute in fp32)."""
    return t.is_cuda and t.dtype is not torch.float64


def eager_cuda(*tensors: torch.Tensor) -> bool:
    """Whether a public op may launch its kernels through a plain ``autograd.Function``.

    Custom-op dispatch costs ~80 us of CPU per call in eager mode, more than the kernels it
    wraps. The direct path runs the same launchers (bit-identical results) and is taken only for
    plain CUDA tensors (no subclass: fake, functional, DTensor) outside ``torch.compile`` tracing,
    functorch transforms and dispatch modes, where the registered op must be seen.
    """
    return (
        all(type(t) in PLAIN and on_gpu(t) for t in tensors)
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and torch._C._len_torch_dispatch_stack() == 0
    )


PLAIN = (torch.Tensor, torch.nn.Parameter)
HALF = (torch.bfloat16, torch.float16)  # the 16-bit float dtypes


def last_use(*tensors: Tensor) -> bool:
    """Whether this eager backward is the last to read its saved tensors: plain tensors (not traced), no graph
    recorded, and the engine frees the graph after it (outside a backward the engine's flag reads True)."""
    return (
        all(type(t) is torch.Tensor for t in tensors)
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and not torch._C._autograd._get_current_graph_task_keep_graph()
    )


def once_differentiable(backward):
    """``torch.autograd.function.once_differentiable`` where it acts: a backward that records a graph
    (``create_graph=True``: grad mode on) runs through it, so its gradients refuse a second derivative; the
    usual backward (grad mode off) calls ``backward`` as it is, without the wrapper's ``no_grad`` context
    (3.4 us a call against 0.1 on a CPU; within the noise of bench/rope_host.py on the H100 hosts)."""
    guarded = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def run(ctx, *grads):
        return guarded(ctx, *grads) if torch.is_grad_enabled() else backward(ctx, *grads)

    return run


def direct(launcher):
    """``launcher`` launching its kernels straight away (``wrap=False``) instead of through the
    higher-order-op dispatch (~200 us per launch) that only tracing needs. For the eager fast path."""

    @functools.wraps(launcher)
    def run(x, *args, **kwargs):
        # Triton launches on the current device: follow the input's (models split over GPUs). Switching
        # costs a context manager per call, so only when it differs (-1: a CPU tensor, in the interpreter).
        index = x.get_device()
        if index < 0 or index == torch.cuda.current_device():
            return launcher(x, *args, wrap=False, **kwargs)
        with torch.cuda.device(index):
            return launcher(x, *args, wrap=False, **kwargs)

    return run


# Per-forward memo keyed by tensor identity (``memoized``): tensors every layer of a forward shares (masks,
# cu_seq_lens) derive their per-forward values once.
memo: dict[int, tuple[weakref.ref, object]] = {}


def memoized(t: torch.Tensor, key: tuple, compute):
    # Computed each time while compiling (a graph keeps no memo; checked first: dynamo cannot trace
    # is_inference()) and for inference tensors (no version counter to tell an edited tensor by).
    if torch.compiler.is_compiling() or t.is_inference():
        return compute()
    # The version counter changes on every in-place write, so an edited tensor is checked again.
    key = (*key, t._version)
    hit = memo.get(id(t))
    if hit is not None and hit[0]() is t and hit[1][0] == key:
        return hit[1][1]
    value = compute()
    if len(memo) > 16:
        memo.clear()
    memo[id(t)] = (weakref.ref(t, _forget), (key, value))
    return value


def _forget(ref: weakref.ref) -> None:
    """Drop a memo entry when its tensor dies, so no derived tensor outlives the forward."""
    for k, (r, _) in list(memo.items()):
        if r is ref:
            memo.pop(k, None)


def device_of(t: torch.Tensor):
    """The CUDA device context of ``t`` (Triton launches on the current device), or a no-op elsewhere."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# Compute capabilities of the parts whose fp64 GEMMs run at their fp32 (non-TF32) rate: A100, H100/H200.
# P100/V100/B200 run fp64 at half rate, consumer parts at 1/32-1/64. Two sm_90 export parts have their fp64
# cut to about 1 TFLOP/s and are told apart by name.
FAST_FP64 = frozenset({(8, 0), (9, 0)})
_SLOW_FP64_NAMES = re.compile(r"\bH(20|800)\b")


@functools.cache
def fast_fp64(index: int) -> bool:
    """Whether device ``index`` runs fp64 GEMMs as fast as fp32 ones (see ``FAST_FP64``)."""
    name = torch.cuda.get_device_name(index)
    return torch.cuda.get_device_capability(index) in FAST_FP64 and not _SLOW_FP64_NAMES.search(name)


def tf32_matmuls() -> bool:
    """Whether fp32 CUDA matmuls may run in TF32. Read through the precision API that the legacy flags
    (``allow_tf32``, ``set_float32_matmul_precision``) also set; the legacy getters raise once it was used."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch without the precision API
        return bool(matmul.allow_tf32)
    if precision == "none":  # inherits the global setting
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"


@functools.cache
def num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def sms_for(t: torch.Tensor) -> int:
    # CPU tensors reach the kernels only under TRITON_INTERPRET (tests); any width works there.
    return num_sms(t.device.index or 0) if on_gpu(t) else 4


# triton.cdiv / next_power_of_2 are ConstexprFunctions: ~2-4 us of dispatch per call from Python, paid on
# every eager launch. Plain integer math instead (cdiv's also serves symbolic sizes).


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def pow2(n: int) -> int:
    """The power of 2 at or above n (n itself below 2), a plain int. It sizes kernel constants, so a symbolic
    size is specialized first (a guard on its value): triton's bit arithmetic on one built sympy expressions
    that doubled at each step (tracing rope under dynamic shapes ran for minutes)."""
    n = int(n)
    return n if n <= 1 else 1 << (n - 1).bit_length()
