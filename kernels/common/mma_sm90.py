"""Small WGMMA helpers shared by the SM90 attention kernels."""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Int32
from cutlass.cute.nvgpu import warpgroup
from cutlass.cute.nvgpu.warp import StMatrix8x8x16bOp


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


@cute.jit
def store_c_stmatrix(frag: cute.Tensor, tiled_mma: cute.TiledMma, dst: cute.Tensor, tid: Int32):
    """A 16-bit fragment in ``tiled_mma``'s C (accumulator) layout into the shared tile ``dst``
    (the MMA's C tile, any swizzle that keeps 16-byte rows whole) by ``stmatrix``: a warp's 8 x 8
    matrices four an instruction (``STSM.16.M88.4``), each lane giving one matrix row's address,
    for a 4-byte store a pair each with its own swizzled address (``tid``: the thread's index in
    the MMA's threads)."""
    atom = cute.make_copy_atom(StMatrix8x8x16bOp(transpose=False, num_matrices=4), frag.element_type)
    thr = cute.make_tiled_copy_C(atom, tiled_mma).get_slice(tid)
    cute.copy(atom, thr.retile(frag), thr.partition_D(dst))
