"""Thin torch wrappers over the foundation kernels (scheduler, combine): validate, allocate,
launch by name; tests and benchmarks call them directly.  The public entry points run through
prepared plans (``cute_mla.plans``) instead.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from cute_mla import launcher, registry
from cute_mla.layouts.constants import BLOCK_N, SCHED_META_FIELDS
from cute_mla.schedules import decode_plan, grids

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}  # torch dtype -> kernel variant dtype


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


def scale_value(name: str, value) -> float:
    """A softmax scale as a float: from a Python or numpy number or a 0-d CPU tensor; NaN, inf,
    zero and negative values raise ValueError naming ``name`` (a CUDA tensor would need a
    host sync to read, so it is refused too)."""
    if isinstance(value, torch.Tensor):
        _require(value.dim() == 0 and not value.is_cuda and value.dtype.is_floating_point,
                 f"{name} must be a number or a 0-d floating CPU tensor, got a {value.dtype} tensor of shape "
                 f"{tuple(value.shape)} on {value.device}")
        value = value.item()
    elif isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    _require(math.isfinite(v) and v > 0, f"{name} must be a finite number > 0, got {v}")
    return v


def plan_decode(cache_seqlens: torch.Tensor, num_parts: int, block_n: int = BLOCK_N,
                fixed_overhead: int = decode_plan.FIXED_OVERHEAD_BLOCKS, max_len: Optional[int] = None,
                light_overhead: Optional[int] = None):
    """Run the split-KV scheduler on the GPU: returns (sched_meta [parts, 8], split_offsets [b + 1]).

    Lengths are clamped to [0, max_len] (default: the most the plan's int32 arithmetic can
    hold for this batch, ``decode_plan.max_plan_len``).  A light plan counts ``light_overhead`` a
    piece (``decode_plan.piece_overhead``; default ``fixed_overhead``).  Enqueued on the current stream with no host sync;
    the decode kernel that follows may start early (it is a PDL dependent of this one).
    """
    _check_int32_vector("cache_seqlens", cache_seqlens)
    _require(cache_seqlens.is_contiguous(), "cache_seqlens must be contiguous")
    _require(num_parts >= 1, f"num_parts must be >= 1, got {num_parts}")
    b = cache_seqlens.shape[0]
    if max_len is None:
        max_len = decode_plan.max_plan_len(b, num_parts, block_n, fixed_overhead)
    decode_plan.check_plan_fits(b, max_len, num_parts, block_n, fixed_overhead)
    light_overhead = fixed_overhead if light_overhead is None else light_overhead
    _require(0 <= light_overhead <= fixed_overhead,
             f"light_overhead must be in [0, fixed_overhead = {fixed_overhead}], got {light_overhead}")
    dev = cache_seqlens.device
    sched_meta = torch.empty(num_parts, SCHED_META_FIELDS, dtype=torch.int32, device=dev)
    split_offsets = torch.empty(b + 1, dtype=torch.int32, device=dev)
    if b == 0:
        return sched_meta.zero_(), split_offsets.zero_()
    launcher.launch("decode_scheduler", {}, grids.SCHEDULER, device_index=dev.index, cache_seqlens=cache_seqlens,
                    sched_meta=sched_meta, split_offsets=split_offsets, block_n=block_n, fixed_overhead=fixed_overhead,
                    light_overhead=light_overhead, max_len=max_len)
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
    _require(out.dtype in DTYPE_NAMES, f"out must be bfloat16 or float16, got {out.dtype}")
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
    variant, grid = combine_variant(out.dtype, b, s_q, h_q)
    launcher.launch(
        "combine", variant, grid, device_index=out.device.index, pdl=pdl, o_accum=o_accum, lse_accum=lse_accum,
        split_offsets=split_offsets, attn_sink=sink, out=out, lse=lse, skip_single_split=int(skip_single_split),
        has_sink=int(attn_sink is not None))


def combine_variant(dtype: torch.dtype, b: int, s_q: int, h_q: int) -> tuple[dict, grids.Grid]:
    """The combine kernel's variant and grid for an output of ``dtype`` and b * s_q * h_q rows:
    the ``columns`` variant up to ``COMBINE_COLUMNS_MAX_ROWS`` rows (``grids.combine_columns``)."""
    return ({"dtype": DTYPE_NAMES[dtype], "columns": grids.combine_columns(b, s_q, h_q)},
            grids.combine(b, s_q, h_q))


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
