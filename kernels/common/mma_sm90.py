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


def acc_as_operand_layout(acc_layout: cute.Layout, a_values) -> cute.Layout:
    """Re-read a WGMMA accumulator fragment (64 x N, fp32) as the register A operand of a
    following 64 x N x 16k WGMMA: each k-block of 16 columns of the accumulator holds
    exactly the values one A fragment needs, in the same register order, so only the
    grouping of modes changes, never the data."""
    per_k = cute.size(a_values)
    return cute.make_layout(
        (a_values, acc_layout.shape[1], (acc_layout.shape[2], cute.size(acc_layout, mode=[0]) // per_k)),
        stride=(acc_layout.stride[0], acc_layout.stride[1],
                (acc_layout.stride[2], cute.size(a_values, mode=[2]) * acc_layout.stride[0][2])))


@cute.jit
def acc_to_operand(acc: cute.Tensor, tiled_mma_next: cute.TiledMma, dtype: cutlass.Constexpr):
    """Convert an fp32 accumulator (e.g. softmax probabilities P) into the 16-bit register
    A operand of ``tiled_mma_next``."""
    op = cute.make_rmem_tensor(acc_as_operand_layout(acc.layout, tiled_mma_next.tv_layout_A.shape[1]), dtype)
    as_acc = cute.make_tensor(op.iterator, acc.layout)
    as_acc.store(acc.load().to(dtype))
    return op
