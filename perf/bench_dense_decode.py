"""Benchmark cases for SM90 dense MLA decode (issue 3's list).

FLOPs and bytes follow SPEC.md section 6 (no causal discount).  Each input set
gets its schedule computed once in ``make_inputs`` (as the first layer of a
decode step would), so the timed call is what every later layer pays.
"""
from __future__ import annotations

from perf.cases import BenchCase, register

D_QK, D_V = 576, 512
FLASHMLA_COMPUTE = {"value": 660, "unit": "TFLOPS", "device": "H800"}
FLASHMLA_MEMORY = {"value": 3000, "unit": "GB/s", "device": "H800"}


def _inputs(b, s_q, s_k, h_q, h_kv, causal, dtype_name):
    import torch

    import cute_mla
    from cute_mla.testing import make_paged_kv, randn_clipped, varlen_seqlens

    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device="cuda").manual_seed(b * 7 + s_k)
    lens = varlen_seqlens(b, s_k, g, min_len=1)
    kv = make_paged_kv(lens, 64, h_kv, D_QK, g, dtype=dtype, poison=False)
    q = randn_clipped((b, s_q, h_q, D_QK), g, dtype=dtype)
    meta, _ = cute_mla.get_mla_metadata()
    cute_mla.flash_mla_with_kvcache(q, kv.k_cache, kv.block_table, kv.cache_seqlens, D_V, meta, causal=causal)
    return (q, kv.k_cache, kv.block_table, kv.cache_seqlens, meta, causal, float(lens.float().mean()))


def _run(x):
    import cute_mla

    q, k_cache, block_table, seqlens, meta, causal, _ = x
    return cute_mla.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, D_V, meta, causal=causal)


def _peer(ops, x):
    """FlashMLA's dense decode on the same inputs: its schedule made by a first call, then reused."""
    q, k_cache, block_table, seqlens, _, causal, _ = x
    scale = q.shape[-1] ** -0.5
    _, _, meta, splits = ops.dense_decode_fwd(q, k_cache, D_V, seqlens, block_table, scale, causal, None, None, None)
    return lambda: ops.dense_decode_fwd(q, k_cache, D_V, seqlens, block_table, scale, causal, meta, splits, None)[:2]


def _case(b, s_q, s_k, h_q, h_kv, causal, bound, dtype_name="bfloat16"):
    # mean_s_k of varlen_seqlens is s_k in expectation; FLOPs/bytes use the nominal s_k
    flops = b * h_q * s_q * (2 * D_QK + 2 * D_V) * s_k
    nbytes = b * (2 * s_q * h_q * D_QK + 2 * s_k * h_kv * D_QK + 2 * s_q * h_q * D_V)
    kernel = "dense_decode" if dtype_name == "bfloat16" else "dense_decode_fp16"
    return BenchCase(kernel, {"b": b, "s_q": s_q, "s_k": s_k, "h_q": h_q, "h_kv": h_kv, "d_qk": D_QK,
                              "page_block_size": 64, "causal": causal, "varlen": True},
                     bound, flops=float(flops), bytes=float(nbytes),
                     make_inputs=lambda: _inputs(b, s_q, s_k, h_q, h_kv, causal, dtype_name), run=_run,
                     published=FLASHMLA_COMPUTE if bound == "compute" else FLASHMLA_MEMORY, rotate=1,
                     peer=_peer, compare=("dense_decode_out", "decode_lse"), graph=True)


@register
def dense_decode_cases():
    for s_q in (1, 2):
        for s_k in (4096, 8192, 16384, 32768):
            for causal in (False, True):
                yield _case(128, s_q, s_k, 128, 1, causal, "compute")
    # issue 19's side-by-side cases for tensor-parallel shards (FlashMLA unpadded): 8, 16, 32 heads
    for b in (32, 128):
        for s_q in (1, 2):
            for h_q in (8, 16, 32):
                yield _case(b, s_q, 8192, h_q, 1, False, "memory")
    # the side-by-side table of issue 18: few heads, a small batch, one very long request
    yield _case(64, 1, 2048, 8, 1, False, "memory")
    yield _case(5, 3, 777, 64, 1, True, "memory")
    yield _case(1, 1, 1 << 20, 128, 1, False, "memory")
