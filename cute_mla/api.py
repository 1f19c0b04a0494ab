"""FlashMLA-compatible public API (same names, argument order and return values).

Each call is looked up by its signature (``cute_mla.plans``): the first call with a signature is
checked in full and planned, later ones only allocate and launch.  Every check depends only on
what the signature holds (dtypes, shapes, strides, devices, pointer alignment, scalars), so a bad
input raises the same error on every call, before anything is enqueued.

Kernel paths land issue by issue; a path whose kernel is not built yet raises
``NotImplementedError`` naming what is missing rather than computing anything.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from cute_mla import library, ops, plans, registry
from cute_mla.ops import _require as need  # ValueError(msg) unless cond
from cute_mla.sched_meta import FlashMLASchedMeta, get_mla_metadata
from cute_mla.layouts.kv_cache import BLOCK_STRIDE_ALIGN, format_for_dqk
from cute_mla.schedules import decode_plan

__all__ = ["FlashMLASchedMeta", "get_mla_metadata", "flash_mla_with_kvcache", "flash_mla_sparse_fwd",
           "flatten_sparse_prefill_batch", "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_varlen_kvpacked_func"]

_DECODE_PLANS = plans.PlanCache()
_compiling = torch.compiler.is_compiling  # 0.08 us a call


def _env_reader(name: str):
    """A callable reading environment variable ``name`` (raw) on every call: one dict lookup in
    CPython's os.environ on POSIX (os.environ.get decodes and re-encodes: 0.8-1.4 us on the
    H200 hosts, 2026-12-04), os.environ.get elsewhere."""
    data = getattr(os.environ, "_data", None)
    if os.name == "posix" and isinstance(data, dict):
        key = os.fsencode(name)
        return lambda: data.get(key)
    return lambda: os.environ.get(name)


_matmul_env = _env_reader(registry.SPARSE_DECODE_MATMUL_ENV)  # part of a sparse call's signature
_PREFILL_PLANS = plans.PlanCache()


def _config_of(q, k_cache, causal, is_fp8_kvcache, indices, extra_k_cache, extra_indices) -> FlashMLASchedMeta.Config:
    return FlashMLASchedMeta.Config(
        b=q.shape[0], s_q=q.shape[1], h_q=q.shape[2], page_block_size=k_cache.shape[1], h_k=k_cache.shape[2],
        causal=bool(causal), is_fp8_kvcache=bool(is_fp8_kvcache),
        topk=None if indices is None else indices.shape[-1],
        extra_page_block_size=None if extra_k_cache is None else extra_k_cache.shape[1],
        extra_topk=None if extra_indices is None else extra_indices.shape[-1],
        device=q.device)


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: Optional[torch.Tensor],
                           cache_seqlens: Optional[torch.Tensor], head_dim_v: int,
                           tile_scheduler_metadata: FlashMLASchedMeta, num_splits: None = None,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           is_fp8_kvcache: bool = False, indices: Optional[torch.Tensor] = None,
                           attn_sink: Optional[torch.Tensor] = None, extra_k_cache: Optional[torch.Tensor] = None,
                           extra_indices_in_kvcache: Optional[torch.Tensor] = None,
                           topk_length: Optional[torch.Tensor] = None,
                           extra_topk_length: Optional[torch.Tensor] = None,
                           out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """MLA decode over a paged KV cache: returns (out [b, s_q, h_q, 512], lse [b, h_q, s_q]).

    Dense (``indices`` None; SM90): q [b, s_q, h_q, 576] bf16 or fp16 (512 NoPE + 64 RoPE
    columns, last dim contiguous); k_cache [num_blocks, 64, h_kv, 576] in q's dtype (page size
    64; V is its first 512 columns); h_q a multiple of h_kv; block_table [b, max_blocks] int32
    (entries past a request's pages may be anything); cache_seqlens [b] int32 (contiguous;
    clamped to [0, 64 * max_blocks]).  ``causal`` masks the s_q query tokens as the last s_q
    tokens of each request.  out has q's dtype.

    FP8 sparse (``indices`` given, ``is_fp8_kvcache=True``; SM90): q [b, s_q, h_q, d_qk] bf16
    with h_q 8, 16, 32, 64 or 128 and d_qk 576 (V32 cache) or 512 (MODEL1 cache); k_cache
    [num_blocks, page_block_size, 1, bytes_per_token] FP8 (``quant.quantize_kvcache``; float8,
    int8 or uint8 view; any page size); indices [b, s_q, topk] int32, topk a multiple of 64,
    token ids ``block * page_block_size + offset`` (anything outside the cache is skipped);
    block_table and cache_seqlens are ignored (pass None).  Optional: attn_sink [h_q] float32,
    topk_length [b] int32 (only the first topk_length[i] indices count), and a second cache
    ``extra_k_cache`` with ``extra_indices_in_kvcache`` [b, s_q, extra_topk] and
    ``extra_topk_length``.  out is bf16.

    lse is the natural-log sum of exp(scaled logits) without the sink (+inf for a row with no
    key, whose out is 0).  ``softmax_scale`` (default d_qk ** -0.5) is a positive finite
    Python, numpy or 0-d CPU tensor number.  ``tile_scheduler_metadata`` comes from
    ``get_mla_metadata()``, one per decode step: the first call plans it from the lengths, later
    calls with the same shapes and the same length tensors, unchanged, reuse it (anything else
    raises).  ``out`` (optional) is written instead of a new tensor: contiguous, 16-byte
    aligned, of out's shape and dtype, apart from q and k_cache.  ``num_splits`` must be None.

    With ``indices`` on a V32 cache (d_qk 576) the matmuls run in float16 by default, not bf16:
    each FP8 value becomes f16(code * f16(scale)) and q is rounded to f16 (the RoPE columns stay
    bf16), which is closer to the exact dequantisation than a bf16 product but needs q and the
    dequantised cache inside f16's range (|x| < 65504; a value past it gives inf, and NaN
    outputs).  CUTE_MLA_SPARSE_DECODE_MATMUL=bf16 selects bf16 matmuls (bf16(code * scale):
    FlashMLA's numerics and range; about 10% slower).  A MODEL1 cache (d_qk 512) runs in bf16 by
    default (exact: its scales are powers of two; f16 is no faster there)."""
    if softmax_scale is not None and softmax_scale.__class__ is not float:
        softmax_scale = ops.scale_value("softmax_scale", softmax_scale)  # numpy, int or 0-d tensor
    if _compiling():  # torch.compile is tracing: one opaque op (cute_mla.library)
        res = torch.ops.cute_mla.mla_decode(
            q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices,
            attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length)
        return res if out is None else (out.copy_(res[0]), res[1])
    tensors = (q, k_cache, block_table, cache_seqlens, indices, attn_sink, extra_k_cache, extra_indices_in_kvcache,
               topk_length, extra_topk_length, out)  # plans.DECODE_ARGS
    # the matmul type is a per-call choice of sparse decode only
    key, plan, pointers = _DECODE_PLANS.lookup(tensors, (
        head_dim_v, num_splits, softmax_scale, causal, is_fp8_kvcache, None if indices is None else _matmul_env()))
    if plan is None:
        plan = _plan_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, num_splits, softmax_scale, causal,
                            is_fp8_kvcache, indices, attn_sink, extra_k_cache, extra_indices_in_kvcache,
                            topk_length, extra_topk_length, out)
        pointers = _DECODE_PLANS.keep(key, plan, tensors, pointers)
    if out is not None:
        _require_apart("out", out, q, k_cache)
    return plan(tile_scheduler_metadata, pointers, tensors, out)


def _plan_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, num_splits, softmax_scale, causal,
                 is_fp8_kvcache, indices, attn_sink, extra_k_cache, extra_indices, topk_length, extra_topk_length,
                 out):
    """Check every input of ``flash_mla_with_kvcache`` and plan the call (the first call of a signature)."""
    if num_splits is not None:
        raise ValueError("num_splits must be None (kept only for compatibility with FlashMLA's older interface)")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor [b, s_q, h_q, d_qk], got {getattr(q, 'shape', type(q))}")
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise ValueError(f"k_cache must be a 4-D tensor [num_blocks, page_block_size, h_kv, d], "
                         f"got {getattr(k_cache, 'shape', type(k_cache))}")
    if head_dim_v != 512:
        raise ValueError(f"head_dim_v must be 512, got {head_dim_v}")
    if softmax_scale is not None:
        ops.scale_value("softmax_scale", softmax_scale)
    config = _config_of(q, k_cache, causal, is_fp8_kvcache, indices, extra_k_cache, extra_indices)
    if out is not None:
        _check_out(out, (*q.shape[:3], head_dim_v), torch.bfloat16 if indices is not None else q.dtype, q.device)
    if indices is not None or is_fp8_kvcache:
        return _plan_sparse_decode(q, k_cache, config, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
                                   extra_k_cache, extra_indices, topk_length, extra_topk_length)
    for name, val in (("attn_sink", attn_sink), ("extra_k_cache", extra_k_cache),
                      ("extra_indices_in_kvcache", extra_indices), ("topk_length", topk_length),
                      ("extra_topk_length", extra_topk_length)):
        if val is not None:
            raise ValueError(f"{name} is only supported by sparse attention (indices given); got it with dense decode")
    _check_dense_decode(q, k_cache, block_table, cache_seqlens)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    heads = plans.dense_heads(k_cache.shape[2], q.shape[2], q.shape[1])
    plan = plans.DenseDecodeHeadsPlan if heads else plans.DenseDecodePlan
    return plan(q, k_cache, block_table, cache_seqlens, softmax_scale, causal, config)


def _check_dense_decode(q, k_cache, block_table, cache_seqlens) -> None:
    """Every shape, dtype and device rule of the dense path, with the argument named."""
    need(q.dtype in (torch.bfloat16, torch.float16), f"q must be bfloat16 or float16, got {q.dtype}")
    need(k_cache.dtype == q.dtype, f"k_cache must have q's dtype {q.dtype} for dense decode, got {k_cache.dtype}")
    need(q.is_cuda, f"q must be a CUDA tensor, got device {q.device}")
    for name, t in (("k_cache", k_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        need(isinstance(t, torch.Tensor), f"{name} must be a tensor for dense decode, got {type(t).__name__}")
        need(t.device == q.device, f"{name} must be on {q.device}, got {t.device}")
    b, s_q, h_q, d = q.shape
    need(d == 576, f"q's head dim must be 576 (512 NoPE + 64 RoPE) for dense decode, got {d}")
    need(k_cache.shape[3] == d, f"k_cache's head dim must be {d}, got {k_cache.shape[3]}")
    need(k_cache.shape[1] == 64, f"k_cache page_block_size must be 64 for dense decode, got {k_cache.shape[1]}")
    h_kv = k_cache.shape[2]
    need(h_kv >= 1 and h_q % h_kv == 0, f"h_q ({h_q}) must be a multiple of k_cache's h_kv ({h_kv})")
    need(s_q >= 1 and b >= 1, f"q must have b >= 1 and s_q >= 1, got shape {tuple(q.shape)}")
    need(q.stride(3) == 1, "q's last dim must be contiguous")
    need(k_cache.stride(3) == 1, "k_cache's last dim must be contiguous")
    need(block_table.dtype == torch.int32 and block_table.dim() == 2 and block_table.shape[0] == b,
         f"block_table must be int32 [{b}, max_blocks], got {block_table.dtype} {tuple(block_table.shape)}")
    need(block_table.stride(1) == 1, "block_table's last dim must be contiguous")
    need(block_table.shape[1] * 64 <= decode_plan.MAX_PLAN_LEN,
         f"block_table has {block_table.shape[1]} blocks per request; at most "
         f"{decode_plan.MAX_PLAN_LEN // 64} (2^31 tokens) are supported")
    need(cache_seqlens.dtype == torch.int32 and tuple(cache_seqlens.shape) == (b,),
         f"cache_seqlens must be int32 [{b}], got {cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    need(cache_seqlens.is_contiguous(), "cache_seqlens must be contiguous")


def _plan_sparse_decode(q, k_cache, config, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
                        extra_k_cache, extra_indices, topk_length, extra_topk_length):
    """Check and plan the FP8 sparse path of ``flash_mla_with_kvcache``."""
    if indices is None:
        raise NotImplementedError("cute-mla: an FP8 cache is only supported with indices (sparse decode); "
                                  "dense decode takes a bf16/fp16 cache")
    if not is_fp8_kvcache:
        raise ValueError("is_fp8_kvcache must be True when indices are given: sparse decode reads an FP8 cache")
    if causal:
        raise ValueError("causal must be False with indices: the indices already say which tokens each query sees")
    _check_sparse_decode(q, k_cache, indices, attn_sink, extra_k_cache, extra_indices, topk_length,
                         extra_topk_length)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    fmt = format_for_dqk(q.shape[-1]).name
    return plans.SparseDecodePlan(q, k_cache, indices, topk_length, extra_k_cache, extra_indices, extra_topk_length,
                                  attn_sink, softmax_scale, ops.sparse_decode_matmul(fmt), fmt, config)


_FP8_CACHE_DTYPES = (torch.float8_e4m3fn, torch.int8, torch.uint8)
# FlashMLA's 64 and 128, and the tensor-parallel shards of 128 heads (TP 16, 8, 4): no caller pads
SPARSE_DECODE_HEADS = (8, 16, 32, 64, 128)


def _check_sparse_decode(q, k_cache, indices, attn_sink, extra_k_cache, extra_indices, topk_length,
                         extra_topk_length) -> None:
    """Every shape, dtype and device rule of the sparse decode path, with the argument named."""
    need(q.dtype == torch.bfloat16, f"q must be bfloat16 for sparse decode, got {q.dtype}")
    need(q.is_cuda, f"q must be a CUDA tensor, got device {q.device}")
    b, s_q, h_q, d_qk = q.shape
    need(d_qk in (576, 512), f"q's head dim must be 576 (V32 cache) or 512 (MODEL1 cache), got {d_qk}")
    need(h_q in SPARSE_DECODE_HEADS, f"q's head count h_q must be one of {SPARSE_DECODE_HEADS} for sparse decode, "
         f"got {h_q}")
    need(b >= 1 and s_q >= 1, f"q must have b >= 1 and s_q >= 1, got shape {tuple(q.shape)}")
    need(q.stride(3) == 1 and all(q.stride(i) % 8 == 0 for i in range(3)),
         f"q's last dim must be contiguous and its other strides multiples of 8, got {q.stride()}")
    fmt = format_for_dqk(d_qk)

    def check_cache(name, cache):
        need(isinstance(cache, torch.Tensor) and cache.dim() == 4,
             f"{name} must be a 4-D tensor [num_blocks, page_block_size, 1, {fmt.bytes_per_token}]")
        need(cache.dtype in _FP8_CACHE_DTYPES, f"{name} must be float8_e4m3fn, int8 or uint8, got {cache.dtype}")
        need(cache.device == q.device, f"{name} must be on {q.device}, got {cache.device}")
        nb, pbs, h_kv, bpt = cache.shape
        need(bpt == fmt.bytes_per_token, f"{name}'s last dim must be {fmt.bytes_per_token} bytes per token "
             f"({fmt.name} format, d_qk {d_qk}), got {bpt}")
        need(h_kv == 1, f"{name} must have one kv head, got {h_kv}")
        need(nb >= 1 and pbs >= 1,
             f"{name} must have num_blocks >= 1 and page_block_size >= 1, got {tuple(cache.shape)}")
        need(cache.stride(3) == 1 and cache.stride(1) == bpt,
             f"{name}'s tokens must be {bpt} contiguous bytes each (stride(1) = {bpt}), got strides {cache.stride()}")
        need(cache.stride(0) >= pbs * bpt and cache.stride(0) % BLOCK_STRIDE_ALIGN == 0
             and cache.data_ptr() % BLOCK_STRIDE_ALIGN == 0,
             f"{name}'s block stride must be >= {pbs * bpt} bytes and a multiple of {BLOCK_STRIDE_ALIGN}, "
             f"and its data 16-byte aligned; got stride(0) = {cache.stride(0)}")
        need(nb * pbs < 2**31, f"{name} holds {nb * pbs} tokens; token ids must fit int32")
        need(pbs * bpt < 2**31, f"{name}'s page_block_size {pbs} makes a block of 2 GiB or more")

    def check_indices(name, idx):
        need(isinstance(idx, torch.Tensor) and idx.dtype == torch.int32,
             f"{name} must be an int32 tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
        need(idx.dim() == 3 and idx.shape[:2] == (b, s_q), f"{name} must be [{b}, {s_q}, topk], got {tuple(idx.shape)}")
        need(idx.shape[2] > 0 and idx.shape[2] % 64 == 0, f"{name}'s topk must be a positive multiple of 64, "
             f"got {idx.shape[2]}")
        need(idx.stride(2) == 1, f"{name}'s last dim must be contiguous")
        need(idx.device == q.device, f"{name} must be on {q.device}, got {idx.device}")

    def check_lengths(name, t):
        need(isinstance(t, torch.Tensor) and t.dtype == torch.int32 and tuple(t.shape) == (b,)
             and t.is_contiguous() and t.device == q.device,
             f"{name} must be a contiguous int32 [{b}] tensor on {q.device}")

    check_cache("k_cache", k_cache)
    check_indices("indices", indices)
    if topk_length is not None:
        check_lengths("topk_length", topk_length)
    if (extra_k_cache is None) != (extra_indices is None):
        raise ValueError("extra_k_cache and extra_indices_in_kvcache must be given together")
    if extra_k_cache is not None:
        check_cache("extra_k_cache", extra_k_cache)
        check_indices("extra_indices_in_kvcache", extra_indices)
    if extra_topk_length is not None:
        need(extra_k_cache is not None, "extra_topk_length needs extra_k_cache and extra_indices_in_kvcache")
        check_lengths("extra_topk_length", extra_topk_length)
    if attn_sink is not None:
        need(isinstance(attn_sink, torch.Tensor) and attn_sink.dtype == torch.float32
             and tuple(attn_sink.shape) == (h_q,) and attn_sink.is_contiguous() and attn_sink.device == q.device,
             f"attn_sink must be a contiguous float32 [{h_q}] tensor on {q.device}")


def flash_mla_sparse_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                         d_v: int = 512, attn_sink: Optional[torch.Tensor] = None,
                         topk_length: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse MLA prefill: token i of q attends to the kv rows ``indices[i, 0, :]`` selects.

    q [s_q, h_q, d_qk] bf16 (d_qk 576 or 512, h_q 64 or 128); kv [s_kv, 1, d_qk] bf16 (V is
    its first 512 columns); indices [s_q, 1, topk] int32 with topk a multiple of 64 (entries
    outside [0, s_kv) are invalid and never read); attn_sink [h_q] float32; topk_length
    [s_q] int32 (only the first topk_length[i] indices of token i count).
    Returns out [s_q, h_q, 512] bf16, max_logits [s_q, h_q] and lse [s_q, h_q] float32, both
    natural-log scale of the scaled logits and without the sink (a token with no valid index:
    out 0, max_logits -inf, lse +inf).  ``sm_scale`` is a positive finite Python, numpy or 0-d
    CPU tensor number; ``d_v`` must be 512.  ``out`` (optional) is written instead of a new
    tensor: contiguous, 16-byte aligned, [s_q, h_q, 512] bf16, apart from q and kv.  SM90.
    To run a batch of requests, flatten it with ``flatten_sparse_prefill_batch``.
    """
    if sm_scale.__class__ is not float:
        sm_scale = ops.scale_value("sm_scale", sm_scale)  # numpy, int or 0-d tensor
    if _compiling():  # torch.compile is tracing: one opaque op (cute_mla.library)
        res = torch.ops.cute_mla.sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
        return res if out is None else (out.copy_(res[0]), *res[1:])
    tensors = (q, kv, indices, attn_sink, topk_length, out)  # plans.PREFILL_ARGS
    key, plan, pointers = _PREFILL_PLANS.lookup(tensors, (sm_scale, d_v))
    if plan is None:
        _check_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
        if out is not None:
            _check_out(out, (q.shape[0], q.shape[1], d_v), torch.bfloat16, q.device)
        plan = plans.SparsePrefillPlan(q, kv, indices, sm_scale, attn_sink, topk_length)
        pointers = _PREFILL_PLANS.keep(key, plan, tensors, pointers)
    if out is not None:
        _require_apart("out", out, q, kv)
    return plan(pointers, out)


def _check_out(out, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """``out=``: a contiguous, 16-byte aligned tensor of exactly the output's shape, dtype and device."""
    need(isinstance(out, torch.Tensor), f"out must be a torch.Tensor, got {type(out).__name__}")
    need(tuple(out.shape) == tuple(shape) and out.dtype == dtype and out.device == device,
         f"out must be a {dtype} tensor of shape {list(shape)} on {device}, "
         f"got {out.dtype} {list(out.shape)} on {out.device}")
    need(out.is_contiguous() and out.data_ptr() % 16 == 0, "out must be contiguous and 16-byte aligned")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses a tensor's elements occupy."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _require_apart(name: str, out: torch.Tensor, *inputs: torch.Tensor) -> None:
    """``out`` must not share memory with an input the kernels read while it is written (checked
    on every call: it depends on the addresses, not on the signature)."""
    lo, hi = _span(out)
    for t in inputs:
        a, b = _span(t)
        need(hi <= a or b <= lo, f"{name} overlaps an input's memory; pass a separate buffer")


def _check_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length) -> None:
    ops.scale_value("sm_scale", sm_scale)
    for name, t in (("q", q), ("kv", kv), ("indices", indices)):
        need(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    need(q.dim() == 3, f"q must be [s_q, h_q, d_qk], got shape {tuple(q.shape)}")
    s_q, h_q, d_qk = q.shape
    need(q.dtype == torch.bfloat16, f"q must be bfloat16, got {q.dtype}")
    need(q.is_cuda, f"q must be a CUDA tensor, got device {q.device}")
    need(d_qk in (576, 512), f"q's head dim must be 576 or 512, got {d_qk}")
    need(h_q in (64, 128), f"q's head count h_q must be 64 or 128, got {h_q}")
    need(d_v == 512, f"d_v must be 512, got {d_v}")
    need(kv.dtype == torch.bfloat16, f"kv must be bfloat16, got {kv.dtype}")
    need(kv.dim() == 3 and kv.shape[1] == 1 and kv.shape[2] == d_qk,
         f"kv must be [s_kv, 1, {d_qk}], got shape {tuple(kv.shape)}")
    need(indices.dtype == torch.int32, f"indices must be int32, got {indices.dtype}")
    need(indices.dim() == 3 and indices.shape[0] == s_q and indices.shape[1] == 1,
         f"indices must be [{s_q}, 1, topk], got shape {tuple(indices.shape)}")
    topk = indices.shape[2]
    need(topk > 0 and topk % 64 == 0, f"indices' topk must be a positive multiple of 64, got {topk}")
    for name, t in (("kv", kv), ("indices", indices)):
        need(t.device == q.device, f"{name} must be on {q.device}, got {t.device}")
    need(q.stride(2) == 1 and kv.stride(2) == 1 and indices.stride(2) == 1,
         "q, kv and indices must be contiguous in their last dim")
    need(q.stride(0) % 8 == 0 and q.stride(1) % 8 == 0, f"q's strides must be multiples of 8 elements, got {q.stride()}")
    need(kv.stride(0) % 8 == 0, f"kv's row stride must be a multiple of 8 elements, got {kv.stride(0)}")
    if attn_sink is not None:
        need(isinstance(attn_sink, torch.Tensor) and attn_sink.dtype == torch.float32
             and tuple(attn_sink.shape) == (h_q,) and attn_sink.is_contiguous() and attn_sink.device == q.device,
             f"attn_sink must be a contiguous float32 [{h_q}] tensor on {q.device}")
    if topk_length is not None:
        need(isinstance(topk_length, torch.Tensor) and topk_length.dtype == torch.int32
             and tuple(topk_length.shape) == (s_q,) and topk_length.is_contiguous()
             and topk_length.device == q.device,
             f"topk_length must be a contiguous int32 [{s_q}] tensor on {q.device}")


def flatten_sparse_prefill_batch(qs, kvs, indices, topk_lengths=None):
    """Turn a batch of sparse-prefill requests into one ``flash_mla_sparse_fwd`` call.

    qs[i] [s_q_i, h_q, d_qk], kvs[i] [s_kv_i, 1, d_qk], indices[i] [s_q_i, 1, topk] index
    request i's own kv; topk_lengths[i] [s_q_i] optional.  Returns (q, kv, indices,
    topk_length) with queries and kv rows concatenated and each request's valid indices
    offset by where its kv starts; its invalid ones (outside [0, s_kv_i)) become -1, so
    they can never select another request's rows.  Split the outputs back with
    ``torch.split(out, [q.shape[0] for q in qs])``.
    """
    if not (len(qs) == len(kvs) == len(indices)) or not qs:
        raise ValueError("qs, kvs and indices must be non-empty lists of the same length")
    if topk_lengths is not None and len(topk_lengths) != len(qs):
        raise ValueError("topk_lengths must have one entry per request")
    flat_idx, base = [], 0
    for i, (kv, idx) in enumerate(zip(kvs, indices)):
        if idx.dtype != torch.int32:
            raise ValueError(f"indices[{i}] must be int32, got {idx.dtype}")
        n = kv.shape[0]
        valid = (idx >= 0) & (idx < n)
        flat_idx.append(torch.where(valid, idx + base, torch.full_like(idx, -1)))
        base += n
    lengths = None if topk_lengths is None else torch.cat(list(topk_lengths))
    return torch.cat(list(qs)), torch.cat(list(kvs)), torch.cat(flat_idx), lengths


def flash_attn_varlen_func(*args, **kwargs):
    """Dense MHA prefill (FlashMLA's ``flash_attn_varlen_func``): NOT BUILT YET in cute-mla.

    Every call raises NotImplementedError; so do the ``..._qkvpacked_func`` and
    ``..._kvpacked_func`` aliases.  Use FlashMLA or FlashAttention for MHA prefill meanwhile."""
    raise NotImplementedError("cute-mla: dense MHA prefill is not built yet")


flash_attn_varlen_qkvpacked_func = flash_attn_varlen_func
flash_attn_varlen_kvpacked_func = flash_attn_varlen_func


# ------------------------------------------------------------------ the torch.library ops' CUDA side
def _mla_decode_op(q: torch.Tensor, k_cache: torch.Tensor, block_table: Optional[torch.Tensor],
                   cache_seqlens: Optional[torch.Tensor], head_dim_v: int, softmax_scale: Optional[float],
                   causal: bool, is_fp8_kvcache: bool, indices: Optional[torch.Tensor],
                   attn_sink: Optional[torch.Tensor], extra_k_cache: Optional[torch.Tensor],
                   extra_indices_in_kvcache: Optional[torch.Tensor], topk_length: Optional[torch.Tensor],
                   extra_topk_length: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.cute_mla.mla_decode``: ``flash_mla_with_kvcache`` with a schedule of its own
    (an op cannot take a ``FlashMLASchedMeta``; returns out, lse)."""
    meta, _ = get_mla_metadata()
    return flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, head_dim_v, meta, softmax_scale=softmax_scale, causal=causal,
        is_fp8_kvcache=is_fp8_kvcache, indices=indices, attn_sink=attn_sink, extra_k_cache=extra_k_cache,
        extra_indices_in_kvcache=extra_indices_in_kvcache, topk_length=topk_length,
        extra_topk_length=extra_topk_length)


def _sparse_prefill_op(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int,
                       attn_sink: Optional[torch.Tensor], topk_length: Optional[torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.cute_mla.sparse_prefill``: ``flash_mla_sparse_fwd`` (returns out, max_logits, lse)."""
    return flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v, attn_sink=attn_sink, topk_length=topk_length)


library.implement(mla_decode=_mla_decode_op, sparse_prefill=_sparse_prefill_op)
