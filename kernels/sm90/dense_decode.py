"""SM90 dense MLA decode over a paged bf16/fp16 KV cache (split-KV, persistent grid)."""
from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Float32, Int32
from cutlass.cute.nvgpu import warpgroup

from kernels.common.dtypes import dsl_dtype
from kernels.common.softmax import LOG2_E
from kernels.common.mma_sm90 import gemm
from kernels.sm90.mla_consumers import NamedBarrier
from kernels.sm90.split_kv_decode import SplitKvDecodeSm90
from kernels.common.paged_kv import PAGE, kv_smem_layout, make_kv_tma, page_tile
from schedules.decode_plan import BLOCK_M



class DenseDecodeSm90(SplitKvDecodeSm90):
    """Dense MLA decode: O = softmax(Q K^T * scale) V with V = K[:, :512], one kv head at a time.

    Grid: (num_sm_parts, h_kv, ceil(s_q * h_q / h_kv / 64)).  A CTA owns 64 query rows
    (row m = query token m // h_r, head m % h_r of the kv head's h_r = h_q / h_kv) and
    walks the (request, KV block range, split) pieces its part of ``sched_meta`` lists.

    Warp roles (384 threads):
      warpgroup 0  producer: one warp streams whole 64-token pages of K (9 TMA boxes each)
                   through a ``stages``-deep ring, page ids from the block table;
      warpgroups 1, 2  consumers: the split-S / split-O scheme of ``kernels.sm90.mla_consumers``.
    Q (64 x 576) is loaded once per piece by the consumers.

    Pipelines: ``kv`` (PipelineTmaAsync, producer warp -> 8 consumer warps), one page
    per stage; a consumer releases page j after waiting for S of page j + 1 and P V of
    page j together.  Named barriers among the 256 consumer threads: 1 Q reload,
    4 row-max exchange, 5 P (and zeroed V rows) ready, 6 row-sum exchange.
    Tokens past a request's length are masked by selection before the softmax and
    their V rows are zeroed in shared memory before P V, so NaN there never reaches
    an output (0 * NaN would).

    Output: a request computed in one split is finalised here (O / sum, natural-log
    lse; no valid key gives O = 0, lse = +inf); otherwise each split writes fp32 O and
    its base-2 lse to the partial buffers for the combine kernel.
    """

    regs_producer = 24
    regs_consumer = 240

    def __init__(self, dtype: str, d_qk: int = 576):
        super().__init__(dsl_dtype(dtype), d_qk)

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mBlockTable: cute.Tensor, mSeqlens: cute.Tensor,
                 mSchedMeta: cute.Tensor, mSplitOffsets: cute.Tensor, mOut: cute.Tensor, mLse: cute.Tensor,
                 mOAccum: cute.Tensor, mLseAccum: cute.Tensor, softmax_scale: Float32, causal: Int32,
                 heads_per_kv: Int32, stream: cuda.CUstream):
        # mQ (b, s_q, h_q, d); mK (num_blocks, PAGE, h_kv, d); mOut (b, s_q, h_q, 512); mLse (b, h_q, s_q)
        sQ_layout = self.q_smem_layout()
        sK_layout = kv_smem_layout(self.dtype, self.d, self.stages)
        sV_layout = self.v_smem_layout()
        sP_layout = self.p_smem_layout()
        kv_atom, mKTma = make_kv_tma(mK, sK_layout, self.d)

        rows = mQ.shape[1] * heads_per_kv
        grid = [mSchedMeta.shape[0], mK.shape[2], cute.ceil_div(rows, BLOCK_M)]
        self.kernel(mQ, kv_atom, mKTma, mBlockTable, mSeqlens, mSchedMeta, mSplitOffsets,
                    mOut, mLse, mOAccum, mLseAccum, softmax_scale, causal, heads_per_kv,
                    sQ_layout, sK_layout, sV_layout, sP_layout).launch(
            grid=grid, block=[self.threads, 1, 1], smem=self.smem_bytes, stream=stream, min_blocks_per_mp=1)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, kv_atom: cute.CopyAtom, mKTma: cute.Tensor, mBlockTable: cute.Tensor,
               mSeqlens: cute.Tensor, mSchedMeta: cute.Tensor, mSplitOffsets: cute.Tensor, mOut: cute.Tensor,
               mLse: cute.Tensor, mOAccum: cute.Tensor, mLseAccum: cute.Tensor, softmax_scale: Float32,
               causal: Int32, heads_per_kv: Int32,
               sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout, sV_layout: cute.ComposedLayout,
               sP_layout: cute.ComposedLayout):
        # Parameters in layouts.operands.dense_decode_args order; static objects (no parameter) last.
        qk_mma, pv_mma = self.make_mmas()
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg = warp // 4

        smem = cutlass.memory.SmemAllocator()
        sQ, sK, sP, sStat = self.allocate_operands(smem, sQ_layout, sK_layout, sP_layout)
        kv_mbar = smem.allocate_array(cutlass.Int64, 2 * self.stages, byte_alignment=8)

        kv_pipe = pipeline.PipelineTmaAsync.create(
            num_stages=self.stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 1),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.consumer_threads // 32),
            tx_count=self.kv_bytes, barrier_storage=kv_mbar, defer_sync=True)
        kv_producer, _ = kv_pipe.make_participants()
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        part, hk, mblk = cute.arch.block_idx()
        if wg == 0:
            cute.arch.setmaxregister_decrease(self.regs_producer)
            if warp == 0:
                cute.nvgpu.cpasync.prefetch_descriptor(kv_atom)
                self.load(kv_atom, mKTma, sK, mBlockTable, mSeqlens, mSchedMeta, kv_producer, part, hk)
        else:
            cute.arch.setmaxregister_increase(self.regs_consumer)
            self.consume(qk_mma, pv_mma, sQ, sK, sP, sStat, sV_layout, mQ, mBlockTable, mSeqlens, mSchedMeta, mSplitOffsets,
                         mOut, mLse, mOAccum, mLseAccum, kv_pipe, softmax_scale, causal, heads_per_kv,
                         part, hk, mblk, wg - 1, tidx - 128)

    # ------------------------------------------------------------------ producer
    @cute.jit
    def load(self, kv_atom: cute.CopyAtom, mKTma: cute.Tensor, sK: cute.Tensor, mBlockTable: cute.Tensor,
             mSeqlens: cute.Tensor, mSchedMeta: cute.Tensor, kv_producer, part: Int32, hk: Int32):
        begin_req = mSchedMeta[part, 0]
        end_req = mSchedMeta[part, 2]
        for r in cutlass.range(begin_req, end_req + 1, unroll=1):
            lo, hi = self.block_range(self.seqlen_of(mSeqlens, mBlockTable.shape[1], r), mSchedMeta, part, r)
            for blk in cutlass.range(lo, hi, unroll=1):
                # An out-of-range page id is harmless: TMA bounds-checks it and fills zeros.
                page = mBlockTable[r, blk]
                gK = page_tile(mKTma, self.d, hk, page)
                tKs, tKg = cpasync_partition(kv_atom, sK, gK)
                handle = kv_producer.acquire_and_advance()
                cute.copy(kv_atom, tKg, tKs[None, handle.index], tma_bar_ptr=handle.barrier)

    @cute.jit
    def seqlen_of(self, mSeqlens: cute.Tensor, max_blocks: Int32, r: Int32) -> Int32:
        """Request r's length, clamped to what its block table row can hold, so that no
        length, however wrong, makes a kernel read past the table."""
        return cutlass.min(cutlass.max(mSeqlens[r], 0), max_blocks * PAGE)

    @cute.jit
    def consume(self, qk_mma: cute.TiledMma, pv_mma: cute.TiledMma, sQ: cute.Tensor, sK: cute.Tensor,
                sP: cute.Tensor, sStat: cute.Tensor,
                sV_layout: cute.ComposedLayout, mQ: cute.Tensor, mBlockTable: cute.Tensor, mSeqlens: cute.Tensor,
                mSchedMeta: cute.Tensor,
                mSplitOffsets: cute.Tensor, mOut: cute.Tensor, mLse: cute.Tensor, mOAccum: cute.Tensor,
                mLseAccum: cute.Tensor, kv_pipe, softmax_scale: Float32, causal: Int32, heads_per_kv: Int32,
                part: Int32, hk: Int32, mblk: Int32, half: Int32, ctid: Int32):
        wtid = ctid % 128  # thread index inside this consumer warpgroup
        thr_qk, thr_pv, tSrQ, tSrK, tScS, tOrP, tOcO = self.consumer_fragments(qk_mma, pv_mma, sQ, sK, sP, half, wtid)
        scale_log2 = softmax_scale * LOG2_E
        s_q = mQ.shape[1]

        # Explicit consumer states: a page is released one block late, after the P V that
        # reads it has been waited for together with the next block's S, so that P V never
        # blocks the warpgroup before the next S is issued.
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        begin_req = mSchedMeta[part, 0]
        end_req = mSchedMeta[part, 2]
        for r in cutlass.range(begin_req, end_req + 1, unroll=1):
            seqlen = self.seqlen_of(mSeqlens, mBlockTable.shape[1], r)
            lo, hi = self.block_range(seqlen, mSchedMeta, part, r)
            split = Int32(0)
            if r == begin_req:
                split = mSchedMeta[part, 4]
            self.load_q(mQ, sQ, (r, hk, mblk, heads_per_kv), ctid)

            # Key limit of this thread's two rows: the request length, less s_q-1-i for query
            # token i under causal masking.  Computed once per piece: only blocks that reach
            # min_limit need masking at all.
            row_limit = cute.make_rmem_tensor(cute.make_layout(2), Int32)
            for h in cutlass.range_constexpr(2):
                row, _ = tScS[2 * h]
                row_limit[h] = seqlen
                if causal != 0:
                    iq, _ = self.query_of_row(mblk * BLOCK_M + row, hk, heads_per_kv)
                    row_limit[h] = seqlen - (s_q - 1 - iq)
            min_limit = cutlass.min(row_limit[0], row_limit[1])
            acc_o, row_max, row_sum = self.fresh_rows(thr_pv)
            prev = state.clone()
            for blk in cutlass.range(lo, hi, unroll=1):
                kv_pipe.consumer_wait(state)
                stage = state.index
                acc_s = thr_qk.make_fragment_C(thr_qk.partition_shape_C((BLOCK_M, PAGE // 2)))
                warpgroup.fence()
                gemm(qk_mma, acc_s, tSrQ[None, None, None, 0], tSrK[None, None, None, stage], True)
                warpgroup.commit_group()
                # S of this block and P V of the previous one: after this O may be rescaled,
                # the previous page is free and (once both consumers pass the max exchange) sP too.
                warpgroup.wait_group(0)
                if blk > lo:
                    kv_pipe.consumer_release(prev)

                self.mask_and_softmax(acc_s, tScS, acc_o, row_max, row_sum, sStat, blk * PAGE + half * (PAGE // 2),
                                      row_limit, min_limit, scale_log2, half, wtid)
                self.store_p(acc_s, tScS, sP, half)
                valid = seqlen - blk * PAGE
                if valid < PAGE:
                    self.zero_tail_rows(sK, stage, valid, half, wtid)
                # P halves and zeroed V rows (generic stores) are read next by WGMMA.
                cute.arch.fence_proxy("async.shared", space="cta")
                cute.arch.barrier(barrier_id=NamedBarrier.P_READY, number_of_threads=self.consumer_threads)
                sV = self.v_view(sK, sV_layout, stage, half)
                tOrV = thr_pv.make_fragment_B(thr_pv.partition_B(sV))
                warpgroup.fence()
                gemm(pv_mma, acc_o, tOrP[None, None, None, 0], tOrV, False)
                warpgroup.commit_group()
                prev = state.clone()
                state.advance()
            warpgroup.wait_group(0)
            if hi > lo:
                kv_pipe.consumer_release(prev)

            nsplits = mSplitOffsets[r + 1] - mSplitOffsets[r]
            self.epilogue(acc_o, tOcO, row_max, row_sum, sStat, mOut, mLse, mOAccum, mLseAccum, r, hk, mblk,
                          heads_per_kv, half, scale_log2, nsplits, mSplitOffsets[r] + split, wtid)

    @cute.jit
    def mask_and_softmax(self, acc_s: cute.Tensor, tScS: cute.Tensor, acc_o: cute.Tensor, row_max: cute.Tensor,
                         row_sum: cute.Tensor, sStat: cute.Tensor, tok0: Int32, row_limit: cute.Tensor,
                         min_limit: Int32, scale_log2: Float32, half: Int32, wtid: Int32):
        """Mask keys at or past each row's limit, then the shared online softmax.

        Masked logits are replaced (selected) by -inf, never multiplied, so NaN in
        masked positions disappears."""
        # acc fragment order (2 cols, 2 rows, N/8 col groups): element k is in row-half (k // 2) % 2
        if tok0 + PAGE // 2 > min_limit:
            for k in cutlass.range_constexpr(cute.size(acc_s)):
                _, tok = tScS[k]
                if tok0 + tok >= row_limit[(k // 2) % 2]:
                    acc_s[k] = -Float32.inf
        self.online_softmax(acc_s, tScS, acc_o, row_max, row_sum, sStat, scale_log2, half, wtid)

    @cute.jit
    def zero_tail_rows(self, sK: cute.Tensor, stage: Int32, valid: Int32, half: Int32, wtid: Int32):
        """Zero this warpgroup's V columns of the tokens past the request's end (they may be
        NaN); the caller fences and synchronises before WGMMA reads them."""
        for i in cutlass.range(wtid, PAGE * self.v_half, 128):
            t = i // self.v_half
            c = i - t * self.v_half
            if t >= valid:
                sK[t, half * self.v_half + c, stage] = self.dtype(0.0)

@cute.jit
def cpasync_partition(atom: cute.CopyAtom, sK: cute.Tensor, gK: cute.Tensor):
    """TMA partition of one (PAGE, d) page tile against the staged smem ring."""
    return cute.nvgpu.cpasync.tma_partition(atom, 0, cute.make_layout(1),
                                            cute.group_modes(sK, 0, 2), cute.group_modes(gK, 0, 2))
