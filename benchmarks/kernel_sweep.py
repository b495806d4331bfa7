"""Tiling sweep of the fused row kernels: BLOCK_T x num_warps (x tokens_per_tile, num_stages for the backward).

The row kernels (kernels/modulate_layernorm.py `_modln_fwd_kernel` / `_modln_bwd_kernel`, which also
serve gated_residual_modulate_layernorm through HAS_RESIDUAL, and kernels/gated_residual.py) take
their tiling from kernels/_common.py: `row_tile(D)` (BLOCK_T, BLOCK_D = next_pow2(D), num_warps) and,
in the backward, `token_tiles(...)` (tokens per program, aiming at ~4 programs per SM). This script
times the launchers under every tiling of a grid and says which one is fastest, so the heuristic
can be set from measurements. Nothing here changes the heuristic.

What is timed: one call of the launcher (kernels.<file>.<op>_fwd / <op>_bwd) on plain tensors, with
the tiling passed as its `block_t` / `num_warps` / `tokens_per_tile` overrides:
  fwd  the forward kernel + its output allocation;
  bwd  the backward kernel + the reduction of its fp32 per-tile partial sums (dshift / dscale /
       dgate), which the tokens_per_tile choice changes, + output allocation. No autograd.
gated_residual_modulate_layernorm's bwd is given dx' (the gradient reaching x' from its later use),
as in the DiT block. Inputs, the (N, 6D) adaLN chunks as strided views, and the byte counts come
from benchmarks/kernels.py (`_case`); timing (triton.testing.do_bench median, L2 flushed per call)
and the device-to-device copy baseline too (`_timer`, `_copy_gbps`), so GB/s and copy share mean
the same as there (minimal HBM bytes of the op; the bwd's fp32 partial-sum buffers are not counted).

Grid, per (op, pass, D): BLOCK_T in --block-t (1 2 4 8 16) with BLOCK_T * BLOCK_D <= --max-tile-elems
(16384) and at most --max-elems-per-thread (64) tile elements per thread (BLOCK_T * BLOCK_D / (32 *
num_warps)), num_warps in --num-warps (2 4 8 16); for bwd also tokens_per_tile for ~P programs per SM,
P in --programs-per-sm (1 2 4 8 16), computed as token_tiles does for its ~4, and the token loop's pipeline
depth: every BLOCK_T x num_warps at the default token tiling with num_stages in --num-stages (2 3; Triton's
pipeliner then loads the next steps' rows into shared memory with cp.async while a step computes; the
default is 1, a plain loop). The bwd order: the default, the default tiling pipelined, every tiling
pipelined, then the plain-loop grid. The default tiling (None overrides) is always measured and marked
`default`. A config that fails to compile or run is
recorded with its error string (a config that faults the CUDA context would fail every later one too;
the JSON written so far keeps what came before). At the defaults (D=1152, T=256, N=128, 132 SMs) that is
13 fwd and 91 bwd tilings per op (26 of them pipelined), 416 in all over the four ops, each compiled on first use (no GPU timing of the sweep
itself exists yet; the order puts gated_residual_modulate_layernorm's bwd first, so a deadline cuts the
less important groups).

Numerics: each config's outputs (one call with FASTDIT_KERNEL_POISON=1, so an unwritten element is
NaN) are compared with the default config's: `max_abs_diff`, and `tol_ratio` = max |a - b| / (rtol *
|b| + atol_frac * max |b|) per output (rtol = 2 ulps of the dtype, atol_frac 1e-3). tol_ratio > 1, or
a non-finite value where the default has a finite one, marks the config `wrong`; a wrong config is
never reported as the best.

--timing graph: each config's call captured once in a CUDA graph and replayed
(triton.testing.do_bench_cudagraph, as benchmarks/kernels.py's `ms_graph`), so the host's launch path is not
timed. The default, `bench`, times the launcher call with do_bench, which is right where the kernel outlasts its
launch (the residual+LN backward) and wrong where it does not: on the H100 machine of 570862f the fused ops' host
path took 0.22-0.36 ms per forward call against 0.13-0.21 ms of kernel (benchmarks/kernels.py `host_ms` vs
`ms_graph`), so a forward sweep under `bench` would rank the host. The replays do not flush L2 between calls
(the sweep's shapes move 150 MB or more per call, three times an H100's L2). A capture that fails is the
config's error. On CPU (--smoke) there are no graphs: wall clock, said in the JSON.

Stops cleanly at --deadline-s (checked before each config; compiles included) and writes what was
measured. The JSON (written after each (op, pass, D) group too) holds the environment (GPU, versions,
git commit, date, exact command; benchmarks.common.environment), the copy baseline, a summary per
(op, pass, D) and every config's result.

Usage:
  python benchmarks/kernel_sweep.py --json benchmarks/results/kernel_sweep_h100.json
  python benchmarks/kernel_sweep.py --ops gated_residual_modulate_layernorm --passes bwd --deadline-s 120
  python benchmarks/kernel_sweep.py --ops modulate_layernorm gated_residual_modulate_layernorm --passes fwd \
      --timing graph --deadline-s 60                                    # the forward kernels, not the host
  python benchmarks/kernel_sweep.py --smoke --json /tmp/sweep.json   # tiny CPU run, interpreter
Nothing is printed that was not measured in this run; --smoke timings are the interpreter's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# As in benchmarks/kernels.py: run as a script, this folder would be sys.path[0] and benchmarks/kernels.py
# would answer to `import kernels`. Take the folder off.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import env_vars, environment, write_json  # noqa: E402

# The op that matters in the training step first, its backward first: a deadline cuts the others.
# gated_residual_modulate_layernorm+bias: the same op with the branch's bias added in the kernel (the model's
# bias_fold; its backward kernel has one more accumulator and re-reads the modulation vectors).
OPS = ("gated_residual_modulate_layernorm", "gated_residual_modulate_layernorm+bias", "modulate_layernorm",
       "gated_residual")
PASSES = ("bwd", "fwd")
SMOKE_NOTE = ("--smoke: tiny shape on CPU through the Triton interpreter (TRITON_INTERPRET=1), 2-3 configs per "
              "(op, pass); num_warps is ignored there and the timings say nothing about kernel speed")
ATOL_FRAC = 1e-3


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--dims", nargs="+", type=int, default=[1152], help="hidden sizes D")
    p.add_argument("--tokens-per-sample", nargs="+", type=int, default=[256], help="T")
    p.add_argument("--batch", type=int, default=128, help="N (samples per call)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--block-t", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--num-warps", nargs="+", type=int, default=[2, 4, 8, 16])
    p.add_argument("--programs-per-sm", nargs="+", type=float, default=[1, 2, 4, 8, 16],
                   help="bwd: tokens_per_tile chosen for ~this many programs per SM")
    p.add_argument("--num-stages", nargs="+", type=int, default=[2, 3],
                   help="bwd: token loop pipeline depths besides 1, tried for every BLOCK_T x num_warps at the "
                        "default token tiling (right after the default tiling's own, before the rest of the grid)")
    p.add_argument("--max-tile-elems", type=int, default=16384, help="skip BLOCK_T * BLOCK_D above this")
    p.add_argument("--max-elems-per-thread", type=int, default=64,
                   help="skip BLOCK_T * BLOCK_D / (32 * num_warps) above this (register budget)")
    p.add_argument("--warmup", type=int, default=10, help="ms of warm-up (do_bench) per timing")
    p.add_argument("--rep", type=int, default=50, help="ms of repetitions (do_bench) per timing")
    p.add_argument("--copy-mib", type=int, default=1024, help="buffer size of the copy baseline")
    p.add_argument("--timing", default="bench", choices=["bench", "graph"],
                   help="bench: do_bench of the launcher call (host launch path included where it is the longer); "
                        "graph: replays of the call captured in a CUDA graph (the kernels only)")
    p.add_argument("--deadline-s", type=float, default=240.0,
                   help="stop starting new configs after this many seconds (whole run) and write the results")
    p.add_argument("--json", help="write the run metadata, summary and every config's result here")
    p.add_argument("--smoke", action="store_true",
                   help="N=2, T=8, D=64 on CPU through the Triton interpreter, 2-3 configs per (op, pass): checks "
                        "the harness runs; its timings are the interpreter's, not a GPU's")
    a = p.parse_args(argv)
    bad = [k for k in a.num_stages if k not in (1, 2, 3, 4)]
    if bad:
        p.error(f"--num-stages takes 1-4 (the token loop's pipeline depth), got {bad}")
    return a


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def tokens_for_programs(programs_per_sm, n, t, block_t, sms):
    """tokens_per_tile giving ~programs_per_sm programs per SM (token_tiles' rule for its default ~4)."""
    import triton
    want = max(1, triton.cdiv(int(round(programs_per_sm * sms)), max(n, 1)))
    want = min(want, triton.cdiv(t, block_t))
    return triton.cdiv(triton.cdiv(t, want), block_t) * block_t


def make_grid(pas, n, t, d, device, args, smoke=False):
    """[config dict]: the default first (block_t / num_warps / tokens_per_tile overrides all None), then the
    grid without configs that launch the same as the default. Each config records the tiling it resolves to."""
    from fastdit.kernels._common import num_sms, row_tile, token_tiles
    bt0, block_d, nw0 = row_tile(d)
    sms = num_sms(device)

    def resolved(bt, nw, tok, stages=None):
        r = dict(block_t=bt, block_d=block_d, num_warps=nw)
        if pas == "bwd":
            tok_r, n_iters, n_tiles = token_tiles(n, t, bt, device, tok)
            r.update(tokens_per_tile=tok_r, n_tiles=n_tiles, programs=n * n_tiles,
                     programs_per_sm=round(n * n_tiles / sms, 2), num_stages=stages or 1)
        else:
            r.update(programs=n * triton_cdiv(t, bt), programs_per_sm=round(n * triton_cdiv(t, bt) / sms, 2))
        return r

    default = dict(name="default", default=True, overrides=dict(block_t=None, num_warps=None),
                   **resolved(bt0, nw0, None))
    if pas == "bwd":
        default["overrides"].update(tokens_per_tile=None, num_stages=None)
    configs = [default]
    seen = {_key(default)}
    if smoke:
        # 2-3 configs besides the default: small tiles with other warps, and for bwd other token tiles and a
        # pipelined token loop.
        cand = [(max(1, bt0 // 4), 2, None, None), (max(1, bt0 // 2), 8, None, None)]
        if pas == "bwd":
            cand = [(max(1, bt0 // 4), 2, 2, None), (max(1, bt0 // 2), 8, t, None), (bt0, nw0, None, 2)]
    else:
        tiles = [(bt, nw) for bt in args.block_t if bt * block_d <= args.max_tile_elems
                 for nw in args.num_warps if bt * block_d <= args.max_elems_per_thread * 32 * nw]
        if pas == "fwd":
            cand = [(bt, nw, None, None) for bt, nw in tiles]
        else:
            stages = [k for k in args.num_stages if k != 1]
            # The pipelined loop first (the default tiling's, then every tile's at the default token tiling),
            # then the plain loop over the whole grid: a deadline cuts the grid's tail.
            cand = [(bt0, nw0, None, k) for k in stages]
            cand += [(bt, nw, None, k) for k in stages for bt, nw in tiles]
            cand += [(bt, nw, tokens_for_programs(p, n, t, bt, sms), None)
                     for bt, nw in tiles for p in args.programs_per_sm]
    for bt, nw, tok, stages in cand:
        c = dict(default=False, overrides=dict(block_t=bt, num_warps=nw), **resolved(bt, nw, tok, stages))
        if pas == "bwd":
            c["overrides"].update(tokens_per_tile=tok, num_stages=stages)
        c["name"] = _name(c)
        if _key(c) in seen:
            continue
        seen.add(_key(c))
        configs.append(c)
    return configs


def triton_cdiv(a, b):
    return -(-a // b)


def _key(c):
    return (c["block_t"], c["num_warps"], c.get("tokens_per_tile"), c.get("num_stages"))


def _name(c):
    s = f"bt{c['block_t']}/w{c['num_warps']}"
    s += f"/tok{c['tokens_per_tile']}" if "tokens_per_tile" in c else ""
    return s + (f"/s{c['num_stages']}" if c.get("num_stages", 1) != 1 else "")


# ----------------------------------------------------------------------------------------------
# Cases: the launchers on benchmarks/kernels.py's inputs
# ----------------------------------------------------------------------------------------------
def launchers(op, n, t, d, dtype, device):
    """(fwd(**overrides) -> outputs, bwd(**overrides) -> outputs, bytes_fwd, bytes_bwd, (N, T, D)).

    Inputs and byte counts are benchmarks/kernels.py's `_case`; the bwd's saved tensors come from one
    default-tiled forward."""
    import torch
    from benchmarks.kernels import _case
    import importlib
    # The modules, not the functions of the same name that fastdit.kernels exports.
    GR = importlib.import_module("fastdit.kernels.gated_residual")
    ML = importlib.import_module("fastdit.kernels.modulate_layernorm")

    bias = None
    if op.endswith("+bias"):
        op = op[:-len("+bias")]
        bias = (0.1 * torch.randn(d, generator=torch.Generator().manual_seed(1))).to(device, dtype)
    _, _, inputs, grad_outs, b_fwd, b_bwd, _, _, shape = _case(op, n, t, d, dtype, device)
    inputs = [a.detach() for a in inputs]
    with torch.no_grad():
        if op == "modulate_layernorm":
            x, c = inputs
            shift, scale = c[:, :d], c[:, d:2 * d]
            (dy,) = grad_outs

            def fwd(**o):
                return ML.modulate_layernorm_fwd(x, shift, scale, 1e-6, **o)
            _, mean, rstd = fwd()

            def bwd(**o):
                return ML.modulate_layernorm_bwd(dy, x, scale, mean, rstd, shift.dtype, **o)
        elif op == "gated_residual":
            x, y, c = inputs
            gate = c[:, 2 * d:3 * d]
            (dout,) = grad_outs

            def fwd(**o):
                return GR.gated_residual_fwd(x, y, gate, **o)

            def bwd(**o):
                return GR.gated_residual_bwd(dout, y, gate, **o)
        else:
            x, y, c = inputs
            gate, shift, scale = c[:, 2 * d:3 * d], c[:, 3 * d:4 * d], c[:, 4 * d:5 * d]
            dxnew, dh = grad_outs          # gradients of the op's outputs (x', h), as kernels.py orders them

            with_bias = {"bias": bias} if bias is not None else {}

            def fwd(**o):
                return ML.gated_residual_modulate_layernorm_fwd(x, y, gate, shift, scale, 1e-6, **with_bias, **o)
            xnew, _, mean, rstd = fwd()

            def bwd(**o):
                return ML.gated_residual_modulate_layernorm_bwd(dh, dxnew, xnew, y, gate, scale, mean, rstd,
                                                                x.dtype, shift.dtype, **with_bias, **o)
    return fwd, bwd, b_fwd, b_bwd, shape


# ----------------------------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------------------------
def rtol_for(dtype):
    """2 ulps of the output dtype (1 rounding flip plus margin), at least 1e-5 (fp32 reordering)."""
    import torch
    return max(2 * torch.finfo(dtype).eps, 1e-5)


def compare(outs, refs, rtol, atol_frac=ATOL_FRAC):
    """{'max_abs_diff', 'tol_ratio', 'ok', 'reason'} of outputs `outs` against the default's `refs`.

    Per output: tol = rtol * |ref| + atol_frac * max |ref|; tol_ratio is the worst |out - ref| / tol over
    all outputs (ok: <= 1). A non-finite output where ref is finite, or a shape / presence mismatch, is
    not ok whatever the ratio."""
    import torch
    max_abs, ratio, reasons = 0.0, 0.0, []
    for i, (o, r) in enumerate(zip(_as_list(outs), _as_list(refs))):
        if o is None or r is None:
            if (o is None) != (r is None):
                reasons.append(f"output {i}: present in one config only")
            continue
        if o.shape != r.shape:
            reasons.append(f"output {i}: shape {tuple(o.shape)} vs default {tuple(r.shape)}")
            continue
        o, r = o.detach().float(), r.detach().float()
        fin = torch.isfinite(r)
        bad = int((~torch.isfinite(o) & fin).sum())
        if bad:
            reasons.append(f"output {i}: {bad} non-finite values where the default's are finite")
        diff = torch.where(fin & torch.isfinite(o), (o - r).abs(), torch.zeros_like(r))
        rabs = torch.where(fin, r.abs(), torch.zeros_like(r))
        scale = float(rabs.max()) if rabs.numel() else 0.0
        tol = rtol * rabs + atol_frac * scale + 1e-30
        if diff.numel():
            max_abs = max(max_abs, float(diff.max()))
            ratio = max(ratio, float((diff / tol).max()))
    if ratio > 1:
        reasons.append(f"max |diff| / tol = {ratio:.3g} > 1")
    return dict(max_abs_diff=max_abs, tol_ratio=ratio, ok=not reasons, reason="; ".join(reasons) or None)


def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def poisoned():
    """FASTDIT_KERNEL_POISON=1 inside: outputs NaN-filled before launch, so unwritten elements show."""
    from fastdit.kernels._common import POISON_ENV
    return env_vars([(POISON_ENV, "1")])


def _err(e):
    s = f"{type(e).__name__}: {e}"
    return s if len(s) <= 2000 else s[:2000] + " ..."


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def _call_timer(timing: str, device, timer, rep: int):
    """fn -> (ms, None) or (None, why): `timer` (do_bench; wall clock on CPU), or with timing "graph" on CUDA the
    replays of fn captured in a CUDA graph (benchmarks/kernels.py _graph_ms)."""
    if timing == "graph" and device.type == "cuda":
        from benchmarks.kernels import _graph_ms
        return lambda fn: _graph_ms(fn, device, rep)
    return lambda fn: (timer(fn), None)


def _timer_text(args, device) -> str:
    if device.type != "cuda":
        return ("wall clock median of 3 (benchmarks/kernels.py _timer; no CUDA graphs on CPU)" if args.timing == "graph"
                else "wall clock median of 3 (benchmarks/kernels.py _timer)")
    if args.timing == "graph":
        return (f"triton.testing.do_bench_cudagraph median (rep {args.rep} ms) of the call captured in a CUDA graph: "
                f"no host work timed, L2 not flushed between replays")
    return f"triton.testing.do_bench median (warmup {args.warmup} ms, rep {args.rep} ms), L2 flushed"


def run(args, argv=None):
    """Run the sweep; `argv` (None: sys.argv) is what the JSON records as the command."""
    t_start = time.monotonic()
    from benchmarks.kernels import _copy_gbps, _timer, begin
    dtype = begin(args.smoke, SMOKE_NOTE, args.dtype)
    import torch
    if args.smoke:
        device = torch.device("cpu")
        dims, tps, batch, copy_mib = [64], [8], 2, 16
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/kernel_sweep.py needs a CUDA device (or --smoke for a CPU check)")
        device = torch.device("cuda")
        dims, tps, batch, copy_mib = args.dims, args.tokens_per_sample, args.batch, args.copy_mib
    timer = _timer(device, args.warmup, args.rep)
    time_call = _call_timer(args.timing, device, timer, args.rep)
    copy_gbps = _copy_gbps(device, copy_mib, timer)
    print(f"device-to-device copy: {copy_gbps:.1f} GB/s", flush=True)
    rtol = rtol_for(dtype)

    meta = dict(environment(device, argv=argv), benchmark="kernel_sweep", smoke=bool(args.smoke),
                speed_meaningful=not args.smoke,
                note=SMOKE_NOTE if args.smoke else None,
                interpreter=os.environ.get("TRITON_INTERPRET") == "1", copy_gbps=copy_gbps, copy_mib=copy_mib,
                dtype=str(dtype).replace("torch.", ""), batch=batch, dims=dims, tokens_per_sample=tps,
                grid=dict(block_t=args.block_t, num_warps=args.num_warps, programs_per_sm=args.programs_per_sm,
                          num_stages=args.num_stages,
                          max_tile_elems=args.max_tile_elems, max_elems_per_thread=args.max_elems_per_thread),
                numerics=dict(reference="the default config's outputs", rtol=rtol, atol_frac=ATOL_FRAC,
                              poisoned=True),
                timer=_timer_text(args, device), timing=args.timing,
                timed="one launcher call (kernel + fp32 partial-sum reduction in bwd + output allocation)",
                deadline_s=args.deadline_s, stopped_early=False, stopped_at=None)
    results, summary = [], []

    def save():
        meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
        if args.json:
            write_json(args.json, dict(meta=meta, summary=summary, results=results))

    stop = False
    for op in args.ops:
        for t in tps:
            for d in dims:
                if stop or time.monotonic() - t_start > args.deadline_s:
                    if not stop:
                        stop = True
                        meta.update(stopped_early=True, stopped_at=dict(op=op, T=t, D=d, configs_done=0))
                        print(f"--deadline-s {args.deadline_s:g} reached: stopping before {op} D={d}", flush=True)
                    break
                fwd, bwd, b_fwd, b_bwd, shape = launchers(op, batch, t, d, dtype, device)
                for pas in args.passes:
                    if stop:
                        break
                    call, nbytes = (fwd, b_fwd) if pas == "fwd" else (bwd, b_bwd)
                    group = dict(op=op, **{"pass": pas}, N=shape[0], T=shape[1], D=shape[2])
                    rows, ref = [], None
                    for cfg in make_grid(pas, shape[0], shape[1], shape[2], device, args, args.smoke):
                        if time.monotonic() - t_start > args.deadline_s:
                            stop = True
                            meta.update(stopped_early=True,
                                        stopped_at=dict(group, config=cfg["name"], configs_done=len(rows)))
                            print(f"--deadline-s {args.deadline_s:g} reached: stopping before {op} {pas} "
                                  f"D={d} {cfg['name']}", flush=True)
                            break
                        row = dict(group, **cfg, status=None, error=None, ms=None, gbps=None, copy_share=None,
                                   bytes=nbytes, max_abs_diff=None, tol_ratio=None, numerics=None)
                        o = {k: v for k, v in cfg["overrides"].items()}
                        try:
                            with poisoned(), torch.no_grad():
                                outs = call(**o)
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                        except Exception as e:  # noqa: BLE001 - a config that does not compile/run is recorded
                            row.update(status="error", error=_err(e))
                        else:
                            if cfg["default"]:
                                ref = [x.clone() if x is not None else None for x in _as_list(outs)]
                                row.update(status="ok", max_abs_diff=0.0, tol_ratio=0.0, numerics="reference")
                            elif ref is None:
                                row.update(status="unchecked", numerics="the default config failed")
                            else:
                                cmp = compare(outs, ref, rtol)
                                row.update(max_abs_diff=cmp["max_abs_diff"], tol_ratio=cmp["tol_ratio"],
                                           status="ok" if cmp["ok"] else "wrong",
                                           numerics="ok" if cmp["ok"] else cmp["reason"])
                            del outs
                            try:
                                with torch.no_grad():
                                    ms, why = time_call(lambda: call(**o))
                                if ms is None:
                                    row.update(status="error", error=why)
                                else:
                                    gbps = nbytes / (ms * 1e-3) / 1e9
                                    row.update(ms=ms, gbps=gbps, copy_share=gbps / copy_gbps)
                            except Exception as e:  # noqa: BLE001
                                row.update(status="error", error=_err(e))
                        rows.append(row)
                        results.append(row)
                        ms_s = f"{row['ms']:9.4f} ms {row['gbps']:8.1f} GB/s {100 * row['copy_share']:5.1f}% of copy" \
                            if row["ms"] is not None else " " * 43
                        print(f"{op:34s} {pas:4s} D={d:<5d} {cfg['name']:22s}{' *' if cfg['default'] else '  '} "
                              f"{ms_s}  {row['status']}"
                              + (f" diff {row['max_abs_diff']:.2e}" if row["max_abs_diff"] is not None else "")
                              + (f" ({row['error'][:120]})" if row["error"] else ""), flush=True)
                    if rows:
                        summary.append(_summarize(group, rows))
                    save()
    _print_table(summary, meta)
    save()
    if args.json:
        print(f"wrote {os.path.abspath(args.json)}")
    return meta, summary, results


def _summarize(group, rows):
    timed = [r for r in rows if r["ms"] is not None]
    ok = [r for r in timed if r["status"] == "ok"]
    dflt = next((r for r in rows if r["default"]), None)
    best = min(ok, key=lambda r: r["ms"]) if ok else None
    pick = ("name", "ms", "gbps", "copy_share", "block_t", "num_warps", "tokens_per_tile", "programs_per_sm",
            "num_stages", "overrides")
    return dict(group, configs=len(rows), timed=len(timed),
                errors=sum(r["status"] == "error" for r in rows),
                wrong=sum(r["status"] == "wrong" for r in rows),
                default={k: dflt.get(k) for k in pick} if dflt else None,
                best={k: best.get(k) for k in pick} if best else None,
                speedup_best_vs_default=(dflt["ms"] / best["ms"]) if (dflt and dflt["ms"] and best) else None)


def _print_table(summary, meta):
    if not summary:
        print("nothing measured")
        return
    print(f"\n{'smoke (interpreter; not speed) ' if meta['smoke'] else ''}copy {meta['copy_gbps']:.0f} GB/s  "
          f"dtype {meta['dtype']}  N={meta['batch']}")
    head = (f"{'op':34s} {'pass':4s} {'D':>5s} {'T':>5s} | {'default':22s} {'ms':>8s} {'%copy':>6s} | "
            f"{'best':22s} {'ms':>8s} {'%copy':>6s} {'x':>5s} | cfgs err wrong")
    print(head)
    print("-" * len(head))
    for s in summary:
        dflt, best = s["default"] or {}, s["best"] or {}

        def cells(c):
            if not c or c.get("ms") is None:
                return f"{'-':22s} {'-':>8s} {'-':>6s}"
            return f"{c['name']:22s} {c['ms']:8.4f} {100 * c['copy_share']:5.1f}%"
        sp = s["speedup_best_vs_default"]
        print(f"{s['op']:34s} {s['pass']:4s} {s['D']:5d} {s['T']:5d} | {cells(dflt)} | {cells(best)} "
              f"{(f'{sp:5.2f}' if sp else '    -')} | {s['configs']:4d} {s['errors']:3d} {s['wrong']:5d}")
    if meta.get("stopped_early"):
        print(f"stopped early at --deadline-s {meta['deadline_s']:g}: {meta['stopped_at']}")


def main(argv=None) -> int:
    run(_parse(argv), None if argv is None else ["benchmarks/kernel_sweep.py"] + list(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
