"""FlashMLA-compatible public API (same names, argument order and return values).

Kernel paths land issue by issue; a path whose kernel is not built yet raises
``NotImplementedError`` naming what is missing rather than computing anything.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from cute_mla import ops
from schedules import decode_plan


@dataclasses.dataclass
class FlashMLASchedMeta:
    """Scheduling state shared by the layers of one decode step.

    Empty when made by ``get_mla_metadata``; the first ``flash_mla_with_kvcache``
    call fills it on the GPU (no host sync) and later calls reuse it, which is
    valid only while shapes and lengths stay the same: a call whose shapes differ
    from the first one's raises.
    """

    @dataclasses.dataclass(frozen=True)
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: Optional[int]
        extra_page_block_size: Optional[int]
        extra_topk: Optional[int]
        device: torch.device

    have_initialized: bool = False
    config: Optional[Config] = None
    tile_scheduler_metadata: Optional[torch.Tensor] = None  # (num_sm_parts, 8) int32
    num_splits: Optional[torch.Tensor] = None  # split offsets, (b + 1,) int32


def get_mla_metadata(*args, **kwargs) -> Tuple[FlashMLASchedMeta, None]:
    """Returns an empty ``FlashMLASchedMeta``; arguments are accepted and ignored for
    compatibility with FlashMLA's older interface."""
    return FlashMLASchedMeta(), None


def _config_of(q, k_cache, causal, is_fp8_kvcache, indices, extra_k_cache, extra_indices) -> FlashMLASchedMeta.Config:
    return FlashMLASchedMeta.Config(
        b=q.shape[0], s_q=q.shape[1], h_q=q.shape[2], page_block_size=k_cache.shape[1], h_k=k_cache.shape[2],
        causal=bool(causal), is_fp8_kvcache=bool(is_fp8_kvcache),
        topk=None if indices is None else indices.shape[-1],
        extra_page_block_size=None if extra_k_cache is None else extra_k_cache.shape[1],
        extra_topk=None if extra_indices is None else extra_indices.shape[-1],
        device=q.device)


def _bind_sched_meta(sched_meta: FlashMLASchedMeta, config: FlashMLASchedMeta.Config) -> bool:
    """Attach ``config`` to ``sched_meta``; True when the schedule must still be computed."""
    if not isinstance(sched_meta, FlashMLASchedMeta):
        raise TypeError("tile_scheduler_metadata must be the FlashMLASchedMeta returned by get_mla_metadata(), "
                        f"got {type(sched_meta).__name__}")
    if not sched_meta.have_initialized:
        sched_meta.config = config
        sched_meta.have_initialized = True
        return True
    if sched_meta.config != config:
        diff = [f.name for f in dataclasses.fields(config)
                if getattr(config, f.name) != getattr(sched_meta.config, f.name)]
        raise ValueError(f"tile_scheduler_metadata was made for other arguments (differs in {', '.join(diff)}); "
                         "reuse one sched_meta only across calls with the same shapes and lengths, "
                         "or get a new one from get_mla_metadata()")
    return False


def schedule_decode(sched_meta: FlashMLASchedMeta, cache_seqlens: torch.Tensor, s_q: int, h_q: int, h_kv: int):
    """Fill ``sched_meta`` with the split-KV plan for these lengths (GPU, no sync)."""
    num_sms = torch.cuda.get_device_properties(cache_seqlens.device).multi_processor_count
    parts = decode_plan.num_sm_parts(num_sms, s_q, h_q, h_kv)
    sched_meta.tile_scheduler_metadata, sched_meta.num_splits = ops.plan_decode(cache_seqlens, parts)


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: Optional[torch.Tensor],
                           cache_seqlens: Optional[torch.Tensor], head_dim_v: int,
                           tile_scheduler_metadata: FlashMLASchedMeta, num_splits: None = None,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           is_fp8_kvcache: bool = False, indices: Optional[torch.Tensor] = None,
                           attn_sink: Optional[torch.Tensor] = None, extra_k_cache: Optional[torch.Tensor] = None,
                           extra_indices_in_kvcache: Optional[torch.Tensor] = None,
                           topk_length: Optional[torch.Tensor] = None,
                           extra_topk_length: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """MLA decode over a paged KV cache: returns (out [b, s_q, h_q, 512], lse [b, h_q, s_q])."""
    if num_splits is not None:
        raise ValueError("num_splits must be None (kept only for compatibility with FlashMLA's older interface)")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor [b, s_q, h_q, d_qk], got {getattr(q, 'shape', type(q))}")
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise ValueError(f"k_cache must be a 4-D tensor [num_blocks, page_block_size, h_kv, d], "
                         f"got {getattr(k_cache, 'shape', type(k_cache))}")
    if head_dim_v != 512:
        raise ValueError(f"head_dim_v must be 512, got {head_dim_v}")
    config = _config_of(q, k_cache, causal, is_fp8_kvcache, indices, extra_k_cache, extra_indices_in_kvcache)
    if indices is not None or is_fp8_kvcache:
        _bind_sched_meta(tile_scheduler_metadata, config)
        raise NotImplementedError("cute-mla: the FP8 sparse decode kernel (issue 4) is not built yet")
    for name, val in (("attn_sink", attn_sink), ("extra_k_cache", extra_k_cache),
                      ("extra_indices_in_kvcache", extra_indices_in_kvcache), ("topk_length", topk_length),
                      ("extra_topk_length", extra_topk_length)):
        if val is not None:
            raise ValueError(f"{name} is only supported by sparse attention (indices given); got it with dense decode")
    _check_dense_decode(q, k_cache, block_table, cache_seqlens)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if _bind_sched_meta(tile_scheduler_metadata, config):
        schedule_decode(tile_scheduler_metadata, cache_seqlens, q.shape[1], q.shape[2], k_cache.shape[2])
    b, s_q, h_q, _ = q.shape
    out = torch.empty(b, s_q, h_q, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    ops.dense_decode(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata.tile_scheduler_metadata,
                     tile_scheduler_metadata.num_splits, softmax_scale, causal, out, lse)
    return out, lse


def _check_dense_decode(q, k_cache, block_table, cache_seqlens) -> None:
    """Every shape, dtype and device rule of the dense path, with the argument named."""
    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

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
    need(cache_seqlens.dtype == torch.int32 and tuple(cache_seqlens.shape) == (b,),
         f"cache_seqlens must be int32 [{b}], got {cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    need(cache_seqlens.is_contiguous(), "cache_seqlens must be contiguous")


def flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None):
    """Sparse MLA prefill: returns (out, max_logits, lse)."""
    raise NotImplementedError("cute-mla: the sparse prefill kernel (issue 5) is not built yet")


def flash_attn_varlen_func(*args, **kwargs):
    raise NotImplementedError("cute-mla: dense MHA prefill is not built yet")


flash_attn_varlen_qkvpacked_func = flash_attn_varlen_func
flash_attn_varlen_kvpacked_func = flash_attn_varlen_func
