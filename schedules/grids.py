"""Each kernel's launch grid, on the host (runtime code: no DSL).

A kernel reads its place in the grid with ``cute.arch.block_idx`` / ``grid_dim``; what each
coordinate means is its tile scheduler's to say: the split tiles and merge chunks of
``kernels.sm90.split_tickets`` (dense decode), the parts of ``schedules.decode_plan`` as
``kernels.sm90.split_kv_decode.DecodePart`` walks them (both decode kernels), the persistent tile
loop of ``kernels.sm90.sparse_prefill``, and the head rows of ``kernels.common.combine``.
"""
from __future__ import annotations

from cute_mla.layouts.constants import (BLOCK_M, COMBINE_COLUMNS_MAX_ROWS, COMBINE_HEADS_PER_CTA,
                                        SPARSE_PREFILL_HEAD_BLOCK)
from cute_mla.schedules.decode_plan import cdiv

Grid = tuple[int, int, int]


def row_blocks(rows: int) -> int:
    """Blocks of ``BLOCK_M`` query rows that cover ``rows``."""
    return cdiv(rows, BLOCK_M)


def split_kv(parts: int, kv_heads: int, rows: int) -> Grid:
    """The split-KV decode kernels: ``parts`` persistent CTAs (``decode_plan.num_sm_parts``) for
    each kv head and each row block of its ``rows`` query rows (s_q times the rows a query token
    has under one kv head)."""
    return parts, kv_heads, row_blocks(rows)


def sparse_prefill(s_q: int, h_q: int, num_sms: int) -> Grid:
    """Sparse prefill: one persistent CTA per SM at most, over s_q * h_q / 64 tiles."""
    return min(s_q * (h_q // SPARSE_PREFILL_HEAD_BLOCK), num_sms), 1, 1


def combine_columns(b: int, s_q: int, h_q: int) -> int:
    """Whether a combine of these rows runs the ``columns`` variant (``COMBINE_COLUMNS_MAX_ROWS``)."""
    return int(b * s_q * h_q <= COMBINE_COLUMNS_MAX_ROWS)


def combine(b: int, s_q: int, h_q: int) -> Grid:
    """The split-KV combine, per query token and request: ``COMBINE_HEADS_PER_CTA`` head rows a
    CTA, or one in the ``columns`` variant (``combine_columns``)."""
    return (h_q if combine_columns(b, s_q, h_q) else cdiv(h_q, COMBINE_HEADS_PER_CTA)), s_q, b


SCHEDULER: Grid = (1, 1, 1)  # the decode scheduler: one warp plans the whole batch
