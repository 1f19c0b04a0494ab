"""The paged KV cache as the SM90 kernels see it: one TMA view, one smem layout.

A page block of the cache (``PAGE`` tokens x d columns of one kv head) is the
unit every decode kernel streams.  The cache tensor ``[num_blocks, PAGE, h_kv, d]``
is viewed as ``(PAGE, d, h_kv, num_blocks)`` so that a (PAGE, d) tile is one page
of one head and the TMA coordinates of a page are simply ``(0, 0, head, block)``.
In shared memory a page is the WGMMA B operand: K-major (d contiguous) with the
128-byte swizzle, so TMA writes exactly what the tensor cores read.  The matching
host-side descriptor is ``layouts.operands.paged_kv_tma``.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.cute.nvgpu.cpasync as cpasync
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass.tensor_utils import LayoutEnum

from cute_mla.layouts.constants import PAGE_BLOCK_SIZE as PAGE

COLUMN_TILE = 64  # columns per TMA box: one 128-byte swizzle row of bf16/fp16


@cute.jit
def paged_kv_view(mK: cute.Tensor) -> cute.Tensor:
    """(num_blocks, PAGE, h_kv, d) -> (PAGE, d, h_kv, num_blocks), same memory."""
    return cute.make_tensor(
        mK.iterator,
        cute.make_layout((mK.shape[1], mK.shape[3], mK.shape[2], mK.shape[0]),
                         stride=(mK.stride[1], mK.stride[3], mK.stride[2], mK.stride[0])))


def kv_smem_layout(dtype, d: int, stages: int):
    """(PAGE, d, stages) K-major, 128B-swizzled: the WGMMA B-operand layout of a page."""
    return sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, (64, PAGE, d), dtype, stages)


@cute.jit
def make_kv_tma(mK: cute.Tensor, smem_layout_staged, d: cutlass.Constexpr):
    """TMA atom + coordinate tensor (PAGE, d, h_kv, num_blocks) for whole-page loads."""
    smem_layout = cute.slice_(smem_layout_staged, (None, None, 0))
    return cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), paged_kv_view(mK), smem_layout, (PAGE, d))


def kv_column_tile_layout(dtype):
    """One (PAGE, 64) column tile of a page in the layout of ``kv_smem_layout``: a page's
    tile t is the 8 KiB at byte t * 8192 of its stage, in this layout."""
    return cute.slice_(kv_smem_layout(dtype, COLUMN_TILE, 1), (None, None, 0))


@cute.jit
def make_kv_column_tma(mK: cute.Tensor, dtype: cutlass.Constexpr):
    """TMA atom + coordinate tensor (PAGE, d, h_kv, num_blocks) for loading a page one
    (PAGE, 64) column tile at a time, each on its own mbarrier (same descriptor as
    ``make_kv_tma``: the box is one 128-byte swizzle row wide either way)."""
    return cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), paged_kv_view(mK),
                                       kv_column_tile_layout(dtype), (PAGE, COLUMN_TILE))


@cute.jit
def page_column_tile(mKTma: cute.Tensor, head, block, t) -> cute.Tensor:
    """The (PAGE, 64) coordinate tile of columns [64 t, 64 t + 64) of page ``block``."""
    return cute.flat_divide(mKTma, (PAGE, COLUMN_TILE))[None, None, 0, t, head, block]


@cute.jit
def clamped_seqlen(mSeqlens: cute.Tensor, r, capacity) -> cutlass.Int32:
    """Request r's length, clamped to [0, capacity] (its block table row's tokens), so that no
    length, however wrong, makes a kernel read past the table."""
    return cutlass.min(cutlass.max(mSeqlens[r], 0), capacity)


def causal_key_limit(seqlen, s_q, iq):
    """How many of a request's ``seqlen`` keys query token ``iq`` of ``s_q`` attends to under
    causal masking (the last token all of them, each earlier one one fewer; may be <= 0).
    Plain arithmetic, traced inline where a kernel calls it."""
    return seqlen - (s_q - 1 - iq)


@cute.jit
def page_tile(mKTma: cute.Tensor, d: cutlass.Constexpr, head, block) -> cute.Tensor:
    """The (PAGE, d) coordinate tile of page ``block`` of kv head ``head``."""
    return cute.flat_divide(mKTma, (PAGE, d))[None, None, 0, 0, head, block]
