"""The two ceilings every ratio is taken against, measured on the GPU in the same run.

Datasheet numbers differ from what a given card delivers (clocks, power cap, HBM part), and SPEC.md section 6
asks for ratios to the same GPU's measured limits, so both are measured here rather than looked up.
"""
from __future__ import annotations

import torch

from perf.timing import time_calls


def copy_gbs(nbytes: int = 2 << 30, iters: int = 50) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    # Random data, not zeros: METHOD.md has seen zeros run faster; float32 gives cheap uniform randoms.
    src = torch.rand(nbytes // 4, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    t = time_calls(lambda i: dst.copy_(src), 1, iters, warmup=10)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (t.us * 1e3)


def gemm_tflops(n: int = 8192, iters: int = 100, warmup: int = 50) -> float:
    """bf16 dense GEMM rate (n x n x n, torch.matmul, i.e. cuBLAS) in TFLOPS.

    The long warm-up (~0.1 s) lets clocks settle to what they hold under sustained load, which is the state the
    attention kernels are timed in; a cold card boosts briefly and would overstate the ceiling.
    """
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_calls(lambda i: torch.matmul(a, b, out=c), 1, iters, warmup)
    del a, b, c
    torch.cuda.empty_cache()
    return 2 * n ** 3 / (t.us * 1e6)


def measure() -> dict:
    return {"copy_gbs": copy_gbs(), "gemm_tflops": gemm_tflops()}
