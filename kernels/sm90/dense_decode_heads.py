"""SM90 dense decode for 8, 16 or 32 query heads of one kv head, with the heads on the MMA's N side.

Dense decode's 64-row kernel (``kernels.sm90.dense_decode``) gives a query token of a request a
64-row block, so at h_q 16 three quarters of its MMA rows are padding; that padded compute costs
about as much as the page stream itself (perf/results/NOTES.md, session 21).  Here the consumer is
the small-head one (``kernels.sm90.heads_consumer.HeadsOnN``: S^T = K Q^T, O^T = V^T P^T, one
warpgroup, no padding rows) and a producer warp streams whole pages:

  warp 0       producer: for each block of its part's pieces, page ``block_table[r, blk]`` of
               the request (one TMA of 9 column boxes, ``paged_kv.make_kv_tma``) into the next
               stage of a ``PipelineTmaAsync`` ring; blocks past a request's length are never
               loaded, so no table entry past it is read;
  warps 1-3    nothing after the register hand-off;
  warpgroup 1  ``HeadsOnN``'s consumer.  A CTA is one query token (grid (parts, 1, s_q)), so
               its keys are a prefix of each request: the request's length, clamped to its
               block table's pages, less s_q - 1 - i for query token i under causal masking
               (``PageKeys``).  Keys past it are masked by selection (a page's tail may hold
               anything, NaN included), and their V rows are zeroed in the stage before O^T
               reads it.

The split-KV schedule is the decode scheduler's, as dense decode's; a request computed by
several parts is merged by the combine kernel (as sparse decode), not by tickets.  No sink.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.cute.nvgpu.cpasync as cpasync
import cutlass.pipeline as pipeline
from cutlass import Float32, Int32

from cute_mla.kernels.common.dtypes import dsl_dtype
from cute_mla.kernels.common.gmem import store_16B_shared
from cute_mla.kernels.common.mma_sm90 import swizzle_128b
from cute_mla.kernels.common.paged_kv import causal_key_limit, clamped_seqlen, kv_smem_layout, make_kv_tma, page_tile
from cute_mla.kernels.sm90.heads_consumer import HeadSoftmax, HeadsOnN
from cute_mla.kernels.sm90.split_kv_decode import DecodePart, SplitKvDecodeSm90
from cute_mla.layouts.constants import (BLOCK_N, D_V, DENSE_DECODE_MAX_COLUMNS, DENSE_DECODE_SMALL_HEADS,
                                        DENSE_DECODE_TOKENS, PAGE_BLOCK_SIZE as PAGE)


@dataclass(frozen=True)  # frozen: the DSL passes it through loops and branches as a constant
class PageKeys:
    """The keys of each request that a query token attends to: a prefix of its pages."""

    seqlens: Any  # (b,) int32 cache_seqlens
    max_len: Any  # the block table's capacity in tokens: lengths are clamped to it
    causal: Any  # Int32: whether query token i of s_q stops s_q - 1 - i keys short
    s_q: Any

    @cute.jit
    def length(self, r: Int32) -> Int32:
        """Request r's length, clamped to [0, its table's capacity], as the scheduler clamps it."""
        return clamped_seqlen(self.seqlens, r, self.max_len)

    @cute.jit
    def limit(self, r: Int32, iq: Int32) -> Int32:
        """How many of request r's keys query token ``iq`` attends to (may be <= 0)."""
        n = self.length(r)
        if self.causal != 0:
            n = causal_key_limit(n, self.s_q, iq)
        return n


class DenseDecodeHeadsSm90(HeadsOnN, SplitKvDecodeSm90):
    """Dense decode with the heads on N (see the module docstring); ``heads`` = h_q
    (``layouts.constants.DENSE_DECODE_SMALL_HEADS``), h_kv 1, d_qk 576."""

    # The producer warp only walks the schedule and issues TMA; the consumer takes the heads
    # consumer's 240 (the sparse heads kernel's, where none of its variants spills).
    regs_producer = 40
    regs_consumer = 240

    def __init__(self, dtype: str, heads: int = 16, tokens: int = 1):
        """``heads``: h_q; ``tokens``: the query tokens a CTA takes (its MMAs' N is heads *
        tokens, ``dense_heads_tokens``)."""
        assert heads in DENSE_DECODE_SMALL_HEADS and tokens in DENSE_DECODE_TOKENS
        assert heads * tokens <= DENSE_DECODE_MAX_COLUMNS
        super().__init__(dsl_dtype(dtype), 576)
        self.tokens = tokens
        self.size_ring(heads * tokens)

    # ------------------------------------------------------------------ host side
    @cute.jit
    def __call__(self, q: cute.Tensor, k_cache: cute.Tensor, block_table: cute.Tensor, cache_seqlens: cute.Tensor,
                 sched_meta: cute.Tensor, split_offsets: cute.Tensor, out: cute.Tensor, lse: cute.Tensor,
                 o_accum: cute.Tensor, lse_accum: cute.Tensor, softmax_scale: Float32, causal: Int32,
                 stream: cuda.CUstream):
        # q (b, s_q, h_q, 576); k_cache (num_blocks, PAGE, 1, 576); out (b, s_q, h_q, 512); lse (b, h_q, s_q)
        sK_layout = kv_smem_layout(self.dtype, self.d, self.stages)
        kv_atom, mKTma = make_kv_tma(k_cache, sK_layout, self.d)
        grid = [sched_meta.shape[0], 1, q.shape[1] // self.tokens]  # a row block a token group
        self.kernel(q, kv_atom, mKTma, block_table, cache_seqlens, sched_meta, split_offsets, out, lse, o_accum,
                    lse_accum, softmax_scale, causal, self.q_smem_layout(), sK_layout, self.v_smem_layout(),
                    self.p_smem_layout()).launch(
            grid=grid, block=[self.threads, 1, 1], smem=self.smem_bytes, stream=stream, min_blocks_per_mp=1)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, kv_atom: cute.CopyAtom, mKTma: cute.Tensor, mBlockTable: cute.Tensor,
               mSeqlens: cute.Tensor, mSchedMeta: cute.Tensor, mSplitOffsets: cute.Tensor, mOut: cute.Tensor,
               mLse: cute.Tensor, mOAccum: cute.Tensor, mLseAccum: cute.Tensor, softmax_scale: Float32,
               causal: Int32, sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout,
               sV_layout: cute.ComposedLayout, sP_layout: cute.ComposedLayout):
        # Parameters in layouts.operands.dense_decode_heads_args order; static objects last.
        qk_mma, pv_mma, qk_tail_mma = self.make_mmas()
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())

        smem = cutlass.memory.SmemAllocator()
        sQ, sK, sP, sStat = self.allocate_operands(smem, sQ_layout, sK_layout, sP_layout)
        kv_pipe = self.make_page_pipeline(smem)

        part, _, iq = cute.arch.block_idx()
        sched = DecodePart(mSchedMeta, mSplitOffsets, part)
        keys = PageKeys(mSeqlens, mBlockTable.shape[1] * PAGE, causal, mQ.shape[1])
        if warp < 4:
            cute.arch.setmaxregister_decrease(self.regs_producer)
            if warp == 0:
                cpasync.prefetch_descriptor(kv_atom)
                self.load_pages(kv_atom, mKTma, mBlockTable, keys, sched, sK, kv_pipe)
        else:
            cute.arch.setmaxregister_increase(self.regs_consumer)
            self.consume(qk_mma, pv_mma, qk_tail_mma, sQ, sK, sP, sStat, None, sV_layout, mQ, keys, None, sched,
                         mOut, mLse, mOAccum, mLseAccum, kv_pipe, softmax_scale, Int32(0), iq, 0, tidx - 128)

    @cute.jit
    def make_page_pipeline(self, smem):
        """The KV ring's handshake: a ``PipelineTmaAsync`` whose stage is full once its page's
        bytes have landed (one expect-tx arrival by the producer warp) and empty once each of
        the 4 consumer warps has released it (one lane each).  Call before the roles split: it
        synchronises the CTA."""
        return pipeline.PipelineTmaAsync.create(
            num_stages=self.stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 1),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.consumer_threads // 32),
            tx_count=self.kv_bytes,
            barrier_storage=smem.allocate_array(cutlass.Int64, 2 * self.stages, byte_alignment=8))

    # ------------------------------------------------------------------ producer
    @cute.jit
    def load_pages(self, kv_atom: cute.CopyAtom, mKTma: cute.Tensor, mBlockTable: cute.Tensor, keys: PageKeys,
                   sched: DecodePart, sK: cute.Tensor, kv_pipe):
        """One warp: every page of the part's pieces, in the consumer's order, one stage each."""
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        begin_req = sched.begin_req()
        for r in cutlass.range(begin_req, sched.end_req() + 1, unroll=1):
            lo, hi, _ = self.piece(keys, sched, r, begin_req)
            for blk in cutlass.range(lo, hi, unroll=1):
                page = mBlockTable[r, blk]  # its load overlaps the wait for the stage
                kv_pipe.producer_acquire(state)
                tKs, tKg = cpasync.tma_partition(kv_atom, 0, cute.make_layout(1), cute.group_modes(sK, 0, 2),
                                                 cute.group_modes(page_tile(mKTma, self.d, 0, page), 0, 2))
                cute.copy(kv_atom, tKg, tKs[None, state.index], tma_bar_ptr=kv_pipe.producer_get_barrier(state))
                kv_pipe.producer_commit(state)
                state.advance()

    # ------------------------------------------------------------------ the consumer's hooks
    @cute.jit
    def piece(self, keys: PageKeys, sched: DecodePart, r: Int32, begin_req: Int32):
        """This part's piece of request r: (first block, end block, split index)."""
        lo, hi = sched.block_range(keys.length(r), r)
        return lo, hi, sched.split_of(r, begin_req)

    def q_row(self, mQ: cute.Tensor, where, row: Int32):
        """Column ``row`` of the CTA's Q^T tile: head row % h_q of query token ``tokens *
        where.row_block + row // h_q`` (every one exists)."""
        if cutlass.const_expr(self.tokens == 1):
            return mQ[where.request, where.row_block, row, None], True
        h = self.heads // self.tokens
        return mQ[where.request, where.row_block * self.tokens + row // h, row % h, None], True

    def piece_keys(self, keys: PageKeys, sMask, r: Int32, iq: Int32):
        """The piece's mask: how many of request r's keys the CTA's first query token attends to
        (token group ``iq``), and how many more each later token does (1 under causal masking)."""
        if cutlass.const_expr(self.tokens == 1):
            return keys.limit(r, iq)
        return keys.limit(r, iq * self.tokens), keys.causal

    def block_mask(self, limit, blk: Int32):
        """How many of block ``blk``'s tokens are keys of the first query token (<= 0: none;
        >= 64: all) (and the step to the next token's)."""
        if cutlass.const_expr(self.tokens == 1):
            return limit - blk * BLOCK_N
        first, step = limit
        return first - blk * BLOCK_N, step

    def valid_rows(self, mask):
        """(the fewest, the most) of a block's tokens that are keys of some column of the CTA."""
        if cutlass.const_expr(self.tokens == 1):
            return mask, mask
        first, step = mask
        return first, first + step * (self.tokens - 1)

    @cute.jit
    def mask_logits(self, acc_s: cute.Tensor, tScS: cute.Tensor, mask, stage: Int32):
        """Tokens at or past a column's key count get -inf, selected, so that whatever S^T holds
        there (NaN from a page's unused tail) is gone.  Whole blocks (all but a piece's last)
        skip it."""
        fewest, _ = self.valid_rows(mask)
        if fewest < BLOCK_N:
            for k in cutlass.range_constexpr(cute.size(acc_s)):
                t, _ = tScS[k]
                valid = fewest
                if cutlass.const_expr(self.tokens > 1):
                    # element k lies in column slot 2 (k // 4) + k % 2 (``HeadSoftmax.slot``)
                    _, step = mask
                    valid = fewest + step * self.token_of(HeadSoftmax.slot(k))
                if t >= valid:
                    acc_s[k] = -Float32.inf

    @cute.jit
    def clear_masked_v(self, sK: cute.Tensor, mask, stage: Int32, ctid: Int32):
        """Zero the V columns (the first 512) of the stage's rows that no column attends to, then
        fence them for the O^T MMAs: P is 0 there, but 0 times NaN is NaN.  Thread t takes
        16-byte piece t % 64 of rows t // 64 + 2 j; in the stage a 64-column tile of all 64 rows
        is 8 KiB and a row's 64 columns one swizzled 128-byte line."""
        _, valid = self.valid_rows(mask)
        if valid < BLOCK_N:
            zeros = cute.make_rmem_tensor(cute.make_layout(4), Int32)
            zeros.fill(0)
            elt = self.dtype.width // 8
            pieces = D_V * elt // 16  # a row's V pieces
            per_step = self.consumer_threads // pieces  # rows a step covers
            piece = ctid % pieces
            tile = piece // 8
            base = sK.iterator.toint() + stage * self.kv_bytes + tile * (BLOCK_N * 128)
            for j in cutlass.range_constexpr(BLOCK_N // per_step):
                row = ctid // pieces + per_step * j
                if row >= valid:
                    store_16B_shared(zeros, base + swizzle_128b(row * 128 + (piece % 8) * 16))
            cute.arch.fence_proxy("async.shared", space="cta")
