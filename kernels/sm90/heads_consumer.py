"""The small-head consumer: attention with the heads on the MMA's N side, one warpgroup.

The 64-row kernels give a query token a whole 64-row block, so at h_q 16 three quarters of their
MMA rows, and of the shared-memory reads that feed them, are padding.  Here the roles of tokens
and heads swap (S^T = K Q^T, O^T = V^T P^T): the 64 tokens of a KV block are the M side, the h_q
heads the N side (N = h_q), so no row is padding.  ``HeadsOnN`` is that consumer, a mixin for a
split-KV decode kernel that brings the producer (``kernels.sm90.sparse_decode_heads``: FP8 tokens
gathered and converted).

One consumer warpgroup does all of a block:
  1. S^T over the whole of d (V32: its last 64 columns, the bf16 RoPE, in a bf16 MMA), then each
     token's mask (``mask_logits``);
  2. the online softmax of every head (a column of S^T: 2 rows per thread, lanes 4, 8 and 16
     apart, then the 4 warps through shared memory);
  3. P^T (N x 64, K-major) into shared memory;
  4. O^T (512 x N) += V^T P^T, V^T read as an MN-major A operand from the K stage.
At N 16 its accumulators are small (O^T 64 floats a thread).  Two consumer warpgroups, each
taking half of d, cost three barriers a block between them (the partial S^T exchange, the head
statistics, P^T ready) and ran every softmax instruction twice; ncu found 24% of their stall
samples at those barriers (perf/results/NOTES.md, session 18).
With a third stage step 4 of a block overlaps steps 1-3 of the next (``blocks_overlapped``).
Shared-memory bytes read per block (N = 16): K 72 KB + Q^T 18 KB for S^T, V 64 KB + P^T 16 KB
for O^T, against about 300 KB read by the 64-row kernel's consumers (perf/results/NOTES.md,
session 11).
"""
from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, Int64
from cutlass.cute.nvgpu import warpgroup
from cutlass.tensor_utils import LayoutEnum

from cute_mla.kernels.common import named_barrier
from cute_mla.kernels.common.mma_sm90 import gemm, swizzle_128b
from cute_mla.kernels.common.named_barrier import NamedBarrier
from cute_mla.kernels.common.softmax import LOG2_E, Softmax, output_lse
from cute_mla.kernels.sm90.mla_consumers import QChunk, QShare
from cute_mla.kernels.sm90.split_kv_decode import DecodePart, QTile
from cute_mla.layouts.constants import BLOCK_N, D_V, SM90_SMEM_BYTES


@dataclass(frozen=True)
class HeadSoftmax(Softmax):
    """The online softmax of every head: the heads are S^T's columns, so a thread keeps one
    statistic per column slot it holds, N/4 of them."""

    @staticmethod
    def slot(k: int) -> int:
        """The column slot (0 .. N/4) of accumulator element k: fragments hold (2 columns,
        2 rows, N/8 column groups); slot 2 g + c is column 8 g + 2 (lane % 4) + c."""
        return (k // 4) * 2 + k % 2


class HeadsOnN:
    """Mixin: the one-warpgroup consumer with the heads on N (see the module docstring), for a
    ``SplitKvDecodeSm90`` with ``threads`` 256 (a producer warpgroup and this one) and
    ``consumer_threads`` 128.  The kernel supplies ``piece(lengths, sched, r, begin_req)`` and
    its keys' mask: ``piece_keys`` (a piece's), ``block_mask`` (a block's, from them),
    ``mask_logits`` (applied to S^T) and ``clear_masked_v`` (masked rows' V, where they may hold
    anything)."""

    # with a third stage, whether block j's O^T MMAs overlap block j + 1's S^T (the warpgroup then
    # holds two stages); False keeps one stage held, so a producer staging ahead has two free
    overlap_blocks = True

    threads = 256  # the producer warpgroup and one consumer warpgroup
    consumer_threads = 128
    # query tokens a CTA takes: its N columns are ``tokens`` tokens' heads, token-major (a dense
    # kernel streams each page once for all of them; gathering kernels take one)
    tokens = 1

    def size_ring(self, heads: int):
        """Set ``heads`` and, from the KV block size, the stages that fit next to Q^T, P^T and
        the scratch.  With a third stage the warpgroup overlaps block j's O^T MMAs with block
        j + 1's S^T and softmax (``blocks_overlapped``): it holds two stages at once, and P^T
        gets two buffers.  (d 512 takes 3, d 576 2.)"""
        self.heads = heads
        elt = self.dtype.width // 8
        # scratch: per-warp head statistics (N heads x 4 warps)
        self.scratch_floats = heads * 4
        fixed = heads * self.d * elt + 4 * self.scratch_floats + 2048
        p_bytes = heads * BLOCK_N * elt
        per_stage = self.kv_bytes + self.stage_side_bytes
        self.stages = (SM90_SMEM_BYTES - fixed - 2 * p_bytes) // per_stage
        assert self.stages >= 2, self.stages
        self.overlap = self.stages >= 3 and self.overlap_blocks
        self.p_buffers = 2 if self.overlap else 1
        self.smem_bytes = fixed + self.p_buffers * p_bytes + self.stages * per_stage

    # ------------------------------------------------------------------ layouts / MMAs
    def q_smem_layout(self):
        # Q^T: the (N heads, d) K-major B operand of S^T
        return sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, (BLOCK_N, self.heads, self.d), self.dtype, 1)

    def v_smem_layout(self):
        # V^T: the first 512 columns of a K stage read as the MN-major (d, token) A operand
        return sm90_utils.make_smem_layout_a(LayoutEnum.COL_MAJOR, (D_V, self.heads, BLOCK_N), self.dtype, 1)

    def p_smem_layout(self):
        # P^T: the (N heads, 64 tokens) K-major B operand of O^T
        return sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, (D_V, self.heads, BLOCK_N), self.dtype,
                                             self.p_buffers)

    def make_mmas(self):
        """(K Q^T over 64 tokens x N heads, V^T P^T over 64 d rows per instruction, K Q^T in
        ``tail_dtype``)."""
        qk_mma, qk_tail_mma = (sm90_utils.make_trivial_tiled_mma(
            t, t, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.K,
            Float32, (1, 1, 1), (BLOCK_N, self.heads)) for t in (self.dtype, self.tail_dtype))
        pv_mma = sm90_utils.make_trivial_tiled_mma(
            self.dtype, self.dtype, cute.nvgpu.OperandMajorMode.MN, cute.nvgpu.OperandMajorMode.K,
            Float32, (1, 1, 1), (64, self.heads))
        return qk_mma, pv_mma, qk_tail_mma

    @cute.jit
    def allocate_operands(self, smem, sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout,
                          sP_layout: cute.ComposedLayout = None):
        """sQ^T, the KV ring, sP^T and the scratch (as ``sStat``, flat float32)."""
        sQ = smem.allocate_tensor(self.dtype, sQ_layout.outer, byte_alignment=1024, swizzle=sQ_layout.inner)
        sK = smem.allocate_tensor(self.dtype, sK_layout.outer, byte_alignment=1024, swizzle=sK_layout.inner)
        sP = smem.allocate_tensor(self.dtype, sP_layout.outer, byte_alignment=1024, swizzle=sP_layout.inner)
        sStat = smem.allocate_tensor(Float32, cute.make_layout(self.scratch_floats), byte_alignment=16)
        return sQ, sK, sP, sStat

    @cute.jit
    def vt_view(self, sK: cute.Tensor, sV_layout: cute.ComposedLayout, stage: Int32) -> cute.Tensor:
        """(512, 64) MN-major A view of the V columns of K stage ``stage``."""
        base = sK[None, None, stage].iterator
        return cute.make_tensor(cute.recast_ptr(base, sV_layout.inner), cute.slice_(sV_layout.outer, (None, None, 0)))

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def column_of(cs: int, lane: Int32) -> Int32:
        """The column (head) of this thread's column slot ``cs`` (``HeadSoftmax.slot``)."""
        return 8 * (cs // 2) + 2 * (lane % 4) + cs % 2

    def token_of(self, cs: int) -> int:
        """Which of the CTA's ``tokens`` query tokens column slot ``cs`` belongs to (a token's
        heads are a multiple of 8 columns, so every lane's slot cs lies in the same one)."""
        return 8 * (cs // 2) // (self.heads // self.tokens)

    def column_row(self, iq, cs: int, n):
        """(query token, head) of column n, slot ``cs``, in the CTA of token group ``iq``."""
        if cutlass.const_expr(self.tokens == 1):
            return iq, n
        t = self.token_of(cs)
        return iq * self.tokens + t, n - t * (self.heads // self.tokens)

    @cute.jit
    def head_reduce(self, vals: cute.Tensor, sRed: cute.Tensor, warp: Int32, lane: Int32,
                    is_max: cutlass.Constexpr[bool]):
        """This thread's per-column values (over its 2 rows) -> the value over the block's 64
        rows: lanes 4, 8 and 16 apart hold the same columns, then the 4 warps meet in ``sRed``
        (N heads, 4 warps)."""
        for cs in cutlass.range_constexpr(self.heads // 4):
            v = vals[cs]
            for off in cutlass.range_constexpr(3):
                o = cute.arch.shuffle_sync_bfly(v, offset=4 << off)
                if cutlass.const_expr(is_max):
                    v = cute.arch.fmax(v, o)
                else:
                    v = v + o
            vals[cs] = v
            if lane < 4:
                sRed[self.column_of(cs, lane), warp] = v
        named_barrier.sync(NamedBarrier.HEAD_STAT, self.consumer_threads)
        for cs in cutlass.range_constexpr(self.heads // 4):
            n = self.column_of(cs, lane)
            v = sRed[n, 0]
            for w in cutlass.range_constexpr(1, 4):
                if cutlass.const_expr(is_max):
                    v = cute.arch.fmax(v, sRed[n, w])
                else:
                    v = v + sRed[n, w]
            vals[cs] = v

    @cute.jit
    def q_share(self, sQ: cute.Tensor, ctid: Int32) -> QShare:
        """This thread's share of Q^T (head n's 576 (512) values into row n of sQ^T): 128 / N
        threads share a row; thread t takes its row's 16-byte pieces p0 + (128 / N) j, p0 =
        t % (128 / N).  Piece c of row n lies in 64-column tile c // 8 (all N rows, each row
        one 128-byte line), piece c % 8 of the line.  Where 128 / N is a multiple of 8, step j
        adds (128 / N) / 8 whole tiles; at N 32 (4 threads a row) steps alternate between
        the two halves of a line (bit 6 of the swizzled address, as ``TwoConsumerMlaSm90.q_share``)
        and every second one adds a tile.  Either way each of the thread's global and shared
        addresses is one of two registers plus a constant.  The last step's pieces may lie
        past the row's end."""
        per_row = self.d * 2 // 16
        share = self.consumer_threads // self.heads
        steps = (per_row + share - 1) // share
        tile = self.heads * 128  # bytes of one 64-column tile of all N rows (a multiple of 1024)
        # a step's pieces all lie on one side of tail_start, and a step moves whole swizzle atoms
        assert self.tail_start == self.d or self.tail_start // 8 % share == 0
        assert (share % 8 == 0 or share == 4) and tile % 1024 == 0
        n = ctid // share
        p0 = ctid - n * share
        dst0 = sQ.iterator.toint() + swizzle_128b(((p0 // 8) * self.heads + n) * 128 + (p0 % 8) * 16)
        if cutlass.const_expr(share % 8 == 0):
            dsts = [dst0 + (share // 8) * j * tile for j in range(steps)]
        else:
            dsts = [(dst0, dst0 ^ 64)[j % 2] + (j // 2) * tile for j in range(steps)]
        return QShare(n, Int64(16 * p0),
                      [QChunk(16 * share * j, dsts[j],
                              True if (j + 1) * share <= per_row else p0 + share * j < per_row,
                              min(share * (j + 1), per_row) * 8 <= self.tail_start)
                       for j in range(steps)])

    def q_row(self, mQ: cute.Tensor, where: QTile, row: Int32):
        """Row ``row`` of the CTA's Q^T tile: head ``row`` of query token ``where.row_block``
        (a query token a row block); every head exists."""
        return mQ[where.request, where.row_block, row, None], True

    # ------------------------------------------------------------------ consumers
    @cute.jit
    def consume(self, qk_mma: cute.TiledMma, pv_mma: cute.TiledMma, qk_tail_mma: cute.TiledMma, sQ: cute.Tensor,
                sK: cute.Tensor, sP: cute.Tensor, sStat: cute.Tensor, sMask: cute.Tensor,
                sV_layout: cute.ComposedLayout, mQ: cute.Tensor, lengths, mSink: cute.Tensor,
                sched: DecodePart, mOut: cute.Tensor, mLse: cute.Tensor, mOAccum: cute.Tensor, mLseAccum: cute.Tensor,
                kv_pipe, softmax_scale: Float32, has_sink: Int32, mblk: Int32, half: Int32, ctid: Int32):
        """The one consumer warpgroup (``half`` is always 0 here).  The kernel's MMAs only
        partition the operands; ``issue_st`` and ``issue_pv`` make the ones they issue."""
        N = self.heads
        warp = ctid // 32
        lane = ctid % 32
        thr_qk = qk_mma.get_slice(ctid)
        thr_pv = pv_mma.get_slice(ctid)
        tSrK = thr_qk.make_fragment_A(thr_qk.partition_A(sK))  # (MMA, 1, d/16, stages)
        tSrQ = thr_qk.make_fragment_B(thr_qk.partition_B(sQ))  # (MMA, 1, d/16, 1)
        tScS = thr_qk.partition_C(cute.make_identity_tensor((BLOCK_N, N)))  # (token, head)
        tOrP = thr_pv.make_fragment_B(thr_pv.partition_B(sP))  # (MMA, 1, 64/16, 1)
        tOcO = thr_pv.partition_C(cute.make_identity_tensor((D_V, N)))  # (d, head)
        sRed = cute.make_tensor(sStat.iterator, cute.make_layout((N, 4)))
        scale_log2 = softmax_scale * LOG2_E
        iq = mblk  # one row block per query token
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        begin_req = sched.begin_req()
        end_req = sched.end_req()
        # Q^T comes by cp.async, the next piece's during this piece's epilogue (a load per piece
        # at its start paid a global latency there; session 20)
        share = self.q_share(sQ, ctid)
        if begin_req <= end_req:
            self.fetch_q(mQ, QTile(begin_req, 0, iq, N), share, False)
        for r in cutlass.range(begin_req, end_req + 1, unroll=1):
            lo, hi, split = self.piece(lengths, sched, r, begin_req)
            # the piece's split count and partial row, read before its blocks: loaded after them,
            # the epilogue waited a global load for them (ncu, H100, session 28)
            nsplits = sched.splits(r)
            split_row = sched.split_row(r, split)
            keys = self.piece_keys(lengths, sMask, r, iq)
            self.finish_q(share, mQ.element_type)
            acc_o = thr_pv.make_fragment_C(thr_pv.partition_shape_C((D_V, N)))
            acc_o.fill(0.0)
            softmax = HeadSoftmax.create(N // 4, scale_log2)
            if cutlass.const_expr(self.overlap):
                # rebound: the DSL carries the state out of the callee's branch as a new object
                state = self.blocks_overlapped(tSrK, tSrQ, tScS, tOrP, acc_o, softmax, sK, sP, sRed, keys,
                                               sV_layout, kv_pipe, state, lo, hi, warp, lane, ctid)
            else:
                for blk in cutlass.range(lo, hi, unroll=1):
                    self.attend_block(tSrK, tSrQ, tScS, tOrP, acc_o, softmax, sK, sP, sRed,
                                      self.block_mask(keys, blk), sV_layout, kv_pipe, state, warp, lane, ctid)
                    state.advance()
            # every warp is past its last MMA once the head sums are reduced: sQ^T is free
            self.head_reduce(softmax.row_sum, sRed, warp, lane, False)
            if r < end_req:
                self.fetch_q(mQ, QTile(r + 1, 0, iq, N), share, False)
            self.epilogue_t(acc_o, tOcO, softmax, sRed, mOut, mLse, mOAccum, mLseAccum, r, iq, warp, lane,
                            nsplits, split_row, mSink, has_sink)

    @cute.jit
    def issue_st(self, tSrK, tSrQ, stage: Int32, ctid: Int32) -> cute.Tensor:
        """Issue S^T = K Q^T of the block in ``stage`` (one commit group); returns its accumulator.
        The MMAs are made here, at each use: their accumulate flag, set inside one loop or
        branch and read in another, would not dominate its use."""
        qk_mma, _, qk_tail_mma = self.make_mmas()
        thr_qk = qk_mma.get_slice(ctid)
        acc_s = thr_qk.make_fragment_C(thr_qk.partition_shape_C((BLOCK_N, self.heads)))
        k_all = self.d // 16
        n_main = self.tail_start // 16
        tA = tSrK[None, None, None, stage]
        tB = tSrQ[None, None, None, 0]
        warpgroup.fence()
        gemm(qk_mma, acc_s, tA, tB, True, (0, n_main))
        if cutlass.const_expr(n_main < k_all):
            gemm(qk_tail_mma, acc_s, tA, tB, False, (n_main, k_all))
        warpgroup.commit_group()
        return acc_s

    @cute.jit
    def issue_pv(self, tOrP, acc_o, sK, sV_layout, stage: Int32, buf: Int32, ctid: Int32):
        """Issue O^T += V^T P^T of the block in ``stage``, P^T from buffer ``buf`` (one commit group;
        the MMA made here, as in ``issue_st``)."""
        _, pv_mma, _ = self.make_mmas()
        thr_pv = pv_mma.get_slice(ctid)
        tOrV = thr_pv.make_fragment_A(thr_pv.partition_A(self.vt_view(sK, sV_layout, stage)))
        warpgroup.fence()
        gemm(pv_mma, acc_o, tOrV, tOrP[None, None, None, buf], False)
        warpgroup.commit_group()

    @cute.jit
    def softmax_to_p(self, acc_s, tScS, softmax: HeadSoftmax, sP, sRed, mask, stage: Int32, buf: Int32,
                     warp: Int32, lane: Int32) -> cute.Tensor:
        """S^T (finished), masked (``mask_logits``) -> the block's online softmax of every head (a
        column), in base 2 -> P^T into buffer ``buf``, fenced for the MMAs.  Returns each
        head's factor for O^T; the caller syncs ``P_READY`` before P^T is read."""
        N = self.heads
        self.mask_logits(acc_s, tScS, mask, stage)
        blk_max = cute.make_rmem_tensor(cute.make_layout(N // 4), Float32)
        blk_max.fill(-Float32.inf)
        softmax.block_max(acc_s, blk_max)
        self.head_reduce(blk_max, sRed, warp, lane, True)
        alpha = softmax.online_softmax(acc_s, blk_max)
        for k in cutlass.range_constexpr(cute.size(acc_s)):
            t, n = tScS[k]
            sP[n, t, buf] = acc_s[k].to(self.dtype)
        cute.arch.fence_proxy("async.shared", space="cta")
        return alpha

    def piece_keys(self, lengths, sMask, r: Int32, iq: Int32):
        """What masks the keys of this CTA's piece of request r (query token ``iq``): by default
        ``sMask``, the stages' logit biases a gathering producer writes."""
        return sMask

    def block_mask(self, keys, blk: Int32):
        """The mask of block ``blk`` of the piece (``mask_logits``, ``clear_masked_v``): by
        default the piece's keys as they are."""
        return keys

    def clear_masked_v(self, sK: cute.Tensor, mask, stage: Int32, ctid: Int32):
        """Before O^T reads the stage: a kernel whose masked tokens' rows may hold anything (NaN
        times a zero P is NaN) zeroes their V columns here, fenced; the gathered kernels never
        load such a row (its zeros are stored), so by default nothing."""

    @cute.jit
    def attend_block(self, tSrK, tSrQ, tScS, tOrP, acc_o, softmax: HeadSoftmax, sK, sP, sRed, mask, sV_layout,
                     kv_pipe, state, warp: Int32, lane: Int32, ctid: Int32):
        """One block, start to end: S^T, softmax, P^T, O^T (two KV stages)."""
        kv_pipe.consumer_wait(state)
        stage = state.index
        acc_s = self.issue_st(tSrK, tSrQ, stage, ctid)
        warpgroup.wait_group(0)
        alpha = self.softmax_to_p(acc_s, tScS, softmax, sP, sRed, mask, stage, 0, warp, lane)
        self.clear_masked_v(sK, mask, stage, ctid)
        softmax.rescale_o(acc_o, alpha, skip_settled=False)
        named_barrier.sync(NamedBarrier.P_READY, self.consumer_threads)
        self.issue_pv(tOrP, acc_o, sK, sV_layout, stage, 0, ctid)
        warpgroup.wait_group(0)
        kv_pipe.consumer_release(state)

    @cute.jit
    def blocks_overlapped(self, tSrK, tSrQ, tScS, tOrP, acc_o, softmax: HeadSoftmax, sK, sP, sRed, keys, sV_layout,
                          kv_pipe, state, lo: Int32, hi: Int32, warp: Int32, lane: Int32, ctid: Int32):
        """Blocks [lo, hi) with block j's O^T MMAs in flight while block j + 1's S^T is
        finished and its softmax runs (three or more KV stages: the warpgroup holds blocks j
        and j + 1).  P^T alternates between two buffers; O^T takes block j + 1's factor once
        block j's MMAs are done.  Returns the pipeline state past block hi - 1."""
        if lo < hi:
            kv_pipe.consumer_wait(state)
            acc_s = self.issue_st(tSrK, tSrQ, state.index, ctid)
            warpgroup.wait_group(0)
            mask = self.block_mask(keys, lo)
            self.softmax_to_p(acc_s, tScS, softmax, sP, sRed, mask, state.index, 0, warp, lane)  # O^T is 0
            self.clear_masked_v(sK, mask, state.index, ctid)
            named_barrier.sync(NamedBarrier.P_READY, self.consumer_threads)
            for blk in cutlass.range(lo + 1, hi, unroll=1):
                nxt = state.clone()
                nxt.advance()
                kv_pipe.consumer_wait(nxt)
                acc_n = self.issue_st(tSrK, tSrQ, nxt.index, ctid)
                self.issue_pv(tOrP, acc_o, sK, sV_layout, state.index, (blk - lo - 1) % 2, ctid)
                warpgroup.wait_group(1)
                mask = self.block_mask(keys, blk)
                alpha = self.softmax_to_p(acc_n, tScS, softmax, sP, sRed, mask, nxt.index, (blk - lo) % 2, warp,
                                          lane)
                self.clear_masked_v(sK, mask, nxt.index, ctid)  # block j's O^T reads the other stage
                warpgroup.wait_group(0)
                kv_pipe.consumer_release(state)
                state.advance()
                softmax.rescale_o(acc_o, alpha, skip_settled=False)
                named_barrier.sync(NamedBarrier.P_READY, self.consumer_threads)
            self.issue_pv(tOrP, acc_o, sK, sV_layout, state.index, (hi - lo - 1) % 2, ctid)
            warpgroup.wait_group(0)
            kv_pipe.consumer_release(state)
            state.advance()
        return state

    @cute.jit
    def store_t(self, acc_o, tOcO, inv, head0: cute.Tensor, h_q: Int32, ctid: Int32):
        """O^T times each head's factor into the (heads, 512) rows that begin at ``head0`` (head 0's
        row of a contiguous output: the API takes only contiguous ``out``, ``api._check_out``, and
        the partials are the plan's own; several tokens' rows follow one another there too), in
        their element type, 4 bytes or 2 a lane; columns from ``h_q`` on are not stored.  The rows
        are viewed with static strides and partitioned as the accumulator, so every store is one
        base register plus a constant."""
        _, pv_mma, _ = self.make_mmas()
        gOT = cute.make_tensor(head0.iterator, cute.make_layout((D_V, self.heads), stride=(1, D_V)))
        tOgO = pv_mma.get_slice(ctid).partition_C(gOT)
        n_o = cute.size(acc_o, mode=[0])
        for k in cutlass.range_constexpr(cute.size(acc_o)):
            _, n = tOcO[k]
            if n < h_q:
                tOgO[k] = (acc_o[k] * inv[HeadSoftmax.slot(k % n_o)]).to(tOgO.element_type)

    @cute.jit
    def epilogue_t(self, acc_o, tOcO, softmax: HeadSoftmax, sRed, mOut, mLse, mOAccum, mLseAccum, r: Int32,
                   iq: Int32, warp: Int32, lane: Int32, nsplits: Int32, split_row: Int32, mSink: cute.Tensor,
                   has_sink: Int32):
        """As ``SplitKvDecodeSm90.epilogue``, from O^T, the head sums already reduced
        (``head_reduce``): finalise (one split: O / sum, the sink, natural-log lse) or write the
        split's partial O and base-2 lse."""
        N = self.heads
        h_q = mOut.shape[2]
        # the columns that are output rows: h_q (N may pad it), or every column of several tokens
        columns = h_q
        if cutlass.const_expr(self.tokens > 1):
            columns = N
        # a finalised column is scaled by its head's sink (a column past h_q reads the last head's);
        # a kernel without sinks passes mSink None
        sink_of = None
        if cutlass.const_expr(mSink is not None):
            heads = [cutlass.min(self.column_of(cs, lane), h_q - 1) for cs in range(N // 4)]
            sink_of = lambda cs: mSink[heads[cs]]  # noqa: E731
        lse2, inv = softmax.finalize(sink_of, lambda: (nsplits == 1) & (has_sink != 0))
        # One test of the split count for all the stores (``store_t``: no branch an element).  With
        # that test and the head's inside every element's store, and each element's address worked
        # out anew, this epilogue took 28% of the MODEL1 b 32 s_q 1 h_q 16 kernel's stall samples
        # (about 15 instructions an element; ncu, H100, session 28).
        ctid = warp * 32 + lane
        token0, _ = self.column_row(iq, 0, 0)  # the first token's head 0 row; the others follow it
        if nsplits == 1:
            self.store_t(acc_o, tOcO, inv, mOut[r, token0, 0, None], columns, ctid)
        else:
            self.store_t(acc_o, tOcO, inv, mOAccum[split_row, token0, 0, None], columns, ctid)
        if (warp == 0) & (lane < 4):
            for cs in cutlass.range_constexpr(N // 4):
                n = self.column_of(cs, lane)
                if n < columns:
                    token, head = self.column_row(iq, cs, n)
                    if nsplits == 1:
                        mLse[r, head, token] = output_lse(lse2[cs])
                    else:
                        mLseAccum[split_row, token, head] = lse2[cs]
