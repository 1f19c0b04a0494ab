"""GPU side of the split-KV plan (see ``schedules.decode_plan`` for the format).

One warp: the lanes compute the requests' block counts, add them up and stage
them in shared memory, then lane 0 walks the requests once, exactly as ``plan_host``
does.  The walk is O(b + parts) dependent scalar steps, so it must read shared
memory, not global: from global each step would pay a full memory latency.
Batches larger than the staging buffer are walked from global memory (same code,
slower).  Lengths are clamped to [0, max_len] (the most a request's block table or indices
hold, as the decode kernels clamp them), and the host keeps ``max_len`` and the batch's total
cost inside int32 (``decode_plan.check_plan_fits``), so no length can wrap the arithmetic.
It runs on the stream with no host synchronisation, so a decode step stays graph-capturable.
"""
from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Int32

from cute_mla.layouts.constants import (META_BEGIN_BLOCK, META_BEGIN_REQ, META_BEGIN_SPLIT, META_END_BLOCK,
                                        META_END_REQ, SCHED_META_FIELDS)
from cute_mla.schedules.decode_plan import LIGHT_LOAD_BLOCKS

STAGED_REQUESTS = 8192  # block counts staged in shared memory (32 KiB, under the 48 KiB default limit)


class DecodeSchedulerKernel:
    """Computes ``sched_meta`` and ``split_offsets`` from ``cache_seqlens``; writes every field
    of both, whatever the lengths.

    Warp roles: a single warp; all lanes reduce, lane 0 plans and writes.
    Launched as a PDL primary: it lets the decode kernel start its prologue early.
    """

    threads = 32

    def __init__(self):
        self.smem_bytes = STAGED_REQUESTS * 4

    @cute.jit
    def __call__(self, cache_seqlens: cute.Tensor, sched_meta: cute.Tensor, split_offsets: cute.Tensor,
                 block_n: Int32, fixed_overhead: Int32, light_overhead: Int32, max_len: Int32, stream: cuda.CUstream):
        self.kernel(cache_seqlens, sched_meta, split_offsets, block_n, fixed_overhead, light_overhead, max_len).launch(
            grid=[1, 1, 1], block=[self.threads, 1, 1], smem=self.smem_bytes, stream=stream)

    @cute.kernel
    def kernel(self, mSeqlens: cute.Tensor, mMeta: cute.Tensor, mOffsets: cute.Tensor,
               block_n: Int32, fixed_overhead: Int32, light_overhead: Int32, max_len: Int32):
        # mSeqlens (b,), mMeta (parts, 8), mOffsets (b + 1,)
        lane = cute.arch.lane_idx()
        b = mSeqlens.shape[0]
        smem = cutlass.memory.SmemAllocator()
        sBlocks = smem.allocate_tensor(Int32, cute.make_layout(STAGED_REQUESTS), byte_alignment=16)  # (b,)
        staged = b <= STAGED_REQUESTS
        blocks = Int32(0)
        for i in cutlass.range(lane, b, 32):
            nb = self.blocks_of(mSeqlens[i], block_n, max_len)
            if staged:
                sBlocks[i] = nb
            blocks += nb
        blocks = cute.arch.warp_reduction_sum(blocks)
        cute.arch.sync_warp()
        # ``decode_plan.piece_overhead``; the host keeps blocks + overhead * b inside int32
        overhead = fixed_overhead
        if blocks <= LIGHT_LOAD_BLOCKS * mMeta.shape[0]:
            overhead = light_overhead
        if lane == 0:
            self.plan(sBlocks, mSeqlens, staged, mMeta, mOffsets, block_n, overhead, max_len, blocks + overhead * b)
        cute.arch.griddepcontrol_launch_dependents()

    @cute.jit
    def plan(self, sBlocks: cute.Tensor, mSeqlens: cute.Tensor, staged: cutlass.Boolean, mMeta: cute.Tensor,
             mOffsets: cute.Tensor, block_n: Int32, fixed_overhead: Int32, max_len: Int32, total: Int32):
        # sBlocks (b,) staged block counts, valid when `staged`; else they are derived from mSeqlens
        b = mSeqlens.shape[0]
        parts = mMeta.shape[0]
        payload = (total + parts - 1) // parts + fixed_overhead
        mOffsets[0] = 0
        req = Int32(0)
        blk = Int32(0)
        split = Int32(0)
        cum = Int32(0)
        for p in cutlass.range(parts):
            mMeta[p, META_BEGIN_REQ] = req
            mMeta[p, META_BEGIN_BLOCK] = blk
            mMeta[p, META_BEGIN_SPLIT] = split
            remain = payload
            done = Int32(0)
            while req < b and done == 0:
                left = self.num_blocks(sBlocks, mSeqlens, staged, block_n, max_len, req) - blk
                if remain >= left + fixed_overhead:
                    cum += split + 1
                    mOffsets[req + 1] = cum
                    remain -= left + fixed_overhead
                    req += 1
                    blk = Int32(0)
                    split = Int32(0)
                else:
                    if remain - fixed_overhead > 0:
                        blk += remain - fixed_overhead
                        split += 1
                    done = Int32(1)
            end_req = req
            end_blk = blk
            if blk == 0:
                end_req = req - 1
                end_blk = Int32(0)
                if req > 0:
                    end_blk = self.num_blocks(sBlocks, mSeqlens, staged, block_n, max_len, req - 1)
            mMeta[p, META_END_REQ] = end_req
            mMeta[p, META_END_BLOCK] = end_blk
            for f in cutlass.range_constexpr(META_BEGIN_SPLIT + 1, SCHED_META_FIELDS):
                mMeta[p, f] = 0
        # The parts always cover the batch (payload * parts >= total); should a request be left
        # over all the same, it gets no splits, so the combine reads no partial row for it.
        for r in cutlass.range(req, b):
            mOffsets[r + 1] = cum

    @cute.jit
    def num_blocks(self, sBlocks: cute.Tensor, mSeqlens: cute.Tensor, staged: cutlass.Boolean,
                   block_n: Int32, max_len: Int32, i: Int32) -> Int32:
        # The walk is a chain of dependent steps: a staged count costs one shared load,
        # recomputing it costs a global load plus an emulated integer division.
        nb = Int32(0)
        if staged:
            nb = sBlocks[i]
        else:
            nb = self.blocks_of(mSeqlens[i], block_n, max_len)
        return nb

    @cute.jit
    def blocks_of(self, seqlen: Int32, block_n: Int32, max_len: Int32) -> Int32:
        """KV blocks of a request of ``seqlen`` tokens, the length clamped to [0, max_len]
        (negative = empty; max_len <= MAX_PLAN_LEN, so the rounding cannot wrap)."""
        return (cutlass.min(cutlass.max(seqlen, 0), max_len) + block_n - 1) // block_n
