"""Thin torch wrappers over single kernels: validate, allocate, launch.

These are the building blocks the public API composes (scheduler -> split
kernel -> combine); tests and benchmarks call them directly too.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from cute_mla import launcher, registry
from layouts.kv_cache import format_for_dqk
from schedules import decode_plan

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_int32_vector(name: str, t: torch.Tensor, n: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _require(t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}")
    _require(t.dim() == 1, f"{name} must be 1-D, got shape {tuple(t.shape)}")
    _require(t.is_cuda, f"{name} must be a CUDA tensor, got device {t.device}")
    if n is not None:
        _require(t.shape[0] == n, f"{name} must have {n} entries, got {t.shape[0]}")


def plan_decode(cache_seqlens: torch.Tensor, num_parts: int, block_n: int = decode_plan.BLOCK_N,
                fixed_overhead: int = decode_plan.FIXED_OVERHEAD_BLOCKS):
    """Run the split-KV scheduler on the GPU: returns (sched_meta [parts, 8], split_offsets [b + 1]).

    Enqueued on the current stream with no host sync; the decode kernel that follows
    may start early (it is a PDL dependent of this one).
    """
    _check_int32_vector("cache_seqlens", cache_seqlens)
    _require(cache_seqlens.is_contiguous(), "cache_seqlens must be contiguous")
    _require(num_parts >= 1, f"num_parts must be >= 1, got {num_parts}")
    b = cache_seqlens.shape[0]
    dev = cache_seqlens.device
    sched_meta = torch.empty(num_parts, decode_plan.SCHED_META_FIELDS, dtype=torch.int32, device=dev)
    split_offsets = torch.empty(b + 1, dtype=torch.int32, device=dev)
    if b == 0:
        return sched_meta.zero_(), split_offsets.zero_()
    launcher.launch("decode_scheduler", {}, (1, 1, 1),
                    [cache_seqlens, sched_meta, split_offsets, block_n, fixed_overhead],
                    device_index=dev.index)
    return sched_meta, split_offsets


def combine(o_accum: torch.Tensor, lse_accum: torch.Tensor, split_offsets: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, attn_sink: Optional[torch.Tensor] = None,
            skip_single_split: bool = False, pdl: bool = True) -> None:
    """Merge split-KV partials into ``out`` [b, s_q, h_q, 512] and ``lse`` [b, h_q, s_q].

    o_accum [n_splits, s_q, h_q, 512] float32 and lse_accum [n_splits, s_q, h_q] float32
    (base-2 lse of the scaled logits; -inf marks a split without a valid key, whose
    o_accum row is never read).  Request i owns rows split_offsets[i] .. split_offsets[i+1].
    With ``skip_single_split`` rows of single-split requests are left untouched (the split
    kernel finalised them).  The sink is applied here, once.
    """
    _require(out.dtype in _DTYPE_NAMES, f"out must be bfloat16 or float16, got {out.dtype}")
    _require(out.dim() == 4 and out.shape[3] == 512, f"out must be [b, s_q, h_q, 512], got {tuple(out.shape)}")
    b, s_q, h_q, _ = out.shape
    _require(o_accum.dim() == 4 and tuple(o_accum.shape[1:]) == (s_q, h_q, 512),
             f"o_accum must be [n_splits, {s_q}, {h_q}, 512], got {tuple(o_accum.shape)}")
    _require(tuple(lse_accum.shape) == tuple(o_accum.shape[:3]),
             f"lse_accum must be {tuple(o_accum.shape[:3])}, got {tuple(lse_accum.shape)}")
    _require(tuple(lse.shape) == (b, h_q, s_q), f"lse must be [{b}, {h_q}, {s_q}], got {tuple(lse.shape)}")
    _check_int32_vector("split_offsets", split_offsets, b + 1)
    if attn_sink is not None:
        _require(attn_sink.dtype == torch.float32 and tuple(attn_sink.shape) == (h_q,),
                 f"attn_sink must be float32 [{h_q}], got {attn_sink.dtype} {tuple(attn_sink.shape)}")
        sink = attn_sink
    else:
        sink = torch.empty(1, dtype=torch.float32, device=out.device)
    launcher.launch(
        "combine", {"dtype": _DTYPE_NAMES[out.dtype]},
        (-(-h_q // decode_plan.COMBINE_HEADS_PER_CTA), s_q, b),
        [o_accum, lse_accum, split_offsets, sink, out, lse, int(skip_single_split), int(attn_sink is not None)],
        device_index=out.device.index, pdl=pdl)


def dense_decode(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                 sched_meta: torch.Tensor, split_offsets: torch.Tensor, softmax_scale: float, causal: bool,
                 out: torch.Tensor, lse: torch.Tensor) -> None:
    """Split-KV dense decode (SM90) then the combine of multi-split requests, on the current
    stream.  Inputs are assumed validated by the API layer."""
    b, s_q, h_q, _ = q.shape
    parts = sched_meta.shape[0]
    h_kv = k_cache.shape[2]
    # at most one extra split per part on top of one per request
    n_partial = b + parts
    o_accum = torch.empty(n_partial, s_q, h_q, 512, dtype=torch.float32, device=q.device)
    lse_accum = torch.empty(n_partial, s_q, h_q, dtype=torch.float32, device=q.device)
    rows = s_q * (h_q // h_kv)
    launcher.launch(
        "dense_decode_sm90", {"dtype": _DTYPE_NAMES[q.dtype]},
        (parts, h_kv, -(-rows // decode_plan.BLOCK_M)),
        [q, k_cache, block_table, cache_seqlens, sched_meta, split_offsets, out, lse, o_accum, lse_accum,
         float(softmax_scale), int(bool(causal) and s_q > 1), h_q // h_kv],
        device_index=q.device.index)
    combine(o_accum, lse_accum, split_offsets, out, lse, skip_single_split=True, pdl=True)


def sparse_prefill(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                   attn_sink: Optional[torch.Tensor], topk_length: Optional[torch.Tensor],
                   out: torch.Tensor, max_logits: torch.Tensor, lse: torch.Tensor) -> None:
    """SM90 sparse prefill on the current stream; inputs are assumed validated by the API layer."""
    s_q, h_q, d_qk = q.shape
    if s_q == 0:
        return
    dummy_i32 = topk_length if topk_length is not None else torch.empty(1, dtype=torch.int32, device=q.device)
    dummy_f32 = attn_sink if attn_sink is not None else torch.empty(1, dtype=torch.float32, device=q.device)
    tiles = s_q * (h_q // 64)
    launcher.launch(
        "sparse_prefill_sm90", {"d_qk": d_qk}, (min(tiles, _num_sms(q.device)), 1, 1),
        [q, kv, indices, dummy_i32, dummy_f32, out, max_logits, lse, float(sm_scale),
         int(topk_length is not None), int(attn_sink is not None)],
        device_index=q.device.index)


def fp8_cache_bytes(cache: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, page_block_size, 1, bytes_per_token]`` FP8 cache (any 1-byte dtype) ->
    the (num_blocks, block_bytes) uint8 view the sparse decode kernels take (same memory;
    rows keep the cache's block stride)."""
    u8 = cache.view(torch.uint8)
    return u8.as_strided((u8.shape[0], u8.shape[1] * u8.shape[3]), (u8.stride(0), 1))


def sparse_decode_lengths(b: int, topk: int, topk_length: Optional[torch.Tensor], extra_topk: int,
                          extra_topk_length: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Each request's length in the split-KV plan (GPU, no sync): its counted main slots
    padded to whole 64-slot blocks, then its counted extra slots; a length is clamped into
    [0, topk] as the kernel does (``kernels.sm90.sparse_decode``)."""
    blk = decode_plan.BLOCK_N
    n = torch.full((b,), topk, dtype=torch.int32, device=device) if topk_length is None \
        else topk_length.clamp(0, topk)
    lengths = (n + blk - 1) // blk * blk
    if extra_topk:
        lengths = lengths + (extra_topk if extra_topk_length is None else extra_topk_length.clamp(0, extra_topk))
    return lengths.to(torch.int32).contiguous()


# The default matmul type of sparse decode per cache format (perf/results/NOTES.md, session 8):
# V32 f16, 10% faster than bf16 there, its dequantisation f16(code * f16(scale)) is more exact
# than a bf16 one but q and the cache must stay inside f16's range (+-65504); MODEL1 bf16, as
# fast as f16 there, exact (power-of-two scales) and with bf16's range.
SPARSE_DECODE_DEFAULT_MATMUL = {"V32": "f16", "MODEL1": "bf16"}


def sparse_decode_matmul(fmt: str) -> str:
    """The sparse decode kernels' matmul type for cache format ``fmt``: the environment variable
    CUTE_MLA_SPARSE_DECODE_MATMUL ("f16" or "bf16"), or where it is unset or "auto" the
    format's default (SPARSE_DECODE_DEFAULT_MATMUL)."""
    env = registry.SPARSE_DECODE_MATMUL_ENV
    val = os.environ.get(env, "auto")
    _require(val == "auto" or val in registry.SPARSE_DECODE_MATMULS,
             f"{env} must be one of {('auto',) + registry.SPARSE_DECODE_MATMULS} (unset means auto), got {val!r}")
    return SPARSE_DECODE_DEFAULT_MATMUL[fmt] if val == "auto" else val


def sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, indices: torch.Tensor,
                  topk_length: Optional[torch.Tensor], extra_k_cache: Optional[torch.Tensor],
                  extra_indices: Optional[torch.Tensor], extra_topk_length: Optional[torch.Tensor],
                  attn_sink: Optional[torch.Tensor], sched_meta: torch.Tensor, split_offsets: torch.Tensor,
                  softmax_scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Split-KV FP8 sparse decode (SM90) then the combine of multi-split requests, on the
    current stream.  Inputs are assumed validated by the API layer."""
    b, s_q, h_q, d_qk = q.shape
    if b == 0:
        return
    fmt = format_for_dqk(d_qk).name
    parts = sched_meta.shape[0]
    dev = q.device
    i32 = torch.empty(1, dtype=torch.int32, device=dev)
    n_partial = b + parts  # at most one extra split per part on top of one per request
    o_accum = torch.empty(n_partial, s_q, h_q, 512, dtype=torch.float32, device=dev)
    lse_accum = torch.empty(n_partial, s_q, h_q, dtype=torch.float32, device=dev)
    has_extra = extra_k_cache is not None
    x_cache = fp8_cache_bytes(extra_k_cache) if has_extra else torch.empty(1, 16, dtype=torch.uint8, device=dev)
    x_idx = extra_indices if has_extra else torch.empty(1, 1, 1, dtype=torch.int32, device=dev)
    launcher.launch(
        "sparse_decode_sm90", {"fmt": fmt, "matmul": sparse_decode_matmul(fmt)},
        (parts, 1, s_q * h_q // decode_plan.BLOCK_M),
        [q, fp8_cache_bytes(k_cache), indices, i32 if topk_length is None else topk_length,
         x_cache, x_idx, i32 if extra_topk_length is None else extra_topk_length,
         attn_sink if attn_sink is not None else torch.empty(1, dtype=torch.float32, device=dev),
         sched_meta, split_offsets, out, lse, o_accum, lse_accum, float(softmax_scale),
         k_cache.shape[1], extra_k_cache.shape[1] if has_extra else 1,
         int(topk_length is not None), int(has_extra), int(extra_topk_length is not None), int(attn_sink is not None)],
        device_index=dev.index)
    combine(o_accum, lse_accum, split_offsets, out, lse, attn_sink=attn_sink, skip_single_split=True, pdl=True)
