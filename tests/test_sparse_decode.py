"""SM90 FP8 sparse decode (``flash_mla_with_kvcache`` with ``indices``) against the float32 reference (GPU;
skipped without one).

Test data (SPEC sections 3-5): q and K ~ randn/10 clipped to [-1, 1]; varlen s_k ~ N(s_k, s_k/2) clipped to
[1, 2 s_k]; each request owns ceil(s_k / page_block_size) pages taken from a random permutation of all
blocks, plus 3 spare blocks. Every (request, query token) selects distinct tokens of its own request in a
random slot order (-1 where topk exceeds the request's length), then ~10% of the slots are replaced by
invalid values of every magnitude (-1, -123456, -2**31, num_blocks*pbs, num_blocks*pbs+7, 2**31-1).
topk_length (MODEL1 only) is random in [0, topk], with some requests at 0, one at topk, one past topk.

What the poisoning guarantees: every cache token that no *counted* valid index selects (never selected,
selected only at a slot at or past topk_length, the tail of a last page, spare blocks) is NaN before
quantisation, so its FP8 codes and its scales are NaN bytes; the padding bytes between blocks are 0xFF (an
FP8 NaN); strided views have poisoned gaps. A kernel that loads, scales or multiplies anything it should
ignore (0 * NaN = NaN) therefore fails the comparison. V32 scales are multiplied by random factors in
[0.5, 2), so they are not powers of two; MODEL1 scales are ue8m0 by format. The reference computes in
float32 on the dequantised caches, dequantised as the kernels compute it, in the type the matmuls run in
(``kernels.common.fp8``): with f16 matmuls (V32's default) the scale rounded to f16, then fp8 * scale rounded
once to f16 (``quant.dequantize_kvcache(out_dtype=torch.float16)``), V32's RoPE bf16 as stored (its part
of S is a bf16 matmul); with bf16 matmuls (MODEL1's default) fp8 * scale rounded to bf16.
Against a float32 dequantisation, K's rounding alone would move a one-key lse past the 1e-6 abs bar (by
~5e-5 for bf16, ~6e-6 for f16). q stays bf16 in the reference.
Every test runs with both matmul types, forced (the ``matmul`` fixture; the per-format default is tested on
the CPU in test_fp8_formats.py). The fast subset and the corner cases run by default; ``-m full`` runs the whole
grid.
"""
import itertools
import zlib
from typing import NamedTuple, Optional

import pytest
import torch

import cute_mla
from cute_mla import ops, quant, registry
from cute_mla.reference import ref_sparse_decode
from cute_mla.testing import (SOFT, assert_close_named, data_for, make_paged_kv, randn_clipped, strided_view,
                              varlen_seqlens)
from cute_mla.layouts.kv_cache import UE8M0_NAN, format_for_dqk

pytestmark = pytest.mark.gpu
DEV = "cuda"
INF = float("inf")


class Source(NamedTuple):
    """One FP8 cache with its selection: the main cache or the extra one."""
    cache: Optional[torch.Tensor]  # float8_e4m3fn [num_blocks, pbs, 1, bytes_per_token]
    deq: Optional[torch.Tensor]  # float32 (f16 values; V32 RoPE bf16) [num_blocks, pbs, 1, d_qk], what the ref sees
    indices: Optional[torch.Tensor]  # int32 [b, s_q, topk]
    lengths: Optional[torch.Tensor]  # int32 [b] topk_length, or None


NO_SOURCE = Source(None, None, None, None)


@pytest.fixture(autouse=True, params=registry.SPARSE_DECODE_MATMULS)
def matmul(request, monkeypatch):
    """The sparse decode kernels' matmul type for this test (the API reads it from the environment)."""
    monkeypatch.setenv(registry.SPARSE_DECODE_MATMUL_ENV, request.param)
    return request.param


def dequantized(cache, fmt, rope):
    """The cache as the kernels' matmuls see it (module docstring); rope: V32's bf16 RoPE, or None."""
    if ops.sparse_decode_matmul(fmt.name) == "bf16":
        return quant.dequantize_kvcache(cache, out_dtype=torch.bfloat16).float()
    deq = quant.dequantize_kvcache(cache, out_dtype=torch.float16).float()
    if rope is not None:  # V32's RoPE is not part of V: its columns of S stay bf16, as stored
        deq[..., fmt.d_nope:] = rope.float()
    return deq


def make_lengths(b, topk, g, mode):
    """topk_length: None, "zero" (all 0) or "random" ([0, topk], ~20% zeros, [0] = topk, [1] = 0, [2] > topk)."""
    if mode is None:
        return None
    if mode == "zero":
        return torch.zeros(b, dtype=torch.int32, device=DEV)
    lens = torch.randint(0, topk + 1, (b,), generator=g, device=DEV, dtype=torch.int32)
    lens[torch.rand(b, generator=g, device=DEV) < 0.2] = 0
    lens[0] = topk
    if b > 1:
        lens[1] = 0
    if b > 2:
        lens[2] = topk + 100  # past topk: must count as topk
    return lens


def make_source(b, s_q, s_k, topk, pbs, d_qk, g, lengths=None, all_invalid=False, pad=0, data=SOFT):
    """A poisoned FP8 paged cache of b varlen requests and its indices (see the module docstring)."""
    seqlens = varlen_seqlens(b, s_k, g, min_len=1, max_len=2 * s_k)
    kv = make_paged_kv(seqlens, pbs, 1, d_qk, g, num_spare_blocks=3, data=data)  # page tails, spare blocks NaN
    n_rows = kv.k_cache.shape[0] * pbs
    seq = seqlens.to(DEV).long().view(b, 1, 1)
    L = int(seqlens.max())
    # min(topk, s_k) distinct token positions of the request per row, padded with L (invalid), slots shuffled
    keys = torch.rand(b, s_q, L, generator=g, device=DEV).masked_fill(torch.arange(L, device=DEV) >= seq, 2.0)
    pos = keys.argsort(dim=-1)[..., :topk]
    pos = torch.cat([pos, pos.new_full((b, s_q, topk - pos.shape[-1]), L)], dim=-1)
    pos = pos.gather(-1, torch.rand(b, s_q, topk, generator=g, device=DEV).argsort(dim=-1))
    page = (pos // pbs).clamp_(max=kv.block_table.shape[1] - 1).view(b, -1)
    block = kv.block_table.long().gather(1, page).view(b, s_q, topk)
    idx = torch.where(pos < seq, block * pbs + pos % pbs, -1)
    bad = torch.tensor([-1, -123456, -2**31, n_rows, n_rows + 7, 2**31 - 1], device=DEV)
    replace = torch.rand(b, s_q, topk, generator=g, device=DEV) < (1.0 if all_invalid else 0.1)
    idx = torch.where(replace, bad[torch.randint(0, len(bad), idx.shape, generator=g, device=DEV)], idx)
    lens = make_lengths(b, topk, g, lengths)
    # NaN-poison every token that no counted valid slot selects
    counted = (idx >= 0) & (idx < n_rows)
    if lens is not None:
        counted &= torch.arange(topk, device=DEV) < lens.long().view(b, 1, 1)
    used = torch.zeros(n_rows, dtype=torch.bool, device=DEV)
    used[idx[counted]] = True
    kv.k_cache.view(-1, d_qk)[~used] = float("nan")
    fmt = format_for_dqk(d_qk)
    stride = fmt.default_block_stride(pbs) + pad if pad else None
    cache = quant.quantize_kvcache(kv.k_cache, fmt, block_stride_bytes=stride)
    del kv
    rope = None
    if fmt.d_qk == 576:  # arbitrary (non power-of-two) float32 scales; NaN scales stay NaN
        nope, scales, rope = quant.unpack_v32(cache)
        factor = 0.5 + 1.5 * torch.rand(scales.shape, generator=g, device=DEV)
        cache = quant.pack_v32(nope, scales * factor, rope, block_stride_bytes=stride)
    gap = cache.stride(0) - fmt.block_bytes(pbs)
    if gap:  # padding between blocks: FP8 NaN bytes
        u8 = cache.view(torch.uint8)
        torch.as_strided(u8, (u8.shape[0], gap), (u8.stride(0), 1),
                         u8.storage_offset() + fmt.block_bytes(pbs)).fill_(0xFF)
    return Source(cache, dequantized(cache, fmt, rope), idx.to(torch.int32), lens)


def make_sparse_decode_inputs(b, s_q, h_q, d_qk, main, g, sink=False, lengths=None, extra=None, **src_kw):
    """q, the main Source, the extra Source (or None) and attn_sink (or None).

    main / extra = (s_k, topk, page_block_size); lengths: topk_length mode for both (see make_lengths);
    src_kw: all_invalid, pad (extra bytes of block stride), data (how values are drawn; SOFT).
    """
    q = src_kw.get("data", SOFT).values((b, s_q, h_q, d_qk), g)
    src = make_source(b, s_q, *main, d_qk, g, lengths, **src_kw)
    xsrc = make_source(b, s_q, *extra, d_qk, g, lengths, **src_kw) if extra else None
    attn_sink = None
    if sink:
        attn_sink = torch.randn(h_q, generator=g, device=DEV) * 2
        attn_sink[0], attn_sink[1] = INF, -INF
    return q, src, xsrc, attn_sink


def call(q, src, xsrc, sink, meta=None, cache=None, xcache=None, softmax_scale=None):
    """The public API; a fresh sched_meta unless one is given; cache / xcache override the Sources' caches."""
    meta = cute_mla.get_mla_metadata()[0] if meta is None else meta
    x = xsrc or NO_SOURCE
    return cute_mla.flash_mla_with_kvcache(
        q, src.cache if cache is None else cache, None, None, 512, meta, softmax_scale=softmax_scale,
        is_fp8_kvcache=True,
        indices=src.indices, attn_sink=sink, extra_k_cache=x.cache if xcache is None else xcache,
        extra_indices_in_kvcache=x.indices, topk_length=src.lengths, extra_topk_length=x.lengths)


def check(q, src, xsrc, sink, out, lse, softmax_scale=None, data=SOFT):
    b, s_q, h_q, _ = q.shape
    assert out.dtype == torch.bfloat16 and tuple(out.shape) == (b, s_q, h_q, 512)
    assert lse.dtype == torch.float32 and tuple(lse.shape) == (b, h_q, s_q)
    x = xsrc or NO_SOURCE
    ref_out, ref_lse = ref_sparse_decode(q, src.deq, src.indices, src.lengths, sink, x.deq, x.indices, x.lengths,
                                         softmax_scale=softmax_scale)
    assert_close_named("sparse_decode_out", out.float(), ref_out, data=data)
    assert_close_named("sparse_decode_lse", lse, ref_lse, data=data)


def run_case(b, s_q, h_q, d_qk, main, seed=0, data=SOFT, **kw):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q, src, xsrc, sink = make_sparse_decode_inputs(b, s_q, h_q, d_qk, main, g, data=data, **kw)
    scale = data.softmax_scale(d_qk)
    out, lse = call(q, src, xsrc, sink, softmax_scale=scale)
    check(q, src, xsrc, sink, out, lse, softmax_scale=scale, data=data)
    return out, lse


def _bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def same_bits(a, b):
    return all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------ grids
# case = (d_qk, h_q, b, s_q, (s_k, topk, pbs), sink, topk_length, extra (s_k, topk, pbs) or None)
TRIPLES = [(512, 64, 2), (512, 64, 64), (512, 64, 69), (1024, 576, 2), (1024, 576, 61),
           (2046, 2048, 2), (2046, 2048, 64), (2046, 2048, 576)]
MAIN_GRID = [(d, h, b, s_q, t, i // 2 % 2 == 1, d == 512 and i // 4 % 2 == 1, None)
             for i, (d, h, t, b, s_q) in enumerate(itertools.product([576, 512], [64, 128], TRIPLES,
                                                                     [4, 74, 321], [1, 3]))]
# MODEL1 with topk_length and the extra cache: every (main, extra) pair, b in {4, 74}, the rest alternating
EXTRA_GRID = [(512, (64, 128)[i // 5 % 2], b, (1, 3)[i // 3 % 2], t, i // 7 % 2 == 0, True, x)
              for i, (t, x, b) in enumerate(itertools.product(TRIPLES, TRIPLES, [4, 74]))]
# tensor-parallel shards of 128 heads (h_q 8, 16, 32): s_q 1-4, both formats, the sink, topk_length and the
# extra cache (MODEL1) alternating
SMALL_HEAD_GRID = [(d, h, b, s_q, t, i % 2 == 0, d == 512 and i // 2 % 2 == 0,
                    (512, 64, 69) if d == 512 and i % 3 == 0 else None)
                   for i, (d, h, t, b, s_q) in enumerate(itertools.product([576, 512], [8, 16, 32], TRIPLES,
                                                                           [4, 74], [1, 2, 3, 4]))]
FULL_GRID = MAIN_GRID + EXTRA_GRID + SMALL_HEAD_GRID
FAST = [
    (576, 64, 4, 1, (512, 64, 2), False, False, None),
    (576, 128, 74, 3, (1024, 576, 61), True, False, None),
    (576, 128, 4, 1, (2046, 2048, 576), True, False, None),
    (576, 64, 74, 3, (2046, 2048, 2), False, False, None),
    (512, 64, 74, 3, (512, 64, 69), False, False, None),
    (512, 128, 4, 1, (1024, 576, 2), True, True, None),
    (512, 64, 4, 3, (2046, 2048, 64), True, True, (512, 64, 2)),
    (512, 128, 74, 1, (1024, 576, 61), False, True, (2046, 2048, 576)),
    (576, 16, 74, 2, (2046, 2048, 64), True, False, None),
    (512, 8, 4, 4, (1024, 576, 61), True, True, (512, 64, 2)),
    (576, 32, 4, 3, (512, 64, 69), False, False, None),
]


def _id(c):
    d, h, b, s_q, t, sink, lens, x = c
    return (f"d{d}-h{h}-b{b}-sq{s_q}-sk{t[0]}-topk{t[1]}-pbs{t[2]}" + ("-sink" if sink else "")
            + ("-len" if lens else "") + (f"-x{x[0]}-{x[1]}-{x[2]}" if x else ""))


def _run(c, data):
    d, h, b, s_q, t, sink, lens, x = c
    run_case(b, s_q, h, d, t, seed=zlib.crc32(_id(c).encode()), sink=sink,
             lengths="random" if lens else None, extra=x, data=data)


def _grid(cases):
    """(case, data) pairs: every third case on sharp logits (cute_mla.testing.data_for)."""
    return [pytest.param(c, data_for(i), id=f"{_id(c)}-{data_for(i).name}") for i, c in enumerate(cases)]


@pytest.mark.parametrize("case", [FAST[1], FAST[3], FAST[5], FAST[7]], ids=_id)
def test_out_matches_exact_dequantisation(case):
    """The matmuls against the exact cache: out from a float32 dequantisation (fp8 * float32 scale, no
    rounding) within the same out tolerance. (lse is held to the rounded reference only: K's rounding alone
    moves a one-key lse past its 1e-6 abs bar, see the module docstring.)"""
    d, h, b, s_q, t, sink, lens, x = case
    g = torch.Generator(device=DEV).manual_seed(zlib.crc32(_id(case).encode()))
    q, src, xsrc, attn_sink = make_sparse_decode_inputs(b, s_q, h, d, t, g, sink=sink,
                                                        lengths="random" if lens else None, extra=x)
    out, _ = call(q, src, xsrc, attn_sink)
    exact = [None if s is None else quant.dequantize_kvcache(s.cache, out_dtype=torch.float32)
             for s in (src, xsrc)]
    xs = xsrc or NO_SOURCE
    ref_out, _ = ref_sparse_decode(q, exact[0], src.indices, src.lengths, attn_sink, exact[1], xs.indices,
                                   xs.lengths)
    assert_close_named("sparse_decode_out", out.float(), ref_out)


@pytest.mark.parametrize("case,data", _grid(FAST))
def test_sparse_decode_fast(case, data):
    _run(case, data)


@pytest.mark.full
@pytest.mark.parametrize("case,data", _grid(FULL_GRID))
def test_sparse_decode_full_grid(case, data):
    _run(case, data)


@pytest.mark.parametrize("matmul", ["bf16"], indirect=True)
@pytest.mark.parametrize("d_qk", [576, 512])
def test_bf16_matmuls_take_values_past_f16_range(d_qk, matmul):
    """q and the dequantised cache scaled by 2^17 (|x| up to 131072, past f16's 65504; powers of two, so the
    reference's rounding is unchanged) with the softmax scale divided by 2^34 (the same logits): with bf16
    matmuls out / 2^17 and lse match the reference's within the usual tolerances (f16 ones would overflow,
    as the API docstring says)."""
    g = torch.Generator(device=DEV).manual_seed(10)
    q, src, xsrc, sink = make_sparse_decode_inputs(8, 2, 128, d_qk, (1024, 576, 61), g, sink=True,
                                                   lengths=_lens(d_qk), extra=_extra(d_qk))
    fmt = format_for_dqk(d_qk)

    def scaled(s):
        if s is None:
            return None
        if d_qk == 576:
            nope, scales, rope = quant.unpack_v32(s.cache)
            cache = quant.pack_v32(nope, scales * 2.0**17, rope * 2.0**17)
        else:
            nope, exps, rope = quant.unpack_model1(s.cache)
            finite = exps != UE8M0_NAN  # NaN-poisoned tokens stay NaN
            cache = quant.pack_model1(nope, torch.where(finite, exps + 17, exps), rope * 2.0**17)
        return s._replace(cache=cache, deq=dequantized(cache, fmt, None))

    q, src, xsrc = q * 2.0**17, scaled(src), scaled(xsrc)
    assert float(q.abs().max()) > 65504 and float(src.deq.nan_to_num().abs().max()) > 65504
    softmax_scale = d_qk ** -0.5 * 2.0**-34
    out, lse = call(q, src, xsrc, sink, softmax_scale=softmax_scale)
    x = xsrc or NO_SOURCE
    ref_out, ref_lse = ref_sparse_decode(q, src.deq, src.indices, src.lengths, sink, x.deq, x.indices, x.lengths,
                                         softmax_scale=softmax_scale)
    assert_close_named("sparse_decode_out", out.float() * 2.0**-17, ref_out * 2.0**-17)
    assert_close_named("sparse_decode_lse", lse, ref_lse)


def test_unknown_matmul_type_names_the_variable(monkeypatch):
    g = torch.Generator(device=DEV).manual_seed(11)
    q, src, xsrc, sink = make_sparse_decode_inputs(2, 1, 64, 512, (128, 128, 64), g)
    monkeypatch.setenv(registry.SPARSE_DECODE_MATMUL_ENV, "fp8")
    with pytest.raises(ValueError, match=registry.SPARSE_DECODE_MATMUL_ENV):
        call(q, src, xsrc, sink)


# ------------------------------------------------------------------------------------------------ corners
def _extra(d_qk, x=(512, 64, 69)):
    return x if d_qk == 512 else None  # topk_length and the extra cache: MODEL1 only


def _lens(d_qk):
    return "random" if d_qk == 512 else None


def _empty(out, lse):
    return bool((out == 0).all()) and bool(torch.isposinf(lse).all())


# corners at every head count (h_q 128 is two row blocks of one query token, h_q 16 a quarter of one)
@pytest.mark.parametrize("h_q", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("d_qk", [576, 512])
def test_all_indices_invalid(d_qk, h_q):
    out, lse = run_case(4, 3, h_q, d_qk, (1024, 576, 61), seed=1, sink=True, extra=_extra(d_qk), all_invalid=True)
    assert _empty(out, lse)


def test_all_lengths_zero():
    out, lse = run_case(4, 3, 128, 512, (1024, 576, 61), seed=2, sink=True, lengths="zero", extra=(512, 64, 2))
    assert _empty(out, lse)


def test_some_requests_zero_length():
    out, lse = run_case(16, 2, 64, 512, (512, 64, 64), seed=3, sink=True, lengths="random", extra=(1024, 576, 61))
    assert _empty(out[1], lse[1])  # request 1: topk_length 0 and extra_topk_length 0


@pytest.mark.parametrize("h_q", [8, 16, 64])
@pytest.mark.parametrize("d_qk", [576, 512])
def test_many_short_requests_a_part(d_qk, h_q):
    """400 requests of 0-2 blocks (topk 128, random topk_length: empty and one-block pieces; MODEL1 an extra
    cache too): a part holds several requests' pieces, each started on its own (its first block's stage, then,
    with ``stage_ahead``, each next block's before the current one is converted)."""
    run_case(400, 2, h_q, d_qk, (256, 128, 64), seed=5, sink=True, lengths="random",
             extra=(256, 64, 61) if d_qk == 512 else None)


@pytest.mark.parametrize("d_qk", [576, 512])
def test_sink_infinities(d_qk):
    g = torch.Generator(device=DEV).manual_seed(4)
    q, src, xsrc, _ = make_sparse_decode_inputs(8, 3, 128, d_qk, (1024, 576, 61), g, lengths=_lens(d_qk),
                                                extra=_extra(d_qk))
    base = call(q, src, xsrc, None)
    check(q, src, xsrc, None, *base)
    minus = call(q, src, xsrc, torch.full((128,), -INF, device=DEV))
    assert same_bits(base, minus)  # -inf changes nothing
    plus = call(q, src, xsrc, torch.full((128,), INF, device=DEV))
    assert bool((plus[0] == 0).all()) and same_bits(base[1:], plus[1:])  # +inf: out 0, lse without sink


@pytest.mark.parametrize("d_qk", [576, 512])
def test_int8_and_uint8_cache_views(d_qk):
    g = torch.Generator(device=DEV).manual_seed(5)
    q, src, xsrc, sink = make_sparse_decode_inputs(8, 2, 64, d_qk, (1024, 576, 2), g, sink=True,
                                                   lengths=_lens(d_qk), extra=_extra(d_qk))
    base = call(q, src, xsrc, sink)
    check(q, src, xsrc, sink, *base)
    for dt in (torch.int8, torch.uint8):
        res = call(q, src, xsrc, sink, cache=src.cache.view(dt), xcache=xsrc and xsrc.cache.view(dt))
        assert same_bits(base, res), dt


@pytest.mark.parametrize("h_q", [16, 64, 128])
@pytest.mark.parametrize("d_qk,pad", [(576, 48), (512, 576)])
def test_padded_block_stride(d_qk, pad, h_q):
    run_case(8, 3, h_q, d_qk, (1024, 576, 61), seed=6, sink=True, lengths=_lens(d_qk), extra=_extra(d_qk), pad=pad)


@pytest.mark.parametrize("h_q", [8, 64, 128])
@pytest.mark.parametrize("d_qk", [576, 512])
def test_strided_q_and_indices(d_qk, h_q):
    g = torch.Generator(device=DEV).manual_seed(7)
    q, src, xsrc, sink = make_sparse_decode_inputs(8, 3, h_q, d_qk, (1024, 576, 61), g, sink=True,
                                                   lengths=_lens(d_qk), extra=_extra(d_qk))
    q = strided_view(q, dim=2)
    src = src._replace(indices=strided_view(src.indices, dim=1))
    if xsrc is not None:
        xsrc = xsrc._replace(indices=strided_view(xsrc.indices, dim=1))
    assert not q.is_contiguous() and not src.indices.is_contiguous()
    check(q, src, xsrc, sink, *call(q, src, xsrc, sink))


@pytest.mark.parametrize("d_qk", [576, 512])
def test_deterministic_over_five_runs(d_qk):
    g = torch.Generator(device=DEV).manual_seed(8)
    q, src, xsrc, sink = make_sparse_decode_inputs(74, 3, 128, d_qk, (2046, 2048, 64), g, sink=True,
                                                   lengths=_lens(d_qk), extra=_extra(d_qk, (1024, 576, 61)))
    meta, _ = cute_mla.get_mla_metadata()  # one sched_meta serves every rerun (same configuration)
    first = [t.clone() for t in call(q, src, xsrc, sink, meta=meta)]
    check(q, src, xsrc, sink, *first)
    for _ in range(5):
        assert same_bits(first, call(q, src, xsrc, sink, meta=meta))


@pytest.mark.parametrize("d_qk", [576, 512])
def test_cuda_graph_capture(d_qk):
    g = torch.Generator(device=DEV).manual_seed(9)
    q, src, xsrc, sink = make_sparse_decode_inputs(8, 2, 128, d_qk, (1024, 576, 61), g, sink=True,
                                                   lengths=_lens(d_qk), extra=_extra(d_qk, (512, 64, 2)))
    meta, _ = cute_mla.get_mla_metadata()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # eager call: loads the module and fills sched_meta outside the capture
        eager = call(q, src, xsrc, sink, meta=meta)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = call(q, src, xsrc, sink, meta=meta)
    graph.replay()
    torch.cuda.synchronize()
    assert same_bits(eager, (out, lse))
    q.copy_(randn_clipped(q.shape, g))  # the replay must read the new q
    graph.replay()
    torch.cuda.synchronize()
    check(q, src, xsrc, sink, out, lse)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(q=a["q"].half()), r"\bq\b"),
    (lambda a: a.update(q=a["q"][:, :, :48]), r"\bh_q\b"),
    (lambda a: a.update(indices=a["indices"][..., :100]), r"\btopk\b|\bindices\b"),
    (lambda a: a.update(indices=a["indices"].long()), r"\bindices\b"),
    (lambda a: a.update(q=torch.cat([a["q"], a["q"][..., :64]], dim=-1)), r"\bk_cache\b"),  # d_qk 576, MODEL1
    (lambda a: a.update(extra_indices_in_kvcache=None), r"extra_indices_in_kvcache|extra_k_cache"),
    (lambda a: a.update(topk_length=a["topk_length"][:-1]), r"\btopk_length\b"),
], ids=["q-fp16", "h_q-48", "topk-100", "indices-int64", "k_cache-vs-d_qk", "extra-without-indices",
        "topk_length-shape"])
def test_bad_input_names_the_argument(mutate, match):
    g = torch.Generator(device=DEV).manual_seed(0)
    q, src, xsrc, _ = make_sparse_decode_inputs(2, 1, 64, 512, (128, 128, 64), g, lengths="random",
                                                extra=(128, 64, 64))
    args = dict(q=q, k_cache=src.cache, block_table=None, cache_seqlens=None, head_dim_v=512, is_fp8_kvcache=True,
                indices=src.indices, topk_length=src.lengths, extra_k_cache=xsrc.cache,
                extra_indices_in_kvcache=xsrc.indices, extra_topk_length=xsrc.lengths)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        cute_mla.flash_mla_with_kvcache(tile_scheduler_metadata=cute_mla.get_mla_metadata()[0], **args)
