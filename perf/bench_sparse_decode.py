"""Benchmark cases for SM90 FP8 sparse MLA decode (issue 4's list), with s_q 2 unless said, and a sink.

Three families:

- V32 (d_qk 576, 656-byte tokens): h_q 128, s_k 32768, topk 2048, page_block_size 64, b in {2, 64, 74, 128};
  b=128 is FlashMLA's headline configuration (410 TFLOPS on H800).
- MODEL1 (d_qk 512, 584-byte tokens): a main cache of s_k 16384 plus an extra cache of 16384 tokens (own page
  size), b in {2, 64, 74, 128, 148, 256}, for (h_q, topk + extra_topk, main/extra page size) in
  (64, 128 + 512, 256/64), (128, 128 + 1024, 256/64), and (64 and 128, 128 + 1024, 256/2) with an
  extra_topk_length drawn uniformly from [extra_topk/2, extra_topk] per request (no main topk_length).
- Peak: b 148, s_k 32768, topk 16384, page_block_size 64, h_q in {64, 128} x both formats.
- Small heads (tensor-parallel shards): h_q in {8, 16, 32}, b in {32, 128}, s_q in {1, 2}, V32 topk 2048 and
  MODEL1 topk 512 (s_k 32768, page_block_size 64); FlashMLA's side runs on q padded to 64 heads.
- The V32 b=128 and peak cases again in the matmul type that is not their format's default
  (``cute_mla.ops.sparse_decode_matmul``): V32 in bf16 (``sparse_decode_bf16``), MODEL1 in f16
  (``sparse_decode_f16``).

Inputs: every request owns s_k tokens of its own (ceil(s_k / page_block_size) blocks, and likewise in the extra
cache), the blocks of all requests randomly permuted; each query token selects topk distinct random positions of
its request. The cache is random bf16 K rows quantised with ``cute_mla.quant.quantize_kvcache`` in slices
(quantising gigabytes at once would need several times that in temporaries). One ``sched_meta`` per input set
lives in the inputs: the first (warm-up) call computes the schedule and every timed call reuses it, as the
layers of one decode step do.

FLOPs follow SPEC.md section 6: 2 * h_q * b * s_q * topk_total * (d_qk + d_v), d_v = 512, with topk_total =
topk + extra_topk. Where extra_topk_length is given, the extra term is the mean of the lengths actually passed:
they are drawn at case creation (Python ``random``, seeded per case, so no GPU is needed to count the work) and
every input set of the case uses the same lengths. The time is the whole call, i.e. split kernel start to
combine end. Bytes (q + out + the selected cache tokens at their per-token size + the counted indices) bound the
traffic from above; the cases are reported as compute-bound.

Published reference: FlashMLA's 410 TFLOPS (H800) is a V32 figure, carried by every V32 case as dense decode
carries its figure on all its compute-bound cases; MODEL1 has no published H800 figure, so its cases carry none.
"""
from __future__ import annotations

import math
import os
import random

from perf.cases import BenchCase, register

S_Q, D_V = 2, 512
V32_TOKEN_BYTES, MODEL1_TOKEN_BYTES = 656, 584
CHUNK_TOKENS = 1 << 18      # tokens quantised per slice (~2 GB of temporaries for V32)
FLASHMLA_V32 = {"value": 410, "unit": "TFLOPS", "device": "H800"}


def _fmt(d_qk):
    return "V32" if d_qk == 576 else "MODEL1"


def _token_bytes(d_qk):
    return V32_TOKEN_BYTES if d_qk == 576 else MODEL1_TOKEN_BYTES


def _cache(num_blocks, pbs, d_qk, g):
    """Random FP8 paged cache [num_blocks, pbs, 1, bytes_per_token], quantised CHUNK_TOKENS at a time."""
    import torch

    from cute_mla.quant import empty_kvcache, quantize_kvcache
    from cute_mla.testing import randn_clipped

    cache = empty_kvcache(num_blocks, pbs, _fmt(d_qk), device=g.device)
    dst = cache.view(torch.uint8)
    step = max(1, CHUNK_TOKENS // pbs)
    for i in range(0, num_blocks, step):
        n = min(step, num_blocks - i)
        dst[i:i + n].copy_(quantize_kvcache(randn_clipped((n, pbs, 1, d_qk), g)).view(torch.uint8))
    return cache


def _indices(b, s_q, s_k, topk, pbs, g):
    """[b, s_q, topk] int32: per (request, query token), topk distinct positions in [0, s_k) of that request's
    own tokens, as block * pbs + offset through a random permutation of all b * ceil(s_k / pbs) blocks."""
    import torch

    nblk = math.ceil(s_k / pbs)
    table = torch.randperm(b * nblk, generator=g, device=g.device).view(b, nblk)
    pos = torch.rand(b * s_q, s_k, generator=g, device=g.device).argsort(dim=-1)[:, :topk].reshape(b, s_q * topk)
    idx = table.gather(1, pos // pbs) * pbs + pos % pbs
    return idx.view(b, s_q, topk).to(torch.int32)


def _inputs(b, s_q, h_q, d_qk, s_k, topk, pbs, extra, extra_lens, seed):
    import torch

    import cute_mla
    from cute_mla.testing import randn_clipped

    g = torch.Generator(device="cuda").manual_seed(seed)
    q = randn_clipped((b, s_q, h_q, d_qk), g)
    sink = torch.randn(h_q, generator=g, device="cuda")
    cache = _cache(b * math.ceil(s_k / pbs), pbs, d_qk, g)
    indices = _indices(b, s_q, s_k, topk, pbs, g)
    xcache = xindices = xlens = None
    if extra is not None:
        x_s_k, x_topk, x_pbs = extra
        xcache = _cache(b * math.ceil(x_s_k / x_pbs), x_pbs, d_qk, g)
        xindices = _indices(b, s_q, x_s_k, x_topk, x_pbs, g)
        if extra_lens is not None:
            xlens = torch.tensor(extra_lens, dtype=torch.int32, device="cuda")
    meta, _ = cute_mla.get_mla_metadata()
    return q, cache, indices, sink, xcache, xindices, xlens, meta


def _run(x, matmul):
    import cute_mla
    from cute_mla import registry

    q, cache, indices, sink, xcache, xindices, xlens, meta = x
    env = registry.SPARSE_DECODE_MATMUL_ENV
    before = os.environ.get(env)
    os.environ[env] = matmul or "auto"
    try:
        return cute_mla.flash_mla_with_kvcache(q, cache, None, None, D_V, meta, softmax_scale=None,
                                               is_fp8_kvcache=True, indices=indices, attn_sink=sink,
                                               extra_k_cache=xcache, extra_indices_in_kvcache=xindices,
                                               topk_length=None, extra_topk_length=xlens)
    finally:
        if before is None:
            del os.environ[env]
        else:
            os.environ[env] = before


def _peer(ops, x):
    """FlashMLA's sparse decode on the same inputs: its schedule made by a first call, then reused.  It takes
    h_q 64 or 128 only, so fewer heads run as engines run them today, on q and the sink padded with zero heads
    to 64 (padded once here, untimed: the comparison leaves out the engines' copy) and the outputs' first h_q
    heads kept (views)."""
    import torch

    q, cache, indices, sink, xcache, xindices, xlens, _ = x
    h_q = q.shape[2]
    scale = q.shape[-1] ** -0.5
    if h_q < 64:
        q = torch.cat([q, q.new_zeros(*q.shape[:2], 64 - h_q, q.shape[3])], dim=2)
        sink = torch.cat([sink, sink.new_zeros(64 - h_q)])
    _, _, meta, splits = ops.sparse_decode_fwd(q, cache, indices, None, sink, None, None, xcache, xindices, xlens,
                                               D_V, scale, None)

    def run():
        out, lse = ops.sparse_decode_fwd(q, cache, indices, None, sink, meta, splits, xcache, xindices, xlens, D_V,
                                         scale, None)[:2]
        return out[:, :, :h_q], lse[:, :h_q]
    return run


def _case(b, h_q, d_qk, s_k, topk, pbs, extra=None, extra_topk_length=False, matmul=None, s_q=S_Q):
    """extra: (extra_s_k, extra_topk, extra_pbs) of the extra cache, or None; matmul: the kernels' matmul type
    when not the format's default (kernel ``sparse_decode_<matmul>``)."""
    params = {"fmt": _fmt(d_qk), "b": b, "s_q": s_q, "h_q": h_q, "d_qk": d_qk, "s_k": s_k, "topk": topk,
              "pbs": pbs}
    seed = b * 7 + h_q + d_qk + s_k + topk + pbs
    extra_lens, x_counted = None, 0.0
    if extra is not None:
        x_s_k, x_topk, x_pbs = extra
        params.update(extra_s_k=x_s_k, extra_topk=x_topk, extra_pbs=x_pbs, extra_topk_length=extra_topk_length)
        seed += 3 * x_topk + x_pbs
        x_counted = float(x_topk)
        if extra_topk_length:
            rng = random.Random(seed)
            extra_lens = [rng.randint(x_topk // 2, x_topk) for _ in range(b)]
            x_counted = sum(extra_lens) / b
    params["sink"] = True
    topk_total = topk + x_counted
    flops = 2 * h_q * b * s_q * topk_total * (d_qk + D_V)
    nbytes = (2 * b * s_q * h_q * (d_qk + D_V)                          # q in, out back (bf16)
              + b * s_q * topk_total * (_token_bytes(d_qk) + 4))         # selected tokens + their indices
    return BenchCase("sparse_decode" + (f"_{matmul}" if matmul else ""), params, "compute",
                     flops=float(flops), bytes=float(nbytes),
                     make_inputs=lambda: _inputs(b, s_q, h_q, d_qk, s_k, topk, pbs, extra, extra_lens, seed),
                     run=lambda x: _run(x, matmul), published=FLASHMLA_V32 if d_qk == 576 else None,
                     peer=_peer, compare=("sparse_decode_out", "sparse_decode_lse"), graph=True)


@register
def sparse_decode_cases():
    for b in (2, 64, 74, 128):
        yield _case(b, 128, 576, 32768, 2048, 64)
    for h_q, x_topk, x_pbs, x_len in ((64, 512, 64, False), (128, 1024, 64, False),
                                      (64, 1024, 2, True), (128, 1024, 2, True)):
        for b in (2, 64, 74, 128, 148, 256):
            yield _case(b, h_q, 512, 16384, 128, 256, extra=(16384, x_topk, x_pbs), extra_topk_length=x_len)
    for h_q in (64, 128):
        for d_qk in (512, 576):
            yield _case(148, h_q, d_qk, 32768, 16384, 64)
    # the other matmul type (CUTE_MLA_SPARSE_DECODE_MATMUL) on the headline and peak cases
    yield _case(128, 128, 576, 32768, 2048, 64, matmul="bf16")
    # issue 18's table: topk 512 at one and two query tokens
    yield _case(74, 64, 576, 32768, 512, 64, s_q=1)
    yield _case(64, 64, 512, 32768, 512, 64, s_q=1)
    yield _case(128, 128, 512, 32768, 512, 64)
    for h_q in (64, 128):
        for d_qk in (512, 576):
            yield _case(148, h_q, d_qk, 32768, 16384, 64, matmul="bf16" if d_qk == 576 else "f16")
    # issue 19: tensor-parallel shards of 128 heads, against FlashMLA on q padded to 64 heads
    for h_q in (8, 16, 32):
        for b in (32, 128):
            for s_q in (1, 2):
                yield _case(b, h_q, 576, 32768, 2048, 64, s_q=s_q)
                yield _case(b, h_q, 512, 32768, 512, 64, s_q=s_q)
