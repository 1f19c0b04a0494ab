"""Benchmark cases for the foundation ops: the split-KV ``combine`` kernel and the GPU
decode ``scheduler`` (what the first ``flash_mla_with_kvcache`` call of a step runs).

Both are memory/latency bound: the combine's bytes are its partial reads plus its
output writes; the scheduler moves a few hundred bytes, so its figure that matters
is the time in microseconds (its ratio to copy bandwidth is necessarily tiny).
"""
from __future__ import annotations

from perf.cases import BenchCase, register

D_V = 512


def _combine_inputs(b, s_q, h_q, splits):
    import torch

    n = b * splits
    dev = "cuda"
    return dict(
        o=torch.randn(n, s_q, h_q, D_V, device=dev),
        lse=torch.randn(n, s_q, h_q, device=dev),
        offsets=torch.arange(0, n + 1, splits, dtype=torch.int32, device=dev),
        out=torch.empty(b, s_q, h_q, D_V, dtype=torch.bfloat16, device=dev),
        lse_out=torch.empty(b, h_q, s_q, device=dev),
    )


def _combine_run(x):
    from cute_mla import ops

    ops.combine(x["o"], x["lse"], x["offsets"], x["out"], x["lse_out"], pdl=False)


@register
def combine_cases():
    for b, s_q, h_q, splits in [(128, 1, 128, 2), (128, 2, 128, 2), (16, 1, 128, 8), (128, 1, 16, 4)]:
        rows = b * s_q * h_q
        nbytes = rows * splits * (D_V * 4 + 4) + rows * (D_V * 2 + 4) + (b + 1) * 4
        yield BenchCase("combine", {"b": b, "s_q": s_q, "h_q": h_q, "splits": splits, "d_v": D_V},
                        "memory", flops=0.0, bytes=float(nbytes),
                        make_inputs=lambda b=b, s_q=s_q, h_q=h_q, n=splits: _combine_inputs(b, s_q, h_q, n),
                        run=_combine_run)


def _sched_inputs(b, mean):
    import torch

    g = torch.Generator().manual_seed(b)
    lens = (torch.randn(b, generator=g) * mean / 2 + mean).clamp_min(0).to(torch.int32)
    return lens.cuda()


def _sched_run(seqlens):
    from cute_mla import ops

    ops.plan_decode(seqlens, 66)


@register
def scheduler_cases():
    for b, mean in [(128, 4096), (1024, 4096)]:
        yield BenchCase("scheduler", {"b": b, "s_k": mean, "num_sm_parts": 66}, "memory",
                        flops=0.0, bytes=float(b * 4 + 66 * 32 + (b + 1) * 4),
                        make_inputs=lambda b=b, m=mean: _sched_inputs(b, m), run=_sched_run, rotate=1)
