"""The device's two ceilings, measured: device-to-device copy bandwidth and bf16 GEMM throughput.

Every "% of bandwidth" and MFU figure is judged against a peak; datasheet peaks are leads, these are
what the card in hand does today (METHOD: measure the ceilings once, on random data, warmed up).

    copy   torch's copy_ of a --copy-mib MiB buffer into another; GB/s counts bytes read + written
    gemm   --gemm-n^3 bf16 matrix product (torch.matmul, cuBLAS) on random N(0, 1) data; TFLOP/s = 2 N^3 / s

Both: median of CUDA-event-timed repeats after warm-up. On CPU (--smoke) the same code runs with
small sizes and perf_counter; the numbers then say nothing about a GPU.

    python benchmarks/ceilings.py --json ceilings.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import IntervalTimer, environment, write_json  # noqa: E402


def _median_ms(fn, device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    timer = IntervalTimer(device)
    times = []
    for _ in range(reps):
        timer.start()
        fn()
        times.append(timer.stop())
    return statistics.median(times)


def measure(device: torch.device, copy_mib: int, gemm_n: int, reps: int = 10) -> dict:
    """{'copy_gbps', 'gemm_tflops', ...} measured on `device`."""
    n = copy_mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), device, 3, reps)
    del src, dst
    a = torch.randn(gemm_n, gemm_n, device=device, dtype=torch.bfloat16)
    b = torch.randn(gemm_n, gemm_n, device=device, dtype=torch.bfloat16)
    gemm_ms = _median_ms(lambda: torch.matmul(a, b), device, 3, reps)
    return dict(copy_mib=copy_mib, copy_ms=copy_ms, copy_gbps=2 * n * 4 / (copy_ms * 1e-3) / 1e9,
                gemm_n=gemm_n, gemm_ms=gemm_ms, gemm_tflops=2 * gemm_n**3 / (gemm_ms * 1e-3) / 1e12,
                timer=IntervalTimer(device).method, data="random normal")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--gemm-n", type=int, default=8192)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--smoke", action="store_true", help="CPU, 8 MiB copy, 256^3 GEMM")
    a = ap.parse_args(argv)
    if a.smoke:
        device, a.copy_mib, a.gemm_n = torch.device("cpu"), min(a.copy_mib, 8), min(a.gemm_n, 256)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("ceilings.py: error: no CUDA device is visible (use --smoke for the CPU check)", file=sys.stderr)
        return 2
    r = measure(device, a.copy_mib, a.gemm_n)
    print(f"copy {r['copy_gbps']:.0f} GB/s (read + write, {a.copy_mib} MiB) | bf16 GEMM {a.gemm_n}^3 "
          f"{r['gemm_tflops']:.1f} TFLOP/s", flush=True)
    if a.json:
        argv_rec = None if argv is None else ["benchmarks/ceilings.py"] + list(argv)
        write_json(a.json, dict(benchmark="ceilings", smoke=a.smoke, **r,
                                environment=environment(device, argv=argv_rec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
