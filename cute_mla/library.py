"""The entry points as torch.library ops, for ``torch.compile`` (runtime code): their schemas
and fake (meta) implementations here, their CUDA implementations from ``cute_mla.api``
(``implement``).

``torch.ops.cute_mla.mla_decode`` and ``torch.ops.cute_mla.sparse_prefill`` run the same plans
as ``flash_mla_with_kvcache`` and ``flash_mla_sparse_fwd``, with fake implementations that give
the output shapes, so a compiled graph holds each call as one opaque node.  The
public functions switch to them by themselves while ``torch.compile`` traces, so a model that
calls ``cute_mla.flash_mla_with_kvcache`` compiles with ``fullgraph=True`` unchanged.

An op cannot take a ``FlashMLASchedMeta`` (a Python object), so the decode op plans its own
schedule on every call: one scheduler launch, its two small buffers and (dense decode) a fresh
workspace with zeroed counters more than an eager call that reuses a metadata.  The plain
functions stay the fast path for eager code; the op path's host cost is measured by
``perf.host_overhead`` (``meta=op``).
"""
from __future__ import annotations

import torch

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


def _mla_decode_fake(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache,
                     indices, attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length):
    b, s_q, h_q, _ = q.shape
    out_dtype = torch.bfloat16 if indices is not None else q.dtype
    return q.new_empty((b, s_q, h_q, head_dim_v), dtype=out_dtype), q.new_empty((b, h_q, s_q), dtype=_F32)


def _sparse_prefill_fake(q, kv, indices, sm_scale, d_v, attn_sink, topk_length):
    s_q, h_q, _ = q.shape
    return (q.new_empty((s_q, h_q, d_v), dtype=torch.bfloat16), q.new_empty((s_q, h_q), dtype=_F32),
            q.new_empty((s_q, h_q), dtype=_F32))


torch.library.register_fake("cute_mla::mla_decode", _mla_decode_fake, lib=_LIB)
torch.library.register_fake("cute_mla::sparse_prefill", _sparse_prefill_fake, lib=_LIB)


def implement(**kernels) -> None:
    """Register each op's CUDA implementation, by op name (``cute_mla.api`` gives them: the ops
    sit below the functions they run, so this module imports nothing of cute_mla)."""
    for name, fn in kernels.items():
        _LIB.impl(name, fn, "CUDA")
