"""Host cost of the fused ops: the CPU time of one call with every Triton kernel launch made a no-op.

A fused op's call runs Python on the host before its kernels reach the GPU: input checks, output
allocation, the torch.library dispatch and autograd bookkeeping, the launcher. In a training step the
host runs ahead of the GPU and this is hidden, but where the GPU waits for the host (a lone op timed by
benchmarks/kernels.py, the start of a forward after a synchronising optimizer step) it is what gets
timed. This script measures it without a GPU: on the CPU, with TRITON_INTERPRET=1 and each fastdit
@triton.jit kernel replaced by a launch that does nothing, so what is left is the host path; the
`*_ref` (plain PyTorch) ops run for real at the same tiny shape as the comparison. The attention row is the
Triton attention (attention backend `triton`, no library op, so no fused-direct row) against SDPA.

  python benchmarks/host_overhead.py [--reps 300] [--json PATH]
  python benchmarks/host_overhead.py --model-step [--reps 20] [--json PATH]
  python benchmarks/host_overhead.py --ema [--reps 50] [--json PATH]

--ema: the EMA update as the fused optimizer step calls it (train.fused_optimizer_step; the flat group over
DeepSpeed's fp32 partition already updated by the kernel, so what is left is the walk over the pieces, the checks
and the frozen parameters' lerp), in the engine train.py builds from configs/xl2_zero2.json (ZeRO-2 bf16, one CPU
rank, gloo) for DiT-XL/2's depth and heads at a tiny width (292 parameters): milliseconds per update, median of
5 batches of --reps updates. It runs after the AdamW kernel's launch, so on a GPU it overlaps that kernel.

--model-step: instead of single ops, one whole training forward + backward of a DiT with DiT-XL/2's depth and
head count (28 blocks, 16 heads) at a tiny width and input (hidden 64, 4 x 4 tokens, batch 2), so every op of
the step is issued as in training while its work is negligible: the reference model (its math attention), the
fast model as the GPU runs it (attention sdpa_packed) through the library ops and with
FASTDIT_KERNEL_DISPATCH=direct, the fast model on its PyTorch ops (kernels="torch"), and the fast model behind
train.cuda_graph's replay (fastdit.training.graphed) with each graph replay made a no-op: the host's share of a
graphed step (input copies, the checks, autograd's node and the parameters' gradient accumulation), without
cudaGraphLaunch's own cost, which only a GPU measures. Milliseconds per step
(median of --reps steps): the host's share of a step, to set against the GPU time of the same step at a given
batch (host-bound where it is the larger). CUDA's own launch calls and Triton's launcher are not in it.

Rows: op, impl (fused = through the torch.library ops, the default; fused-direct = the same launchers as
plain autograd.Functions, FASTDIT_KERNEL_DISPATCH=direct; fused-tile-sums / fused-paired-sums / fused-gemm-bwd = `fused` under
the kernel switches of benchmarks/kernels.py's ENV_IMPLS, for the ops they change; ref), pass (fwd / fwd+bwd),
microseconds per call (median of 5 batches of --reps calls). The figures depend on the CPU; they are host
costs, never GPU times (fused-gemm-bwd's GEMMs run for real at the tiny shape, as ref's ops do).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # see benchmarks/kernels.py
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU tensors are accepted

from benchmarks.common import environment, write_json  # noqa: E402

KERNEL_MODULES = ("modulate_layernorm", "gated_residual", "patch_embed", "gelu", "qkv_grads", "tile_sums",
                  "flash_attention")
# Ops without a torch.library op (an autograd.Function over their launchers): no separate fused-direct row.
NO_LIBRARY_OP = ("attention",)


class _NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels() -> int:
    """Replace every @triton.jit kernel of the fastdit kernel modules by a no-op; return how many."""
    import importlib

    import triton
    count = 0
    for name in KERNEL_MODULES:
        mod = importlib.import_module(f"fastdit.kernels.{name}")
        for attr, value in list(vars(mod).items()):
            if isinstance(value, triton.runtime.JITFunction) or type(value).__name__ == "InterpretedFunction":
                setattr(mod, attr, _NoLaunch())
                count += 1
    return count


def cases():
    """(op, fused fn, ref fn, leaves, grad_outs) at a tiny shape."""
    import torch
    import fastdit.kernels as K
    n, t, d = 2, 16, 64
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)
    x, y, dout, v = rnd(n, t, d), rnd(n, t, d), rnd(n, t, d), [rnd(n, d) for _ in range(3)]
    bias = rnd(d)
    img, w, b, pos = rnd(n, 4, 8, 8), rnd(d, 4, 2, 2), rnd(d), rnd(1, t, d)
    import importlib

    from fastdit.models.attention import attention
    fa = importlib.import_module("fastdit.kernels.flash_attention")
    qkv = rnd(n, t, 3, 2, d // 2)                      # 2 heads of 32
    return [
        ("modulate_layernorm", K.modulate_layernorm, K.modulate_layernorm_ref, [x, v[0], v[1]], [dout]),
        ("gated_residual", K.gated_residual, K.gated_residual_ref, [x, y, v[0]], [dout]),
        ("gated_residual_modulate_layernorm", K.gated_residual_modulate_layernorm,
         K.gated_residual_modulate_layernorm_ref, [x, y, *v], [dout, dout]),
        ("gated_residual_modulate_layernorm+bias",
         lambda *a: K.gated_residual_modulate_layernorm(*a[:5], bias=a[5]),
         lambda *a: K.gated_residual_modulate_layernorm_ref(*a[:5], bias=a[5]), [x, y, *v, bias], [dout, dout]),
        ("patch_embed", lambda i, w_, b_: K.patch_embed(i, w_, b_, pos, 2),
         lambda i, w_, b_: K.patch_embed_ref(i, w_, b_, pos, 2), [img, w, b], [dout]),
        # attention "triton" (its three kernels) against SDPA on the packed qkv, as the model calls them
        ("attention", fa.flash_attention, lambda q: attention(q, "sdpa"), [qkv], [dout]),
    ]


def _per_call_us(fn, reps: int) -> float:
    for _ in range(max(5, reps // 10)):
        fn()
    batches = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        batches.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(batches)


# --model-step: DiT-XL/2's depth and heads, a tiny width and input (every op issued, little work in each)
STEP_ARCH = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=28, num_heads=16,
                 num_classes=1000, learn_sigma=True)


class _NoReplay:
    """A graphs backend for fastdit.training.graphed whose capture runs the call once and whose replay does
    nothing: what is left of a graphed step is its host path."""

    def __init__(self, device):
        pass

    def warm_up(self, fn, calls):
        for _ in range(calls):
            fn()

    def capture(self, name, fn):
        return fn()

    def replay(self, name):
        pass


def model_step_rows(reps: int):
    """[(model, ms per fwd+bwd step)] for the --model-step rows (see the module docstring)."""
    import torch
    from fastdit.kernels._common import kernel_dispatch
    from fastdit.models import dit as fast
    from fastdit.models import reference as ref
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t, y = torch.randint(0, 1000, (2,), generator=g), torch.randint(0, 1000, (2,), generator=g)

    def ms_per_step(model):
        def step():
            model(x, t, y).square().mean().backward()
        for _ in range(3):
            step()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.manual_seed(0)
    cases = [("reference", ref.DiT(**STEP_ARCH), None),
             ("fast", fast.DiT(**STEP_ARCH, attention="sdpa_packed"), "library"),
             ("fast-direct", fast.DiT(**STEP_ARCH, attention="sdpa_packed"), "direct"),
             ("fast-torch-ops", fast.DiT(**STEP_ARCH, attention="sdpa_packed", kernels="torch"), None),
             ("fast-graphed", fast.DiT(**STEP_ARCH, attention="sdpa_packed"), "graphed")]
    rows = []
    for name, model, mode in cases:
        if mode == "graphed":
            from fastdit.training import graphed
            graphed.install(model, backend=_NoReplay)
            mode = None
        ctx = kernel_dispatch(mode) if mode else contextlib.nullcontext()
        with ctx:
            rows.append(dict(model=name, ms_per_step=ms_per_step(model)))
        print(f"{name:16s} {rows[-1]['ms_per_step']:8.1f} ms per fwd+bwd step (host)", flush=True)
    return rows


def ema_rows(reps: int):
    """[(what, ms per EMA update)] for --ema (see the module docstring)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from benchmarks import step_profile as sp
    from fastdit.training.trainer import Trainer, build_engine, device_for_rank, init_distributed
    sets = ["model.hidden_size=64", "model.num_heads=16", "data.image_size=64", "deepspeed.train_batch_size=2",
            "deepspeed.train_micro_batch_size_per_gpu=2"]
    cfg = sp.parse_args(["--config", os.path.join(ROOT, "configs", "xl2_zero2.json"), "--data", "synthetic"]
                        + [a for kv in sets for a in ("--set", kv)]).cfg
    init_distributed(cfg.train.shm_comm)
    geometry = (4, cfg.data.image_size // 8, cfg.model.num_classes or cfg.data.num_classes)
    setup = build_engine(cfg, *geometry, device_for_rank())
    trainer = Trainer(setup, sp.synthetic_source(setup.micro_batch, *geometry, device_for_rank(), 0))
    for _ in range(3):                           # the fused step runs from the second step
        trainer.train_step()
    ema, opt = setup.ema, setup.engine.optimizer
    done = [seg[0] for seg in (ema.flat_segment(m) for m in opt.single_partition_of_fp32_groups) if seg]
    batches = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            ema.update(done=done)
        batches.append((time.perf_counter() - t0) / reps * 1e3)
    row = dict(what="ema.update(done=flat groups)", ms_per_update=statistics.median(batches),
               params=len(ema.pieces), flat_groups=len(ema.flat), done=done,
               fused_step=getattr(opt, "fastdit_fused_step", None) is not None)
    print(f"{row['what']:32s} {row['ms_per_update']:8.3f} ms per update (host; {row['params']} parameters, "
          f"{row['flat_groups']} flat group(s), done {done})", flush=True)
    setup.destroy()
    torch.distributed.destroy_process_group()
    return [row]


def run(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=None,
                    help="calls per timed batch (5 batches; default 300), or steps with --model-step (default 20)")
    ap.add_argument("--model-step", action="store_true",
                    help="time one whole training forward + backward of a 28-block DiT instead of single ops")
    ap.add_argument("--ema", action="store_true",
                    help="time the EMA update as the fused optimizer step calls it instead (DiT-XL/2's depth)")
    ap.add_argument("--json", help="write the rows and run metadata here")
    args = ap.parse_args(argv)
    import torch
    if args.ema:
        torch.set_num_threads(1)
        reps = args.reps or 50
        rows = ema_rows(reps)
        meta = dict(environment(torch.device("cpu")), reps=reps,
                    note="host time of the EMA update in the fused optimizer step's path (its flat group done by "
                         "the kernel); CPU figures, not GPU times")
        if args.json:
            print(f"wrote {write_json(args.json, dict(meta=meta, rows=rows))}")
        return meta, rows
    if args.model_step:
        torch.set_num_threads(1)
        n_stubbed = stub_kernels()
        reps = args.reps or 20
        rows = model_step_rows(reps)
        meta = dict(environment(torch.device("cpu")), kernels_stubbed=n_stubbed, reps=reps, arch=STEP_ARCH,
                    note="host time of one training forward + backward with the Triton launches made no-ops "
                         "(the fast rows) and every PyTorch op at a tiny shape; CPU figures, not GPU times")
        if args.json:
            print(f"wrote {write_json(args.json, dict(meta=meta, rows=rows))}")
        return meta, rows
    args.reps = args.reps or 300
    from benchmarks.kernels import ENV_IMPLS, _impl_env
    from fastdit.kernels._common import kernel_dispatch
    torch.set_num_threads(1)
    n_stubbed = stub_kernels()
    rows = []
    for op, fused, ref, leaves, grad_outs in cases():
        switched = [(impl, fused) for impl, (_, _, ops) in ENV_IMPLS.items() if op.split("+")[0] in ops]
        direct = [] if op in NO_LIBRARY_OP else [("fused-direct", fused)]
        for impl, fn in [("fused", fused)] + direct + switched + [("ref", ref)]:
            def dispatch(impl=impl):
                return kernel_dispatch("direct") if impl == "fused-direct" else _impl_env(impl)
            params = [leaf.clone().requires_grad_() for leaf in leaves]

            def fwd():
                with torch.no_grad():
                    return fn(*params)

            def fwd_bwd():
                out = fn(*params)
                out = list(out) if isinstance(out, (tuple, list)) else [out]
                torch.autograd.backward(out, grad_outs[:len(out)])
            for pas, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                with dispatch():
                    us = _per_call_us(call, args.reps)
                rows.append(dict(op=op, impl=impl, **{"pass": pas}, us_per_call=us))
                print(f"{op:40s} {impl:15s} {pas:8s} {us:9.1f} us per call", flush=True)
    meta = dict(environment(torch.device("cpu")), kernels_stubbed=n_stubbed, reps=args.reps,
                note="host time per call with the Triton launches made no-ops (fused) or the PyTorch ops "
                     "running at a tiny shape (ref); CPU figures, not GPU times")
    if args.json:
        print(f"wrote {write_json(args.json, dict(meta=meta, rows=rows))}")
    return meta, rows


if __name__ == "__main__":
    run()
