"""Small WGMMA helpers shared by the SM90 attention kernels."""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass.cute.nvgpu import warpgroup


@cute.jit
def gemm(tiled_mma: cute.TiledMma, acc: cute.Tensor, tA: cute.Tensor, tB: cute.Tensor,
         zero_init: cutlass.Constexpr[bool]):
    """acc (+)= A @ B over every k-block of the partitioned operands (MMA, MMA_M/N, MMA_K)."""
    for k in cutlass.range_constexpr(cute.size(tA, mode=[2])):
        tiled_mma.set(warpgroup.Field.ACCUMULATE, not zero_init or k != 0)
        cute.gemm(tiled_mma, acc, tA[None, None, k], tB[None, None, k], acc)
