"""``FlashMLASchedMeta``: the split-KV schedule shared by the layers of one decode step.

``get_mla_metadata()`` returns an empty one; the first ``flash_mla_with_kvcache`` call binds it
(computes the schedule on the GPU, no host sync) and later calls with the same configuration
reuse it.  A call whose configuration differs from the bound one raises, and so does one whose
length tensors are others, or were written in place by torch since (``plans.lengths_stamp``).
Inside a CUDA graph nothing can be checked at replay: capture a fresh ``get_mla_metadata()``
per step, as a decode step makes one, and the replay re-plans from the lengths' contents at that
time.  A first call that fails leaves it unbound.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch


class KeptWorkspace(NamedTuple):
    """A split-KV partials buffer a ``FlashMLASchedMeta`` keeps for its step's calls."""
    tensor: torch.Tensor
    stream: int  # the raw CUstream it was made for
    numel: int
    ptr: int


@dataclasses.dataclass
class FlashMLASchedMeta:
    """Scheduling state shared by the layers of one decode step.

    Empty when made by ``get_mla_metadata``; the first ``flash_mla_with_kvcache`` call fills it
    on the GPU (no host sync) and later calls reuse it, which is valid only while shapes and
    lengths stay the same: a call whose shapes differ from the first one's raises, and so does
    one whose length tensors are others or were written in place since (``check_lengths``).
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
    # ``plans.lengths_stamp`` of each length tensor the schedule was planned from
    lengths_stamp: Optional[tuple] = dataclasses.field(default=None, repr=False)
    # (tile_scheduler_metadata, num_splits) data pointers, read once when the schedule is bound
    schedule_pointers: Optional[tuple[int, int]] = dataclasses.field(default=None, repr=False)
    # The split-KV partials buffer of this step's calls (``KeptWorkspace``: with the stream it was
    # made for): the layers of a step run one after another on one stream, so they can share it
    # (one allocation fewer per call; ``plans.SplitKvPlan.fresh_workspace``).  Held while this
    # metadata lives.
    workspace: Optional["KeptWorkspace"] = dataclasses.field(default=None, repr=False)

    def check_config(self, config: Config) -> None:
        """Raise unless this (bound) metadata was made for ``config``."""
        if self.config != config:
            diff = [f.name for f in dataclasses.fields(config)
                    if getattr(config, f.name) != getattr(self.config, f.name)]
            raise ValueError(f"tile_scheduler_metadata was made for other arguments (differs in {', '.join(diff)}); "
                             "reuse one sched_meta only across calls with the same shapes and lengths, "
                             "or get a new one from get_mla_metadata()")


    def check_lengths(self, stamp: tuple) -> None:
        """Raise unless the call's length tensors (``stamp``) are the ones this metadata was
        planned from, unchanged: a schedule made for other lengths would silently skip KV blocks."""
        if self.lengths_stamp != stamp:
            raise ValueError(
                "tile_scheduler_metadata was planned from other lengths: the call's cache_seqlens / topk_length "
                "tensor is another one, or was written in place, since the call that planned it.  A schedule "
                "holds only for the length values it was made from: get a new one from get_mla_metadata() for "
                "every decode step (whenever lengths change) and reuse it only across that step's layers, "
                "which must pass the same length tensors")


def require_sched_meta(sched_meta) -> FlashMLASchedMeta:
    if not isinstance(sched_meta, FlashMLASchedMeta):
        raise TypeError("tile_scheduler_metadata must be the FlashMLASchedMeta returned by get_mla_metadata(), "
                        f"got {type(sched_meta).__name__}")
    return sched_meta


def get_mla_metadata(*args, **kwargs) -> tuple[FlashMLASchedMeta, None]:
    """Returns (an empty ``FlashMLASchedMeta``, None): make one per decode step and pass it to
    every layer's ``flash_mla_with_kvcache``.  Arguments are accepted and ignored, for
    compatibility with FlashMLA's older interface (cache_seqlens, s_q * h_q // h_kv, h_kv)."""
    return FlashMLASchedMeta(), None
