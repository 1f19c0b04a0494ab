"""Kernel parameter ABIs: what each compiled kernel takes, in order.

The compile step specialises every kernel from these specs (static extents and
strides are compiled in, named ones stay dynamic) and the launcher packs runtime
tensors by them, so this file is the one place the two meet.  Shape comments use
SPEC.md's names.
"""
from __future__ import annotations

from cute_mla.layouts.abi import ScalarArg, TensorArg, TmaArg
from cute_mla.layouts.constants import D_V, PAGE_BLOCK_SIZE


def split_kv_partials(dtype_out: str = "bf16"):
    """The split-KV partial buffers written by decode kernels and read by the combine."""
    return (
        # (total_splits, s_q, h_q, d_v) float32: partial O of each split, already divided
        # by its own softmax sum.  Split rows with lse = -inf are never read.
        TensorArg("o_accum", "f32", ("n_splits", "s_q", "h_q", D_V), ("so0", "so1", D_V, 1),
                  divisibility=(("so0", 4), ("so1", 4))),
        # (total_splits, s_q, h_q) float32: base-2 log-sum-exp of each split's scaled logits
        TensorArg("lse_accum", "f32", ("n_splits", "s_q", "h_q"), ("sl0", "sl1", 1), align=4),
    )


def split_counters():
    """Dense decode's ticket schedule (``kernels.sm90.split_tickets``), int32, SPLIT_COUNTS +
    b * h_kv * row_blocks of them (the slots are named in ``layouts.constants``): the ticket
    counter, the finished CTAs, then the count of written splits of each (request, kv head, row
    block) at SPLIT_COUNTS + (request * h_kv + kv head) * row_blocks + row block.  All zero
    before a launch, and the launch leaves them zero."""
    return TensorArg("split_counters", "i32", ("n_counters",), (1,), align=4)


def combine_args(dtype: str, columns: int = 0):
    """The combine (kernels.common.combine); ``columns`` picks its work split, not its operands."""
    return split_kv_partials() + (
        # (b + 1,) int32: split_offsets[i] = first partial row of request i
        TensorArg("split_offsets", "i32", ("b1",), (1,), align=4),
        # (h_q,) float32 attention sink (a dummy 1-element tensor when absent)
        TensorArg("attn_sink", "f32", ("h_sink",), (1,), align=4),
        # (b, s_q, h_q, d_v) final output in q's dtype
        TensorArg("out", dtype, ("b", "s_q", "h_q", D_V), ("ob", "os", "oh", 1),
                  divisibility=(("ob", 8), ("os", 8), ("oh", 8))),
        # (b, h_q, s_q) float32 natural-log lse
        TensorArg("lse", "f32", ("b", "h_q", "s_q"), ("lb", "lh", 1), align=4),
        ScalarArg("skip_single_split"),  # 1: requests with one split were finalised by the main kernel
        ScalarArg("has_sink"),
    )


def decode_scheduler_args():
    return (
        # (b,) int32 KV length per request
        TensorArg("cache_seqlens", "i32", ("b",), (1,), align=4),
        # (num_sm_parts, SCHED_META_FIELDS) int32, see schedules.decode_plan
        TensorArg("sched_meta", "i32", ("parts", 8), (8, 1), align=16),
        # (b + 1,) int32 split offsets
        TensorArg("split_offsets", "i32", ("b1",), (1,), align=4),
        ScalarArg("block_n"),
        ScalarArg("fixed_overhead"),
        # the overhead of a light plan (``decode_plan.piece_overhead``)
        ScalarArg("light_overhead"),
        # lengths are clamped to [0, max_len] (<= decode_plan.MAX_PLAN_LEN)
        ScalarArg("max_len"),
    )


TMA_PROBE_TILE = (64, 64)  # (rows, cols) of one TMA box; 64 bf16 = one 128-byte swizzle row


def tma_probe_args():
    return (
        # (rows, cols) bf16 source read through TMA: TMA dim 0 = cols (mode 1), dim 1 = rows (mode 0)
        TmaArg(TensorArg("src", "bf16", ("rows", "cols"), ("s_row", 1), divisibility=(("s_row", 8),)),
               dims=(1, 0), box=(TMA_PROBE_TILE[1], TMA_PROBE_TILE[0]), swizzle=128),
        # (rows, cols) bf16 destination, plain stores
        TensorArg("dst", "bf16", ("rows", "cols"), ("d_row", 1)),
    )


def paged_kv_tma(dtype: str, d: int, name: str = "k_cache"):
    """The dense paged cache ``[num_blocks, PAGE, h_kv, d]`` read one page of one head at a
    time (see ``kernels.common.paged_kv``, which views it as (token, d, head, block)):
    TMA dims innermost first are d (mode 3), token (mode 1), head (mode 2), block
    (mode 0); a box of 64 columns (one 128-byte swizzle row) by PAGE tokens.  The
    atom's tma_gbasis, (64,64,1,1):(1@1,1@0,1@2,1@3) over the view, says the same."""
    return TmaArg(TensorArg(name, dtype, ("num_blocks", PAGE_BLOCK_SIZE, "h_kv", d), ("s_blk", "s_tok", "s_head", 1),
                            divisibility=(("s_blk", 8), ("s_tok", 8), ("s_head", 8))),
                  dims=(3, 1, 2, 0), box=(64, PAGE_BLOCK_SIZE, 1, 1), swizzle=128, view=(1, 3, 2, 0))


def paged_kv_probe_args(dtype: str, d: int):
    return (
        paged_kv_tma(dtype, d),
        # (b, max_blocks) int32 page ids
        TensorArg("block_table", "i32", ("b", "max_blocks"), ("s_bt", 1), align=4),
        # (b, max_blocks * PAGE, h_kv, d) gathered pages
        TensorArg("out", dtype, ("b", "n_tok", "h_kv", d), ("o0", "o1", "o2", 1)),
    )


def dense_decode_io(dtype: str, d_qk: int = 576):
    """What both dense decode kernels take first: q, the paged cache, its table and lengths, the
    schedule, the outputs."""
    return (
        # (b, s_q, h_q, d_qk) queries; any strides with 16-byte aligned rows
        TensorArg("q", dtype, ("b", "s_q", "h_q", d_qk), ("qb", "qs", "qh", 1),
                  divisibility=(("qb", 8), ("qs", 8), ("qh", 8))),
        paged_kv_tma(dtype, d_qk),
        # (b, max_blocks) int32 page ids; entries past a request's length are never read
        TensorArg("block_table", "i32", ("b", "max_blocks"), ("s_bt", 1), align=4),
        TensorArg("cache_seqlens", "i32", ("b",), (1,), align=4),
        TensorArg("sched_meta", "i32", ("parts", 8), (8, 1), align=16),
        TensorArg("split_offsets", "i32", ("b1",), (1,), align=4),
        # (b, s_q, h_q, 512) output in q's dtype, (b, h_q, s_q) natural-log lse
        TensorArg("out", dtype, ("b", "s_q", "h_q", D_V), ("ob", "os", "oh", 1),
                  divisibility=(("ob", 8), ("os", 8), ("oh", 8))),
        TensorArg("lse", "f32", ("b", "h_q", "s_q"), ("lb", "lh", 1), align=4),
    ) + split_kv_partials()


def dense_decode_args(dtype: str, d_qk: int = 576, cluster_rows: int = 1):
    """SM90 dense decode (kernels.sm90.dense_decode), host order = kernel parameter order (the
    same for either ``cluster_rows``)."""
    return dense_decode_io(dtype, d_qk) + (
        split_counters(),
        ScalarArg("softmax_scale", "f32"),
        ScalarArg("causal"),
        ScalarArg("heads_per_kv"),
    )


def dense_decode_heads_args(dtype: str, heads: int = 16, tokens: int = 1):
    """The small-head dense decode (kernels.sm90.dense_decode_heads), h_kv 1: dense decode's
    operands less its merge counters and heads_per_kv (its splits go to the combine kernel); h_q
    stays a dynamic extent, the variant's ``heads`` times ``tokens`` is its MMA N."""
    return dense_decode_io(dtype) + (
        ScalarArg("softmax_scale", "f32"),
        ScalarArg("causal"),
    )


def sparse_prefill_args(d_qk: int):
    """SM90 sparse prefill (kernels.sm90.sparse_prefill), host order = kernel parameter order."""
    return (
        # (s_q, h_q, d_qk) bf16 queries; any strides with 16-byte aligned rows
        TensorArg("q", "bf16", ("s_q", "h_q", d_qk), ("qs", "qh", 1), divisibility=(("qs", 8), ("qh", 8))),
        # (s_kv, 1, d_qk) bf16 keys = values (first 512 columns); rows gathered by index
        TensorArg("kv", "bf16", ("s_kv", 1, d_qk), ("kvs", d_qk, 1), divisibility=(("kvs", 8),)),
        # (s_q, 1, topk) int32 row ids into kv; anything outside [0, s_kv) is invalid
        TensorArg("indices", "i32", ("s_q", 1, "topk"), ("is", "ih", 1), align=4),
        # (s_q,) int32 valid prefix of each token's indices (a dummy 1-element tensor when absent)
        TensorArg("topk_length", "i32", ("n_len",), (1,), align=4),
        # (h_q,) float32 attention sink (a dummy 1-element tensor when absent)
        TensorArg("attn_sink", "f32", ("h_sink",), (1,), align=4),
        # (s_q, h_q, 512) bf16 output; (s_q, h_q) float32 max logit and lse (natural log)
        TensorArg("out", "bf16", ("s_q", "h_q", D_V), ("os", "oh", 1), divisibility=(("os", 8), ("oh", 8))),
        TensorArg("max_logits", "f32", ("s_q", "h_q"), ("ms", 1), align=4),
        TensorArg("lse", "f32", ("s_q", "h_q"), ("ls", 1), align=4),
        ScalarArg("sm_scale", "f32"),
        ScalarArg("has_topk_length"),
        ScalarArg("has_sink"),
    )


def fp8_cache_arg(name: str):
    """An FP8 paged cache (``layouts.kv_cache``) as the sparse decode kernels read it:
    (num_blocks, block_bytes) bytes, row = one page block, rows ``block_stride`` bytes
    apart (16-byte aligned).  The API views ``[num_blocks, page_block_size, 1,
    bytes_per_token]`` of any 1-byte dtype this way; the byte format inside a block is
    the one ``layouts.kv_cache`` describes."""
    return TensorArg(name, "u8", ("num_blocks", "block_bytes"), ("block_stride", 1),
                     divisibility=(("block_stride", 16),))


def sparse_decode_args(fmt: str, matmul: str = "f16"):
    """SM90 FP8 sparse decode (kernels.sm90.sparse_decode), host order = kernel parameter
    order.  ``fmt`` is "V32" (d_qk 576) or "MODEL1" (d_qk 512); the matmul type ("f16" or
    "bf16") does not change the ABI."""
    from cute_mla.layouts.kv_cache import get_format

    d_qk = get_format(fmt).d_qk
    return (
        # (b, s_q, h_q, d_qk) bf16 queries; any strides with 16-byte aligned rows
        TensorArg("q", "bf16", ("b", "s_q", "h_q", d_qk), ("qb", "qs", "qh", 1),
                  divisibility=(("qb", 8), ("qs", 8), ("qh", 8))),
        fp8_cache_arg("k_cache"),
        # (b, s_q, topk) int32 flat token ids (block * page_block_size + offset)
        TensorArg("indices", "i32", ("b", "s_q", "topk"), ("ib", "is", 1), align=4),
        # (b,) int32 counted prefix of each request's indices (dummy 1-element tensor when absent)
        TensorArg("topk_length", "i32", ("n_len",), (1,), align=4),
        # the extra cache, its indices and lengths (dummies when absent)
        fp8_cache_arg("extra_k_cache"),
        TensorArg("extra_indices", "i32", ("xb", "xs", "extra_topk"), ("xib", "xis", 1), align=4),
        TensorArg("extra_topk_length", "i32", ("n_xlen",), (1,), align=4),
        # (h_q,) float32 attention sink (dummy when absent); applied here to single-split requests
        TensorArg("attn_sink", "f32", ("h_sink",), (1,), align=4),
        TensorArg("sched_meta", "i32", ("parts", 8), (8, 1), align=16),
        TensorArg("split_offsets", "i32", ("b1",), (1,), align=4),
        TensorArg("out", "bf16", ("b", "s_q", "h_q", D_V), ("ob", "os", "oh", 1),
                  divisibility=(("ob", 8), ("os", 8), ("oh", 8))),
        TensorArg("lse", "f32", ("b", "h_q", "s_q"), ("lb", "lh", 1), align=4),
    ) + split_kv_partials() + (
        ScalarArg("softmax_scale", "f32"),
        ScalarArg("page_block_size"),
        ScalarArg("extra_page_block_size"),
        ScalarArg("has_topk_length"),
        ScalarArg("has_extra"),
        ScalarArg("has_extra_topk_length"),
        ScalarArg("has_sink"),
    )


def sparse_decode_heads_args(fmt: str, matmul: str = "f16", heads: int = 16):
    """The small-head sparse decode (kernels.sm90.sparse_decode_heads): the ABI of
    ``sparse_decode_args`` (h_q stays a dynamic extent; the variant's ``heads`` is its MMA N)."""
    return sparse_decode_args(fmt, matmul)
