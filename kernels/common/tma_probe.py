"""A TMA round trip that proves the launcher's tensor maps match the kernel's atoms.

Not an attention kernel: it exists so the foundation's TMA path (descriptor
encoding from ``layouts.operands``, the coordinate-extent parameter, dynamic
shared memory above 48 KiB, mbarrier transaction counts) is tested on the GPU
before any real kernel depends on it.
"""
from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.cute.nvgpu.cpasync as cpasync
from cutlass import Int32

from layouts.operands import TMA_PROBE_TILE


class TmaProbeKernel:
    """Copies a (rows, cols) bf16 matrix tile by tile: global -TMA-> swizzled smem -> global.

    One CTA per (TILE_M x TILE_N) tile; warp 0 issues the bulk tensor copy on an
    mbarrier armed with the tile's byte count, all threads wait on it and then write the
    in-bounds part of the tile with plain stores through the swizzled smem layout.
    ``pad_kib`` extra shared memory pushes the request past the 48 KiB default so
    the launcher's opt-in of larger dynamic shared memory is exercised.
    """

    threads = 128
    pad_kib = 64

    def __init__(self):
        self.tile = TMA_PROBE_TILE
        self.smem_bytes = self.tile[0] * self.tile[1] * 2 + self.pad_kib * 1024 + 2048

    @cute.jit
    def __call__(self, mSrc: cute.Tensor, mDst: cute.Tensor, stream: cuda.CUstream):
        # mSrc, mDst: (rows, cols) bf16, cols contiguous
        tm, tn = self.tile
        # 128-byte swizzle over 64 bf16 columns: the layout WGMMA operands use.
        sLayout = cute.make_composed_layout(cute.make_swizzle(3, 4, 3), 0, cute.make_layout((tm, tn), stride=(tn, 1)))
        atom, mSrcTma = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), mSrc, sLayout, (tm, tn))
        self.kernel(atom, mSrcTma, mDst, sLayout).launch(
            grid=[cute.ceil_div(mSrc.shape[1], tn), cute.ceil_div(mSrc.shape[0], tm), 1],
            block=[self.threads, 1, 1], smem=self.smem_bytes, stream=stream)

    @cute.kernel
    def kernel(self, atom: cute.CopyAtom, mSrcTma: cute.Tensor, mDst: cute.Tensor, sLayout: cute.ComposedLayout):
        tm, tn = self.tile
        tidx, _, _ = cute.arch.thread_idx()
        bx, by, _ = cute.arch.block_idx()
        smem = cutlass.memory.SmemAllocator()
        sTile = smem.allocate_tensor(cutlass.BFloat16, sLayout.outer, byte_alignment=1024, swizzle=sLayout.inner)
        mbar = smem.allocate_array(cutlass.Int64, 1)
        smem.allocate(self.pad_kib * 1024, byte_alignment=16)
        if tidx == 0:
            cpasync.prefetch_descriptor(atom)
            cute.arch.mbarrier_init(mbar, 1)
        cute.arch.mbarrier_init_fence()
        cute.arch.barrier()

        gSrc = cute.local_tile(mSrcTma, (tm, tn), (by, bx))  # (tm, tn) coordinates
        tSs, tSg = cpasync.tma_partition(atom, 0, cute.make_layout(1),
                                         cute.group_modes(sTile, 0, 2), cute.group_modes(gSrc, 0, 2))
        # The TMA copy elects its issuing lane itself (elect.sync over the full warp),
        # so it must be reached by a whole warp, never from inside a one-thread branch.
        if cute.arch.make_warp_uniform(cute.arch.warp_idx()) == 0:
            with cute.arch.elect_one():
                cute.arch.mbarrier_arrive_and_expect_tx(mbar, tm * tn * 2)
            cute.copy(atom, tSg, tSs, tma_bar_ptr=mbar)
        cute.arch.mbarrier_wait(mbar, 0)

        rows, cols = mDst.shape
        for i in cutlass.range(tidx, tm * tn, self.threads):
            r = i // tn
            c = i - r * tn
            gr = by * tm + r
            gc = bx * tn + c
            if gr < rows and gc < cols:
                mDst[gr, gc] = sTile[r, c]
