"""Small WGMMA helpers shared by the SM90 attention kernels."""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass.cute.nvgpu import warpgroup


@cute.jit
def swizzle_128b(offset):
    """The 128-byte swizzle of a byte offset into a 1024-byte aligned K-major WGMMA operand
    (rows of 128 bytes, 8-row atoms): bits 4-6 (the 16-byte piece in its row) ^= bits 7-9
    (the row in its atom).  ``offset`` is the unswizzled, row-major offset."""
    return offset ^ ((offset >> 3) & 0x70)


@cute.jit
def gemm(tiled_mma: cute.TiledMma, acc: cute.Tensor, tA: cute.Tensor, tB: cute.Tensor,
         zero_init: cutlass.Constexpr[bool], k_range: cutlass.Constexpr = None):
    """acc (+)= A @ B over the k-blocks [begin, end) = ``k_range`` (default: all) of the
    partitioned operands (MMA, MMA_M/N, MMA_K)."""
    begin, end = k_range if k_range is not None else (0, cute.size(tA, mode=[2]))
    for k in cutlass.range_constexpr(begin, end):
        tiled_mma.set(warpgroup.Field.ACCUMULATE, not zero_init or k != begin)
        cute.gemm(tiled_mma, acc, tA[None, None, k], tB[None, None, k], acc)
