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

from cute_mla.kernels.common.dtypes import dsl_dtype
from cute_mla.kernels.common.paged_kv import PAGE, kv_smem_layout, make_kv_tma, page_tile
from cute_mla.layouts.operands import TMA_PROBE_TILE


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
    def __call__(self, src: cute.Tensor, dst: cute.Tensor, stream: cuda.CUstream):
        # src, dst: (rows, cols) bf16, cols contiguous
        tm, tn = self.tile
        # 128-byte swizzle over 64 bf16 columns: the layout WGMMA operands use.
        sLayout = cute.make_composed_layout(cute.make_swizzle(3, 4, 3), 0, cute.make_layout((tm, tn), stride=(tn, 1)))
        atom, mSrcTma = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), src, sLayout, (tm, tn))
        self.kernel(atom, mSrcTma, dst, sLayout).launch(
            grid=[cute.ceil_div(src.shape[1], tn), cute.ceil_div(src.shape[0], tm), 1],
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


class PagedKvProbeKernel:
    """Gathers whole KV pages through a block table with the decode kernels' TMA view.

    One CTA per (block-table column j, request b, kv head h): it loads page
    ``block_table[b, j]`` of head h (PAGE x d, several TMA boxes on one mbarrier)
    into the WGMMA-ready swizzled smem layout, then writes it to
    ``out[b, j*PAGE : (j+1)*PAGE, h, :]``.  Tested bit-exact, this pins down the
    host descriptor of ``layouts.operands.paged_kv_tma`` before a kernel relies on it.
    """

    threads = 128

    def __init__(self, dtype: str, d: int):
        self.dtype = dsl_dtype(dtype)
        self.d = d
        self.smem_layout = None
        self.smem_bytes = PAGE * d * 2 + 1024 + 64

    @cute.jit
    def __call__(self, k_cache: cute.Tensor, block_table: cute.Tensor, out: cute.Tensor, stream: cuda.CUstream):
        # k_cache (num_blocks, PAGE, h_kv, d); block_table (b, max_blocks) int32; out (b, max_blocks*PAGE, h_kv, d)
        sLayout = kv_smem_layout(self.dtype, self.d, 1)
        atom, mKTma = make_kv_tma(k_cache, sLayout, self.d)
        self.kernel(atom, mKTma, block_table, out, sLayout).launch(
            grid=[block_table.shape[1], block_table.shape[0], k_cache.shape[2]],
            block=[self.threads, 1, 1], smem=self.smem_bytes, stream=stream)

    @cute.kernel
    def kernel(self, atom: cute.CopyAtom, mKTma: cute.Tensor, mBlockTable: cute.Tensor, mOut: cute.Tensor,
               sLayout: cute.ComposedLayout):
        tidx, _, _ = cute.arch.thread_idx()
        j, ib, hk = cute.arch.block_idx()
        smem = cutlass.memory.SmemAllocator()
        sK = smem.allocate_tensor(self.dtype, sLayout.outer, byte_alignment=1024, swizzle=sLayout.inner)
        mbar = smem.allocate_array(cutlass.Int64, 1)
        if tidx == 0:
            cpasync.prefetch_descriptor(atom)
            cute.arch.mbarrier_init(mbar, 1)
        cute.arch.mbarrier_init_fence()
        cute.arch.barrier()

        page = mBlockTable[ib, j]
        gK = page_tile(mKTma, self.d, hk, page)  # (PAGE, d)
        tKs, tKg = cpasync.tma_partition(atom, 0, cute.make_layout(1),
                                         cute.group_modes(sK, 0, 2), cute.group_modes(gK, 0, 2))
        if cute.arch.make_warp_uniform(cute.arch.warp_idx()) == 0:
            with cute.arch.elect_one():
                cute.arch.mbarrier_arrive_and_expect_tx(mbar, PAGE * self.d * self.dtype.width // 8)
            cute.copy(atom, tKg, tKs[None, 0], tma_bar_ptr=mbar)
        cute.arch.mbarrier_wait(mbar, 0)

        for i in cutlass.range(tidx, PAGE * self.d, self.threads):
            t = i // self.d
            c = i - t * self.d
            mOut[ib, j * PAGE + t, hk, c] = sK[t, c, 0]
