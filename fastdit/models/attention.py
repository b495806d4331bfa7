"""Self-attention backends for the DiT block.

Every backend computes softmax(q k^T / sqrt(hd)) v from the fused qkv projection
`qkv (N, T, 3, H, hd)` and returns `(N, T, H * hd)`:

  math        the reference: explicit scores, softmax, matmul (what fastdit.models.reference does)
  sdpa        torch.nn.functional.scaled_dot_product_attention (flash / cuDNN / memory-efficient on CUDA)
  sdpa_packed the same kernels; its backward writes dq, dk, dv into dqkv (N, T, 3, H, hd) with one copy
              (autograd's unbind + permute + reshape of `sdpa` make two: a stack, then a contiguous copy)
  flash_attn  FlashAttention 3 (flash_attn_interface) or 2 (flash_attn), fp16/bf16 on CUDA
  xformers    xformers.ops.memory_efficient_attention
  triton      fastdit's own FlashAttention-style Triton kernels (fastdit.kernels.flash_attention): q, k, v read
              from the qkv buffer as the projection wrote it, dqkv written in that layout (no copy either way),
              a head dim of 72 computed as 64 + 16 columns instead of one 128-wide tile. CUDA (or the Triton
              interpreter on CPU); a qkv that is not the projection's packed layout is copied to it first.
              Under torch.compile it runs sdpa (compile does not trace the kernels' launchers). On CUDA only
              with FASTDIT_ATTENTION_TRITON=1: an H100 run found a wrong output (TRITON_ON_CUDA_ENV below).
  auto        flash_attn where it can run and the input is CUDA fp16/bf16, else sdpa_packed on CUDA (measured
              faster than sdpa: docs/performance.md) and sdpa on the CPU

head_dim 72 (DiT-XL: 1152 / 16) works on all of them. probe() decides once per process which backends
can run: flash_attn and xformers must import and, on CUDA, pass one tiny bf16 call (an import can
succeed without working CUDA operators, e.g. xformers built for another torch); without CUDA they
cannot run. backend_status() gives each verdict with its reason. Asking for a backend that cannot run
raises a one-line ImportError with the reason (how to install it, when it is missing); asking
flash_attn for fp32 or CPU tensors raises too (no silent fallback for an explicit choice).
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "math", "sdpa", "sdpa_packed", "flash_attn", "xformers", "triton")
_INSTALL_HINT = {
    "flash_attn": "pip install 'fastdit[flash]' (flash-attn 2) or install flash-attn 3 (flash_attn_interface)",
    "xformers": "pip install 'fastdit[xformers]'",
}


# name -> imported module or None, and backend -> (ok, reason). Filled once by probe(), outside any
# torch.compile trace (the model calls it at construction), so forward() only does dict lookups, which
# compile traces without breaks.
_MODULES: Dict[str, object] = {}
_STATUS: Dict[str, Tuple[bool, str]] = {}
_IMPORT_ERRORS: Dict[str, str] = {}

# The tiny call that shows a library's CUDA operators run: (N, T, H, hd) with DiT-XL's head_dim 72.
_PROBE_SHAPE = (1, 16, 1, 72)


def _one_line(e: BaseException) -> str:
    """`Type: first line [... last line]` of an exception, for one-line reasons."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0][:200] if lines else ""
    if len(lines) > 1:
        text += " ... " + lines[-1][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _try_import(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            return None  # not installed
        _IMPORT_ERRORS[name] = _one_line(e)  # installed, but something it imports is missing
        return None
    except Exception as e:  # an ImportError or a broken binary extension
        _IMPORT_ERRORS[name] = _one_line(e)
        return None


def _probe_device() -> Optional[torch.device]:
    """The device of the probe's test calls: the current CUDA device, None without CUDA."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def _run_check(backend: str) -> Tuple[bool, str]:
    """(ok, reason) of one tiny bf16 call of an importable library on the probe device.

    An import can succeed without working CUDA operators (xformers built for another torch/CUDA,
    a flash-attn wheel for another GPU architecture); only a real call tells.
    """
    device = _probe_device()
    if device is None:
        return False, "needs a CUDA device and none is visible to torch"
    try:
        n, t, h, hd = _PROBE_SHAPE
        qkv = torch.linspace(-1, 1, n * t * 3 * h * hd, device=device).sin()  # no RNG draw
        qkv = qkv.view(n, t, 3, h, hd).to(torch.bfloat16)
        out = _LIBRARY_CALLS[backend](qkv)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if tuple(out.shape) != (n, t, h * hd) or not torch.isfinite(out).all():
            return False, "a test call returned a wrong shape or non-finite values"
    except Exception as e:  # noqa: BLE001 - any failure means the backend cannot run here
        return False, f"a test call failed ({_one_line(e)})"
    return True, ""


def probe() -> Dict[str, object]:
    """Import the optional attention libraries once, check that each one can run, remember both.

    Returns the imported modules by name (None where not importable); backend_status() gives the
    verdicts. A CUDA machine runs one tiny call per importable library on the current device.
    """
    if not _MODULES:
        for name in ("flash_attn_interface", "flash_attn", "xformers.ops"):
            _MODULES[name] = _try_import(name)
        _STATUS["math"] = (True, "")
        _STATUS["sdpa"] = ((True, "") if hasattr(F, "scaled_dot_product_attention")
                           else (False, f"torch {torch.__version__} has no scaled_dot_product_attention"))
        _STATUS["sdpa_packed"] = _STATUS["sdpa"]
        _STATUS["triton"] = _triton_status()
        for backend, modules in (("flash_attn", ("flash_attn_interface", "flash_attn")),
                                 ("xformers", ("xformers.ops",))):
            if any(_MODULES[m] is not None for m in modules):
                _STATUS[backend] = _run_check(backend)
            else:
                errors = [f"{m}: {_IMPORT_ERRORS[m]}" for m in modules if m in _IMPORT_ERRORS]
                _STATUS[backend] = (False, ("import failed: " + "; ".join(errors)) if errors
                                    else f"not installed ({_INSTALL_HINT[backend]})")
    return _MODULES


# The Triton attention on a CUDA device only with this set to 1: on an H100 (torch 2.11, triton 3.6, 2026-11-27) its
# forward gave a wrong output for qkv (2, 256, 3, 3, 72) bf16 (tests/test_models_attention.py, max error 0.64
# against 0.007 for the same math in bf16) while DiT-XL/2's full-size parity (16 heads) passed. benchmarks/gpu_check.py
# sets it so its GPU stages keep testing and timing the backend.
TRITON_ON_CUDA_ENV = "FASTDIT_ATTENTION_TRITON"


def _triton_status() -> Tuple[bool, str]:
    """(ok, reason) of the Triton attention kernels in this process: a CUDA device, or the interpreter."""
    try:
        from fastdit.kernels._common import INTERPRETED, interpreter_problem
    except Exception as e:  # noqa: BLE001 - triton missing or broken: the backend cannot run
        return False, f"the Triton kernels do not import ({_one_line(e)})"
    if torch.cuda.is_available():
        if os.environ.get(TRITON_ON_CUDA_ENV) == "1":
            return True, ""
        return False, (f"its kernels gave a wrong output on an H100 (T=256, 3 heads of 72, bf16; docs/performance.md, "
                       f"known issues), so it is off on CUDA until that is fixed; {TRITON_ON_CUDA_ENV}=1 runs it "
                       f"anyway (to debug or benchmark it)")
    if INTERPRETED:
        problem = interpreter_problem()
        return (False, problem) if problem else (True, "")
    return False, "needs a CUDA device (or the Triton interpreter: TRITON_INTERPRET=1 before triton is imported)"


def _flash_module():
    """(module, version) of the best importable FlashAttention, or (None, None)."""
    mods = probe()
    if mods["flash_attn_interface"] is not None:
        return mods["flash_attn_interface"], 3
    if mods["flash_attn"] is not None:
        return mods["flash_attn"], 2
    return None, None


def backend_status() -> Dict[str, Tuple[bool, str]]:
    """backend -> (ok, reason): whether it can run in this process, and why not ("" when it can)."""
    probe()
    return dict(_STATUS)


def available_backends() -> Dict[str, bool]:
    """backend -> whether it can run in this process (see backend_status for the reasons)."""
    return {name: ok for name, (ok, _) in backend_status().items()}


def _math(qkv: torch.Tensor) -> torch.Tensor:
    n, t, _, h, hd = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, T, hd)
    attn = ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (N, H, T, T)
    return (attn @ v).transpose(1, 2).reshape(n, t, h * hd)


def _sdpa(qkv: torch.Tensor) -> torch.Tensor:
    n, t, _, h, hd = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, T, hd), strided views
    out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, hd)
    return out.transpose(1, 2).reshape(n, t, h * hd)


def _inner_sdpa(ctx, qkv: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """SDPA of the strided q, k, v views of a detached qkv (N, T, 3, H, hd) in an inner autograd graph kept
    on ctx (SDPA's own backward runs from it: _inner_grads); returns the output as (N, T, H * hd)."""
    n, t, _, h, hd = qkv.shape
    with torch.enable_grad():
        leaf = qkv.detach().requires_grad_(requires_grad)
        q, k, v = leaf.permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, T, hd) views
        out = F.scaled_dot_product_attention(q, k, v)   # (N, H, T, hd)
    ctx.inner = (q, k, v, out)
    return out.detach().transpose(1, 2).reshape(n, t, h * hd)


def _inner_grads(ctx, dout: torch.Tensor):
    """(dq, dk, dv), each (N, H, T, hd), of the inner graph _inner_sdpa kept, for dout (N, T, H * hd)."""
    q, k, v, out = ctx.inner
    del ctx.inner
    n, h, t, hd = out.shape
    return torch.autograd.grad(out, (q, k, v), dout.reshape(n, t, h, hd).transpose(1, 2))


class _PackedSDPA(torch.autograd.Function):
    """SDPA of the strided q, k, v views of qkv (N, T, 3, H, hd); the backward returns dqkv in qkv's own
    layout, written by one stack of dq, dk, dv (an inner autograd graph gives SDPA's own backward)."""

    @staticmethod
    def forward(ctx, qkv):
        return _inner_sdpa(ctx, qkv, qkv.requires_grad)

    @staticmethod
    def backward(ctx, dout):
        dq, dk, dv = _inner_grads(ctx, dout)
        return torch.stack([g.transpose(1, 2) for g in (dq, dk, dv)], dim=2)  # (N, T, 3, H, hd), one copy


def _sdpa_packed(qkv: torch.Tensor) -> torch.Tensor:
    # Inference needs no backward; under torch.compile the inner autograd graph cannot be traced (seen:
    # "One of the differentiated Tensors appears to not have been used in the graph"), and compile
    # removes the copies itself: both run plain sdpa.
    if not qkv.requires_grad or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return _sdpa(qkv)
    return _PackedSDPA.apply(qkv)


class _PackedQKVAttention(torch.autograd.Function):
    """qkv projection + SDPA (as _PackedSDPA) in one function, whose backward stacks dq, dk, dv into dqkv
    and sums its columns for the projection's bias in the same pass (`stack_grads`, e.g. the Triton
    kernels/qkv_grads.py op), then runs the projection's two GEMMs: no separate bias reduction."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_heads, stack_grads):
        n, t, _ = x.shape
        qkv = F.linear(x, weight, bias)                  # the bias in the GEMM's epilogue, as nn.Linear
        ctx.save_for_backward(x, weight)
        ctx.stack_grads = stack_grads
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return _inner_sdpa(ctx, qkv.view(n, t, 3, num_heads, weight.shape[0] // (3 * num_heads)), True)

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        dqkv, db = ctx.stack_grads(*_inner_grads(ctx, dout))   # (N, T, 3, H, hd) contiguous, (3 H hd,) fp32
        return _projection_grads(ctx, x, weight, dqkv, db) + (None, None)


def _projection_grads(ctx, x: torch.Tensor, weight: torch.Tensor, dqkv: torch.Tensor, db: torch.Tensor):
    """(dx, dweight, dbias) of the qkv projection of x by weight from dqkv (N, T, 3, H, hd) contiguous and its
    column sums db (fp32), for the inputs that need a gradient (ctx.needs_input_grad; ctx.saved_tensors is left
    to the caller: under activation checkpointing it may be read once only)."""
    rows = x.shape[0] * x.shape[1]
    g2 = dqkv.view(rows, -1)
    dx = g2.mm(weight).view(x.shape) if ctx.needs_input_grad[0] else None
    dw = g2.t().mm(x.reshape(rows, -1)) if ctx.needs_input_grad[1] else None
    db = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
    return dx, dw, db


class _TritonQKVAttention(torch.autograd.Function):
    """qkv projection + the Triton attention (backend `triton`) in one function: the attention's backward
    kernels write dqkv in the projection's layout and its column sums as they go, so the projection's bias
    gradient needs no separate reduction; then the projection's two GEMMs."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_heads):
        from fastdit.kernels.flash_attention import attention_fwd
        n, t, _ = x.shape
        qkv = F.linear(x, weight, bias).view(n, t, 3, num_heads, weight.shape[0] // (3 * num_heads))
        out, lse = attention_fwd(qkv)
        ctx.save_for_backward(x, weight, qkv, out, lse)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, dout):
        from fastdit.kernels.flash_attention import attention_bwd
        x, weight, qkv, out, lse = ctx.saved_tensors
        dqkv, db = attention_bwd(dout, qkv, out, lse, bias_sums=True)
        return _projection_grads(ctx, x, weight, dqkv, db) + (None,)


def projected_attention(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], num_heads: int,
                        backend: str = "sdpa", stack_grads: Optional[Callable] = None) -> torch.Tensor:
    """attention(F.linear(x, weight, bias) as (N, T, 3, H, hd), backend) -> (N, T, H * hd).

    With `stack_grads(dq, dk, dv) -> (dqkv, column sums)` (fastdit.kernels.qkv_grads; the model passes it with
    bias_fold) and a backend that resolves to sdpa_packed, a training forward runs _PackedQKVAttention: the
    same values and gradients, with the projection's bias gradient taken from the pass that assembles dqkv.
    With stack_grads and the backend `triton`, _TritonQKVAttention: the bias gradient from the attention's own
    backward kernels. Every other case (another backend, no gradient, autocast, torch.compile, no
    stack_grads) is the plain projection + attention().
    """
    n, t, _ = x.shape
    if stack_grads is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling() \
            and not torch.is_autocast_enabled(x.device.type) \
            and any(a is not None and a.requires_grad for a in (x, weight, bias)):
        resolved = resolve_backend(backend, x.device, x.dtype) if backend == "auto" else backend
        if resolved == "sdpa_packed":
            return _PackedQKVAttention.apply(x, weight, bias, num_heads, stack_grads)
        if resolved == "triton":
            return _TritonQKVAttention.apply(x, weight, bias, num_heads)
    qkv = F.linear(x, weight, bias).view(n, t, 3, num_heads, weight.shape[0] // (3 * num_heads))
    return attention(qkv, backend)


def _check_half_cuda(qkv: torch.Tensor, backend: str):
    if not qkv.is_cuda:
        raise ValueError(f"attention backend {backend!r} needs CUDA tensors; use 'sdpa' or 'math' on CPU")
    if qkv.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention backend {backend!r} takes fp16/bf16, got {qkv.dtype}; "
                         "train in bf16 or use 'sdpa'")


def _flash_call(qkv: torch.Tensor) -> torch.Tensor:
    mod, version = _flash_module()
    n, t, _, h, hd = qkv.shape
    if version == 3:
        q, k, v = qkv.unbind(2)  # (N, T, H, hd)
        out = mod.flash_attn_func(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
    else:
        out = mod.flash_attn_qkvpacked_func(qkv)  # (N, T, H, hd)
    return out.reshape(n, t, h * hd)


def _xformers_call(qkv: torch.Tensor) -> torch.Tensor:
    xops = probe()["xformers.ops"]
    n, t, _, h, hd = qkv.shape
    q, k, v = qkv.unbind(2)  # (N, T, H, hd)
    return xops.memory_efficient_attention(q, k, v).reshape(n, t, h * hd)


def _triton(qkv: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _sdpa(qkv)
    from fastdit.kernels.flash_attention import flash_attention, packed
    return flash_attention(qkv if packed(qkv) else qkv.contiguous())


# The libraries' own calls, without fastdit's input checks (the probe calls these).
_LIBRARY_CALLS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "flash_attn": _flash_call, "xformers": _xformers_call,
}


def _flash(qkv: torch.Tensor) -> torch.Tensor:
    _check_half_cuda(qkv, "flash_attn")
    return _flash_call(qkv)


def _xformers(qkv: torch.Tensor) -> torch.Tensor:
    if not qkv.is_cuda:
        raise ValueError("attention backend 'xformers' needs CUDA tensors; use 'sdpa' or 'math' on CPU")
    return _xformers_call(qkv)


_IMPLS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "math": _math, "sdpa": _sdpa, "sdpa_packed": _sdpa_packed, "flash_attn": _flash, "xformers": _xformers,
    "triton": _triton,
}


def resolve_backend(name: str, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> str:
    """Validate a backend name and turn 'auto' into a concrete backend for a device/dtype."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    status = backend_status()
    if name == "auto":
        is_cuda = device is not None and torch.device(device).type == "cuda"
        half = dtype in (torch.float16, torch.bfloat16)
        if is_cuda and half and status["flash_attn"][0]:
            return "flash_attn"
        # sdpa_packed on CUDA: measured 587 vs 542 img/s for sdpa (DiT-XL/2, H100, batch 128, bf16;
        # benchmarks/results/h100-2026-11-26-5843182); CPU keeps plain sdpa (not measured there)
        return "sdpa_packed" if is_cuda else "sdpa"
    ok, why = status[name]
    if not ok:
        raise ImportError(f"attention backend {name!r} cannot run here: {why}")
    return name


def attention(qkv: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Self-attention of a fused projection qkv (N, T, 3, H, hd) -> (N, T, H * hd)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention expects qkv of shape (N, T, 3, H, hd), got {tuple(qkv.shape)}")
    if backend == "auto" or backend in ("flash_attn", "xformers", "triton"):
        backend = resolve_backend(backend, qkv.device, qkv.dtype)  # cached probe; raises if it cannot run
    elif backend not in _IMPLS:
        resolve_backend(backend)  # raises the unknown-name error
    return _IMPLS[backend](qkv)
