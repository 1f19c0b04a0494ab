"""Benchmark cases for SM90 sparse prefill (issue 5's list): s_q 4096 with a sink.

FLOPs follow SPEC.md section 6 (2 * s_q * topk * h_q * (d_qk + d_v), every index valid);
bytes count q, out and the kv tensor once (the gathers re-read rows, from L2 when they fit).
"""
from __future__ import annotations

from perf.cases import BenchCase, register

S_Q, D_V = 4096, 512  # s_q unless a case says otherwise
FLASHMLA = {"value": 640, "unit": "TFLOPS", "device": "H800"}


def _inputs(s_q, s_kv, topk, h_q, d_qk):
    import torch

    from cute_mla.testing import randn_clipped

    g = torch.Generator(device="cuda").manual_seed(s_kv + topk + h_q)
    q = randn_clipped((s_q, h_q, d_qk), g)
    kv = randn_clipped((s_kv, 1, d_qk), g)
    # uniformly random rows: at 128K the gathers miss L2, as the issue intends
    indices = torch.randint(0, s_kv, (s_q, 1, topk), generator=g, device="cuda", dtype=torch.int32)
    sink = torch.randn(h_q, generator=g, device="cuda")
    return q, kv, indices, sink, d_qk ** -0.5


def _run(x):
    import cute_mla

    q, kv, indices, sink, scale = x
    return cute_mla.flash_mla_sparse_fwd(q, kv, indices, scale, attn_sink=sink)


def _peer(ops, x):
    q, kv, indices, sink, scale = x
    return lambda: ops.sparse_prefill_fwd(q, kv, indices, scale, D_V, sink, None, None)


def _case(s_kv, topk, h_q, d_qk, s_q=S_Q):
    flops = 2 * s_q * topk * h_q * (d_qk + D_V)
    nbytes = 2 * (s_q * h_q * d_qk + s_kv * d_qk + s_q * h_q * D_V) + 4 * s_q * topk
    return BenchCase("sparse_prefill", {"s_q": s_q, "s_kv": s_kv, "topk": topk, "h_q": h_q, "d_qk": d_qk,
                                        "sink": True},
                     "compute", flops=float(flops), bytes=float(nbytes),
                     make_inputs=lambda: _inputs(s_q, s_kv, topk, h_q, d_qk), run=_run, published=FLASHMLA, rotate=1,
                     peer=_peer, compare=("sparse_prefill_out", "sparse_prefill_max_logits", "sparse_prefill_lse"))


@register
def sparse_prefill_cases():
    for s_kv in (8192, 32768, 65536, 98304, 131072):
        yield _case(s_kv, 2048, 128, 576)
    for h_q, topk in ((64, 512), (128, 1024)):
        for s_kv in (8192, 32768, 49152, 65536):
            yield _case(s_kv, topk, h_q, 512)
    yield _case(4096, 128, 64, 576, s_q=70000)  # very long s_q, small topk (issue 18's table)
