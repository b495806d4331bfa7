"""Shared helpers of the fastdit kernels: input checks, output allocation, launch heuristics.

Nothing here launches a kernel. The op files (modulate_layernorm.py, gated_residual.py,
patch_embed.py) import these so that every launcher checks its inputs the same way and raises the
same kind of error for the same kind of bad input:

* TypeError  - an argument that is not a tensor, or a dtype the kernels do not take
               (anything but float32 / bfloat16 / float16: integers, bool, float64, complex, fp8).
* ValueError - wrong number of dimensions, mismatched shapes, tensors on different devices,
               a device Triton cannot run on (CPU tensors without TRITON_INTERPRET=1),
               a hidden size D above KERNEL_MAX_D, or a patch size that does not divide the image.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Iterable, Optional, Tuple

import numpy as np
import torch
import triton

# Largest hidden size D one program of the row kernels holds in registers (BLOCK_D = next power of
# two of D). DiT uses D <= 1152; 8192 leaves room for wider models without spilling on Hopper.
KERNEL_MAX_D = 8192

# Floating dtypes the kernels load; everything is computed in fp32 inside a kernel.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Set FASTDIT_KERNEL_POISON=1 to fill every kernel output with NaN before launch, so an element a
# kernel forgets to write shows up as NaN instead of as stale memory. The tests set it.
POISON_ENV = "FASTDIT_KERNEL_POISON"


@triton.jit
def _probe_kernel(ptr):
    # ptr: unused; this kernel is never launched, it only tells which runtime triton.jit built.
    pass


# True when triton.jit builds interpreted kernels (TRITON_INTERPRET=1 was set before triton was
# imported): kernels then run on CPU tensors through numpy, one program at a time.
INTERPRETED = type(_probe_kernel).__name__ == "InterpretedFunction"


def _triton_version() -> Tuple[int, int]:
    """(major, minor) of the installed triton, e.g. (3, 6) for '3.6.0' or '3.6.0+git1234'."""
    m = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _fix_interpreter_index() -> bool:
    """Let a scalar kernel argument bound a loop (`range(0, K, BLOCK_K)`) in the interpreter of
    triton < 3.7 under NumPy >= 2.4.

    Those interpreters hold a scalar argument as a shape-(1,) array and turn it into a Python int
    for `range` with int(array), which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be
    converted to Python scalars"). Triton 3.7 squeezes the array first; this installs the same
    conversion, under the interpreter only (GPU code generation never sees it). Returns whether
    it was installed.
    """
    if not INTERPRETED or _triton_version() >= (3, 7):
        return False
    from triton.runtime import interpreter
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_fastdit_index_fix", False):
        return False

    def index(self):
        return int(self.handle.data.squeeze())

    def patched(tensor, *scope):
        patch_tensor(tensor, *scope)            # triton 3.6 passes a scope that undoes the patches
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patched._fastdit_index_fix = True
    interpreter._patch_lang_tensor = patched
    return True


INTERPRETER_INDEX_FIXED = _fix_interpreter_index()


def interpreter_problem() -> Optional[str]:
    """Why the Triton interpreter of this install would compute wrong results, or None.

    The interpreters of triton 3.0 and 3.1 silently drop every store under NumPy 2 (outputs keep
    whatever was in memory); fastdit declares triton >= 3.3, but a forced install could still have them.
    """
    if _triton_version() < (3, 2) and int(np.__version__.split(".")[0]) >= 2:
        return (f"the Triton interpreter of triton {triton.__version__} drops stores under NumPy "
                f"{np.__version__}; fastdit needs triton >= 3.3")
    return None


def poison_enabled() -> bool:
    """Whether launchers fill their outputs with NaN before launch (FASTDIT_KERNEL_POISON=1)."""
    return os.environ.get(POISON_ENV, "0") not in ("", "0")


def alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer: torch.empty, or NaN-filled when poisoning is on."""
    if poison_enabled():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------
def device_reason(device: torch.device) -> Optional[str]:
    """Why Triton cannot run on `device` in this process, or None when it can."""
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if INTERPRETED:
            return interpreter_problem()
        return ("CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before triton is "
                "imported); use the PyTorch path instead")
    return f"device type {device.type!r} is not supported by the Triton kernels (cuda only)"


def check_tensor(name: str, t, ndim: int) -> None:
    """Raise TypeError/ValueError unless `t` is a floating tensor of a supported dtype and rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the fastdit kernels take float32, bfloat16 "
                        f"or float16")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_same_device(named: Iterable[Tuple[str, torch.Tensor]]) -> torch.device:
    """Raise ValueError unless all tensors share one device that Triton can run on."""
    named = [(n, t) for n, t in named if t is not None]
    device = named[0][1].device
    for n, t in named[1:]:
        if t.device != device:
            raise ValueError(f"{n} is on {t.device} but {named[0][0]} is on {device}; all inputs "
                             f"of a fastdit kernel must be on the same device")
    reason = device_reason(device)
    if reason is not None:
        raise ValueError(reason)
    return device


def check_hidden(name: str, d: int) -> None:
    """Raise ValueError unless 1 <= d <= KERNEL_MAX_D."""
    if d < 1:
        raise ValueError(f"{name} has an empty hidden dimension")
    if d > KERNEL_MAX_D:
        raise ValueError(f"hidden size D={d} of {name} is above KERNEL_MAX_D={KERNEL_MAX_D}, the "
                         f"largest row the fastdit kernels hold in one program")


def check_rows(x_name: str, x: torch.Tensor, others) -> None:
    """Check a (N, T, D) activation and its (N, D) modulation / (N, T, D) companions.

    `others` is a list of (name, tensor, kind) with kind "ND" (per-sample vector), "D" (one vector
    for every row, e.g. a bias) or "NTD".
    """
    check_tensor(x_name, x, 3)
    n, _, d = x.shape
    for name, t, kind in others:
        if kind == "D":
            check_tensor(name, t, 1)
            if tuple(t.shape) != (d,):
                raise ValueError(f"{name} must have shape (D,) = {(d,)} to match {x_name} "
                                 f"{tuple(x.shape)}, got {tuple(t.shape)}")
        elif kind == "ND":
            check_tensor(name, t, 2)
            if tuple(t.shape) != (n, d):
                raise ValueError(f"{name} must have shape (N, D) = {(n, d)} to match {x_name} "
                                 f"{tuple(x.shape)}, got {tuple(t.shape)}")
        else:
            check_tensor(name, t, 3)
            if t.shape != x.shape:
                raise ValueError(f"{name} must have the shape of {x_name} {tuple(x.shape)}, got "
                                 f"{tuple(t.shape)}")
    check_hidden(x_name, d)
    check_same_device([(x_name, x)] + [(name, t) for name, t, _ in others])


def stride_unit(tensors, dims) -> int:
    """The unit (8 or 1) in which a launcher passes the strides `dims` of `tensors`, for kernels that multiply
    them back by a STRIDE_UNIT constexpr: 8 when every tensor starts 16-byte aligned and each of those strides is
    a multiple of 8 elements below 2**31, else 1.

    The JIT marks an integer argument only when it is a multiple of 16; a stride that is a multiple of 8 but not
    16 (DiT-XL's head dim 72, a 3-head qkv row of 648) is otherwise unmarked, and the compiler emits 2-byte
    accesses without cp.async pipelining. Passed as stride / 8 and multiplied back by a constant, it shows the
    compiler 16-byte rows. A stride of 2**31 or more stays as it is: its eighth would pass as int32 and the
    product would wrap."""
    return 8 if all(t.data_ptr() % 16 == 0 and all(t.stride(d) % 8 == 0 and t.stride(d) < 2 ** 31 for d in dims)
                    for t in tensors) else 1


def promote(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype PyTorch's type promotion gives for an elementwise op over these dtypes."""
    out = dtypes[0]
    for dt in dtypes[1:]:
        out = torch.promote_types(out, dt)
    return out


def kernels_supported(x, *others) -> Tuple[bool, str]:
    """Whether the fused row kernels take activation `x` (N, T, D) (and tensors `others`).

    Returns (True, "") or (False, reason). Checks: tensor type, supported float dtype, 3-D shape,
    D <= KERNEL_MAX_D, every tensor on x's device, and a device Triton can run on here (CUDA, or
    CPU under TRITON_INTERPRET=1). Shape agreement between x and the others is checked by each op.
    """
    try:
        check_tensor("x", x, 3)
        check_hidden("x", x.shape[-1])
        for i, t in enumerate(others):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"input {i + 1} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"input {i + 1} has dtype {t.dtype}; the fastdit kernels take "
                                f"float32, bfloat16 or float16")
        check_same_device([("x", x)] + [(f"input {i + 1}", t) for i, t in enumerate(others)])
    except (TypeError, ValueError) as e:
        return False, str(e)
    return True, ""


# ----------------------------------------------------------------------------------------------
# Launch heuristics (written for Hopper; the interpreter ignores num_warps)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _cuda_smem_optin(index: int) -> Optional[int]:
    props = torch.cuda.get_device_properties(index)
    value = getattr(props, "shared_memory_per_block_optin", None)   # torch's name for the opt-in limit
    if value:
        return int(value)
    try:                                                             # Triton's own reading of it
        from triton.runtime import driver
        return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - unknown: callers then keep their smaller default
        return None


def shared_memory_per_block(device: torch.device) -> Optional[int]:
    """Bytes of shared memory one program may use on a CUDA device (the opt-in limit: 227 KB on an H100,
    ~99 KB on consumer Ada/Blackwell parts), None where unknown or not CUDA."""
    if device.type != "cuda":
        return None
    return _cuda_smem_optin(device.index if device.index is not None else torch.cuda.current_device())


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 2 under the interpreter (keeps grids small)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 2


def row_tile(d: int) -> Tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) for the row kernels: a tile of BLOCK_T tokens x BLOCK_D.

    BLOCK_D covers the whole row (next power of two of D) so the LayerNorm statistics come from
    one register tile; BLOCK_T rows share one load of the (N, D) modulation vectors and bring the
    tile to ~4096 elements (16 values per thread at 8 warps; 16 warps for 8192-wide rows).
    Compiled for sm_90 with the JIT's specialisation (unit stride along D), these tiles give
    128-bit row-tile accesses and no register spills up to D = 8192 (checked by _sm90_check.py;
    at D = 384 the (N, D) vectors are 2 elements per thread, so they load 4 bytes at a time).
    """
    block_d = triton.next_power_of_2(d)
    block_t = max(1, min(16, 4096 // block_d))
    elems = block_t * block_d
    num_warps = 4 if elems <= 1024 else (8 if elems <= 4096 else 16)
    return block_t, block_d, num_warps


# Values a `num_warps` override may take: what Triton compiles (a power of two, at most 32 warps).
NUM_WARPS_CHOICES = (1, 2, 4, 8, 16, 32)


def check_num_warps(num_warps) -> None:
    """Raise ValueError unless `num_warps` is None or a power of two in 1..32 (an int, not a bool)."""
    if num_warps is None:
        return
    if isinstance(num_warps, bool) or not isinstance(num_warps, int) or num_warps not in NUM_WARPS_CHOICES:
        raise ValueError(f"num_warps must be None (the row_tile heuristic) or a power of two in 1..32, "
                         f"got {num_warps!r}")


# Values a `num_stages` override of the backward kernels' token loop may take. 1 (the default) is a plain
# loop: each step loads its rows, reduces, stores, then the next step loads. 2-4 let Triton's pipeliner
# (tl.range(..., num_stages=k)) issue the next k - 1 steps' row loads into shared memory (cp.async) while a
# step computes: more bytes in flight per program, for k - 1 more row tiles of shared memory.
NUM_STAGES_CHOICES = (1, 2, 3, 4)


def loop_stages(num_stages: Optional[int]) -> int:
    """The token loop's pipeline depth for a backward launch: `num_stages` checked, or 1 for None."""
    if num_stages is None:
        return 1
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages not in NUM_STAGES_CHOICES:
        raise ValueError(f"num_stages must be None (a plain loop) or one of {NUM_STAGES_CHOICES}, "
                         f"got {num_stages!r}")
    return num_stages


def launch_tile(d: int, block_t: Optional[int] = None,
                num_warps: Optional[int] = None) -> Tuple[int, int, int]:
    """row_tile(d) with a launcher's overrides applied: (BLOCK_T, BLOCK_D, num_warps).

    None (or 0 for block_t, as before) keeps row_tile's choice; num_warps is checked by
    check_num_warps. BLOCK_D is never overridden (it must cover the whole row).
    """
    check_num_warps(num_warps)
    bt, block_d, nw = row_tile(d)
    return block_t or bt, block_d, num_warps if num_warps is not None else nw


def token_tiles(n: int, t: int, block_t: int, device: torch.device,
                tokens_per_tile: Optional[int] = None, sms: Optional[int] = None,
                programs_per_sm: int = 4) -> Tuple[int, int, int]:
    """Split each sample's T tokens into tiles for a backward kernel with per-tile partial sums.

    Returns (tokens_per_tile, n_iters, n_tiles): each program loops n_iters times over BLOCK_T rows
    of one sample, so tokens_per_tile = n_iters * block_t. By default aims at ~`programs_per_sm`
    programs per SM (`sms` of them, else those of `device`; _sm90_check.py passes an H100's count).
    With no tokens (t = 0) there are no tiles: (block_t, 1, 0), and the launchers skip the kernel.
    """
    if t <= 0:
        return block_t, 1, 0
    if tokens_per_tile is None:
        want_tiles = max(1, triton.cdiv(programs_per_sm * (sms or num_sms(device)), max(n, 1)))
        want_tiles = min(want_tiles, triton.cdiv(t, block_t))
        n_iters = triton.cdiv(triton.cdiv(t, want_tiles), block_t)
    else:
        n_iters = max(1, triton.cdiv(tokens_per_tile, block_t))
    tok = n_iters * block_t
    return tok, n_iters, triton.cdiv(t, tok)


# Programs per SM for the column-sum kernels (kernels/gelu.py, kernels/qkv_grads.py): many short programs.
# The row kernels' ~4 gave DiT-XL/2's fc1 shape (32768 x 4608) 540 GELU programs, ~4 per SM where 7 fit
# (_sm90_check.py): too few warps to keep loads in flight; 24 gives it ~3.4 waves of 7, and the qkv stack
# (3 resident per SM) ~7 waves, so the last wave is a small part of the run.
COLUMN_KERNEL_PROGRAMS_PER_SM = 24


# How the column-sum kernels (kernels/gelu.py, kernels/qkv_grads.py) add up their rows: "step" (the default)
# sums each loop step's rows into a per-column vector, a reduction across the program's warps with barriers
# inside the loop (the sm_90 SASS with triton 3.9: 24 of the qkv stack's 36 barriers, 8 of the GELU backward's 10;
# with the GPU machine's 3.6: 9 and 3, and the stack at 159 registers, one program per SM); "once" adds
# each step's tile element-wise into a tile-shaped fp32 accumulator and reduces it once after the loop (no
# barrier in the loop, more registers). Read at each call. Both add the same fp32 values, in another order.
COLUMN_SUMS_ENV = "FASTDIT_COLUMN_SUMS"
COLUMN_SUMS_CHOICES = ("step", "once")


def column_sums_once() -> bool:
    """Whether the column-sum kernels reduce their tiles once, after the loop (FASTDIT_COLUMN_SUMS=once);
    "step" when unset."""
    return env_choice(COLUMN_SUMS_ENV, COLUMN_SUMS_CHOICES) == "once"


def column_tiles(rows: int, n_col_tiles: int, block_rows: int, device: torch.device,
                 rows_per_tile: Optional[int] = None, sms: Optional[int] = None) -> Tuple[int, int, int]:
    """(rows_per_tile, n_iters, n_row_tiles) for a kernel over a (column tile, row tile) grid that writes
    per-row-tile column sums: token_tiles with the column tiles in the role of the samples, aiming at
    COLUMN_KERNEL_PROGRAMS_PER_SM programs per SM (`sms` overrides the device's count, for the offline
    sm_90 check)."""
    return token_tiles(max(n_col_tiles, 1), rows, block_rows, device, rows_per_tile, sms=sms,
                       programs_per_sm=COLUMN_KERNEL_PROGRAMS_PER_SM)


# ----------------------------------------------------------------------------------------------
# Dispatch: through torch.library (default) or, in eager mode, straight to the launchers
# ----------------------------------------------------------------------------------------------
DISPATCH_ENV = "FASTDIT_KERNEL_DISPATCH"
DISPATCH_CHOICES = ("library", "direct")
_DISPATCH_OVERRIDE: list = []   # kernel_dispatch()'s stack; it wins over the environment


def env_choice(var: str, choices: Tuple[str, ...]) -> str:
    """The value of the kernels' environment switch `var`, choices[0] (the default) when unset; a ValueError in
    one line for any other value. Read at each call, so a switch can change between calls."""
    value = os.environ.get(var, choices[0])
    if value not in choices:
        raise ValueError(f"{var}={value!r}; choose one of {choices}")
    return value


def direct_dispatch() -> bool:
    """Whether the public ops run as plain autograd.Functions over their launchers (the same kernels, the same
    backward) instead of through their torch.library ops: FASTDIT_KERNEL_DISPATCH=direct (or a
    kernel_dispatch("direct") block), never while torch.compile traces (it needs the library ops). The
    library path costs the host two dispatches per op and call (benchmarks/host_overhead.py); the default
    stays "library" until a GPU run shows the difference matters."""
    mode = _DISPATCH_OVERRIDE[-1] if _DISPATCH_OVERRIDE else env_choice(DISPATCH_ENV, DISPATCH_CHOICES)
    return mode == "direct" and not torch.compiler.is_compiling()


class kernel_dispatch:
    """Context manager: run the fastdit ops through `mode` ("library" or "direct") inside the block."""

    def __init__(self, mode: str):
        if mode not in DISPATCH_CHOICES:
            raise ValueError(f"kernel dispatch {mode!r}; choose one of {DISPATCH_CHOICES}")
        self.mode = mode

    def __enter__(self):
        _DISPATCH_OVERRIDE.append(self.mode)
        return self

    def __exit__(self, *exc):
        _DISPATCH_OVERRIDE.pop()
        return False


def direct_function(fwd_op, setup_context, backward):
    """An autograd.Function with a torch.library op's forward implementation and the setup/backward
    registered for it; its ctx says `direct`, so the backward calls its own op's implementation too
    (backward_op(ctx) below)."""
    impl = fwd_op._init_fn

    class Direct(torch.autograd.Function):
        @staticmethod
        def forward(*inputs):
            return impl(*inputs)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)
            ctx.direct = True

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Direct.__name__ = Direct.__qualname__ = f"Direct_{impl.__name__}"
    return Direct


def backward_op(ctx, bwd_op):
    """The backward op to call from a registered backward: its implementation under direct dispatch."""
    return bwd_op._init_fn if getattr(ctx, "direct", False) else bwd_op


# ----------------------------------------------------------------------------------------------
# Interpreter workarounds
# ----------------------------------------------------------------------------------------------
# Triton 3.9's interpreter rounds fp32 -> bf16 casts wrongly (truncation, or a round-half-up that
# drops the mantissa carry) and multiplies bf16 operands of tl.dot wrongly. Under the interpreter
# the kernels therefore write bf16 outputs into an fp32 buffer that the launcher rounds with torch
# (round-to-nearest-even, as the GPU's cvt.rn does), and tl.dot operands are upcast to fp32 first
# (exact for bf16/fp16 inputs). On a GPU none of this applies.
def buffer_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes an output of `dtype` into (fp32 for bf16 under the interpreter)."""
    if INTERPRETED and dtype == torch.bfloat16:
        return torch.float32
    return dtype


def alloc_out(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a result of `dtype` (see buffer_dtype); finish it with `finish`."""
    return alloc(shape, buffer_dtype(dtype), device)


def finish(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The output of `dtype` from a buffer made by alloc_out (a no-op on GPU)."""
    return buf if buf.dtype == dtype else buf.to(dtype)
