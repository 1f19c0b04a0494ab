"""The entry points as torch.library ops, for ``torch.compile`` (runtime code).

``torch.ops.cute_mla.mla_decode`` and ``torch.ops.cute_mla.sparse_prefill`` run the same plans
as ``flash_mla_with_kvcache`` and ``flash_mla_sparse_fwd``, with fake (meta) implementations
that give the output shapes, so a compiled graph holds each call as one opaque node.  The
public functions switch to them by themselves while ``torch.compile`` traces, so a model that
calls ``cute_mla.flash_mla_with_kvcache`` compiles with ``fullgraph=True`` unchanged.

An op cannot take a ``FlashMLASchedMeta`` (a Python object), so the decode op plans its own
schedule on every call: one scheduler launch, its two small buffers and (dense decode) a fresh
workspace with zeroed counters more than an eager call that reuses a metadata.  The plain
functions stay the fast path for eager code; the op path's host cost is measured by
``perf.host_overhead`` (``meta=op``).
"""
from __future__ import annotations

from typing import Optional

import torch

from cute_mla import api

_F32 = torch.float32


# Defined through ``torch.library.Library`` rather than ``torch.library.custom_op``: the same
# schema, CUDA kernel and fake, but a call costs about 5.5 us over the Python function where a
# custom_op costs 20 (CPU host, torch 2.13, session 13), and the op path already plans a schedule
# per call.  Nothing here has an autograd formula: these are inference ops, as FlashMLA's are.
_LIB = torch.library.Library("cute_mla", "DEF")
_LIB.define("mla_decode(Tensor q, Tensor k_cache, Tensor? block_table, Tensor? cache_seqlens, int head_dim_v, "
            "float? softmax_scale, bool causal, bool is_fp8_kvcache, Tensor? indices, Tensor? attn_sink, "
            "Tensor? extra_k_cache, Tensor? extra_indices_in_kvcache, Tensor? topk_length, "
            "Tensor? extra_topk_length) -> (Tensor, Tensor)")
_LIB.define("sparse_prefill(Tensor q, Tensor kv, Tensor indices, float sm_scale, int d_v, Tensor? attn_sink, "
            "Tensor? topk_length) -> (Tensor, Tensor, Tensor)")


def mla_decode(q: torch.Tensor, k_cache: torch.Tensor, block_table: Optional[torch.Tensor],
               cache_seqlens: Optional[torch.Tensor], head_dim_v: int, softmax_scale: Optional[float],
               causal: bool, is_fp8_kvcache: bool, indices: Optional[torch.Tensor],
               attn_sink: Optional[torch.Tensor], extra_k_cache: Optional[torch.Tensor],
               extra_indices_in_kvcache: Optional[torch.Tensor], topk_length: Optional[torch.Tensor],
               extra_topk_length: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``flash_mla_with_kvcache`` with a schedule of its own (returns out, lse)."""
    meta, _ = api.get_mla_metadata()
    return api.flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, head_dim_v, meta, softmax_scale=softmax_scale, causal=causal,
        is_fp8_kvcache=is_fp8_kvcache, indices=indices, attn_sink=attn_sink, extra_k_cache=extra_k_cache,
        extra_indices_in_kvcache=extra_indices_in_kvcache, topk_length=topk_length,
        extra_topk_length=extra_topk_length)


def _mla_decode_fake(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache,
                     indices, attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length):
    b, s_q, h_q, _ = q.shape
    out_dtype = torch.bfloat16 if indices is not None else q.dtype
    return q.new_empty((b, s_q, h_q, head_dim_v), dtype=out_dtype), q.new_empty((b, h_q, s_q), dtype=_F32)


def sparse_prefill(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int,
                   attn_sink: Optional[torch.Tensor], topk_length: Optional[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``flash_mla_sparse_fwd`` (returns out, max_logits, lse)."""
    return api.flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v, attn_sink=attn_sink, topk_length=topk_length)


def _sparse_prefill_fake(q, kv, indices, sm_scale, d_v, attn_sink, topk_length):
    s_q, h_q, _ = q.shape
    return (q.new_empty((s_q, h_q, d_v), dtype=torch.bfloat16), q.new_empty((s_q, h_q), dtype=_F32),
            q.new_empty((s_q, h_q), dtype=_F32))


for _name, _kernel, _fake in (("mla_decode", mla_decode, _mla_decode_fake),
                              ("sparse_prefill", sparse_prefill, _sparse_prefill_fake)):
    _LIB.impl(_name, _kernel, "CUDA")
    torch.library.register_fake(f"cute_mla::{_name}", _fake, lib=_LIB)
