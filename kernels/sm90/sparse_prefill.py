"""SM90 sparse MLA prefill (``flash_mla_sparse_fwd``): each query token attends to its own
top-k rows of a flat bf16 KV tensor."""
from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.cute.nvgpu.cpasync as cpasync
import cutlass.pipeline as pipeline
from cutlass import Float32, Int32

from kernels.common.paged_kv import kv_smem_layout
from kernels.common.softmax import LN_2, LOG2_E
from kernels.sm90.mla_consumers import BLOCK_M, BLOCK_N, TwoConsumerMlaSm90


class SparsePrefillSm90(TwoConsumerMlaSm90):
    """O = softmax(Q K_sel^T * scale) V_sel for 64 query heads of one query token, where
    K_sel are the kv rows its ``indices`` select (V = their first 512 columns).

    Persistent grid of min(tiles, SMs) CTAs over s_q * h_q / 64 tiles, tile = token * (h_q /
    64) + head block, so both head blocks of a token run at the same time and the second
    finds the gathered rows in L2.  A tile is ceil(n / 64) blocks of 64 selected slots,
    n = min(topk, topk_length[token]); the producer runs ahead into the next tile's blocks
    while the consumers finish a tile's epilogue and load its successor's Q.

    Warp roles (384 threads):
      warpgroup 0  producer: 4 warps gather the 64 selected rows of a block with 16-byte
                   cp.async (warp w: slots 16w .. 16w + 15), straight into the K-major
                   128B-swizzled layout the tensor cores read.  A slot whose index is
                   outside [0, s_kv) or past topk_length is never read from memory: its
                   row is written as zeros and its logit bias is -inf.
      warpgroups 1, 2  consumers: the split-S / split-O scheme of
                   ``kernels.sm90.mla_consumers``; Q (64 x d) is loaded once per CTA.

    Pipeline ``kv`` (PipelineAsync, 128 producer threads -> 256 consumer threads), one
    block per stage: each producer thread waits for its own cp.asyncs, fences them into
    the async proxy (WGMMA reads smem through it) and arrives.  The logit bias of a
    block (0 or -inf per slot) travels with it in ``sBias``.  A consumer releases a
    block as soon as its P V has completed.

    Output: out = O / sum scaled by the sink factor exp(lse) / (exp(lse) + exp(sink)),
    lse and max_logits in natural-log scale of the scaled logits, without the sink.  No
    valid key gives out = 0, lse = +inf, max_logits = -inf.
    """

    producer_threads = 128
    regs_producer = 40
    regs_consumer = 232

    def __init__(self, d_qk: int):
        super().__init__(cutlass.BFloat16, d_qk)
        self.chunks = d_qk * 2 // 16  # 16-byte pieces of one kv row

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mKV: cute.Tensor, mIndices: cute.Tensor, mTopkLength: cute.Tensor,
                 mSink: cute.Tensor, mOut: cute.Tensor, mMaxLogits: cute.Tensor, mLse: cute.Tensor,
                 sm_scale: Float32, has_topk_length: Int32, has_sink: Int32, stream: cuda.CUstream):
        # mQ (s_q, h_q, d); mKV (s_kv, 1, d); mIndices (s_q, 1, topk); mOut (s_q, h_q, 512)
        sK_layout = kv_smem_layout(self.dtype, self.d, self.stages)
        # Persistent: the launcher starts min(tiles, SMs) CTAs (ops.sparse_prefill), each walking
        # tiles bid, bid + grid, ...; this grid only serves the ahead-of-time compile.
        grid = [mQ.shape[0] * (mQ.shape[1] // BLOCK_M), 1, 1]
        self.kernel(mQ, mKV, mIndices, mTopkLength, mSink, mOut, mMaxLogits, mLse, sm_scale, has_topk_length,
                    has_sink, self.q_smem_layout(), sK_layout, self.v_smem_layout(), self.p_smem_layout()).launch(
            grid=grid, block=[self.threads, 1, 1], smem=self.smem_bytes, stream=stream, min_blocks_per_mp=1)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mKV: cute.Tensor, mIndices: cute.Tensor, mTopkLength: cute.Tensor,
               mSink: cute.Tensor, mOut: cute.Tensor, mMaxLogits: cute.Tensor, mLse: cute.Tensor,
               sm_scale: Float32, has_topk_length: Int32, has_sink: Int32,
               sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout, sV_layout: cute.ComposedLayout,
               sP_layout: cute.ComposedLayout):
        # Parameters in layouts.operands.sparse_prefill_args order; static objects last.
        qk_mma, pv_mma = self.make_mmas()
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg = warp // 4

        smem = cutlass.memory.SmemAllocator()
        sQ, sK, sP, sStat = self.allocate_operands(smem, sQ_layout, sK_layout, sP_layout)
        sBias, kv_pipe = self.make_gathered_kv_pipeline(smem, self.producer_threads)

        if wg == 0:
            cute.arch.setmaxregister_decrease(self.regs_producer)
            self.load(mKV, mIndices, mTopkLength, has_topk_length, sK, sK_layout.outer, sBias, kv_pipe,
                      mQ.shape[1] // BLOCK_M, mQ.shape[0], warp, tidx % 32)
        else:
            cute.arch.setmaxregister_increase(self.regs_consumer)
            self.consume(qk_mma, pv_mma, sQ, sK, sP, sStat, sBias, sV_layout, mQ, mIndices, mTopkLength, mSink,
                         mOut, mMaxLogits, mLse, kv_pipe, sm_scale, has_topk_length, has_sink, wg - 1, tidx - 128)

    @cute.jit
    def tile_work(self, tile: Int32, head_blocks: Int32, mIndices: cute.Tensor, mTopkLength: cute.Tensor,
                  has_topk_length: Int32):
        """Tile -> (token, head block, counted slots n, blocks).  Selected slots [0, n) count;
        a topk_length outside [0, topk] is clamped into it."""
        token = tile // head_blocks
        hblk = tile - token * head_blocks
        topk = mIndices.shape[2]
        n = topk
        if has_topk_length != 0:
            n = cutlass.min(cutlass.max(mTopkLength[token], 0), topk)
        return token, hblk, n, (n + BLOCK_N - 1) // BLOCK_N

    # ------------------------------------------------------------------ producer
    @cute.jit
    def load(self, mKV: cute.Tensor, mIndices: cute.Tensor, mTopkLength: cute.Tensor, has_topk_length: Int32,
             sK: cute.Tensor, sK_outer: cute.Layout, sBias: cute.Tensor, kv_pipe, head_blocks: Int32, s_q: Int32,
             warp: Int32, lane: Int32):
        atom = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), self.dtype,
                                   num_bits_per_copy=128)
        zeros = cute.make_rmem_tensor(cute.make_layout(8), self.dtype)
        zeros.fill(0.0)
        # Shared-memory byte address of this lane's first piece of row 16 * warp, before the
        # swizzle; every other piece of the warp's rows is a compile-time offset from it.
        sk_base = sK.iterator.toint()
        lane_off = cute.crd2idx((warp * 16, lane * 8, 0), sK_outer) * 2
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        bid, _, _ = cute.arch.block_idx()
        grid, _, _ = cute.arch.grid_dim()
        for tile in cutlass.range(bid, s_q * head_blocks, grid, unroll=1):
            token, _, n, nblk = self.tile_work(tile, head_blocks, mIndices, mTopkLength, has_topk_length)
            next_row = self.slot_row(mKV, mIndices, token, n, warp * 16 + lane % 16)
            for blk in cutlass.range(nblk, unroll=1):
                # Lane l (and l + 16) owns slot 16 * warp + l % 16 of the block: its kv row, or -1.
                # The next block's row is read while this block's copies are in flight.
                row = next_row
                kv_pipe.producer_acquire(state)
                stage = state.index
                if lane < 16:
                    bias = Float32(0.0)
                    if row < 0:
                        bias = -Float32.inf
                    sBias[warp * 16 + lane, stage] = bias
                # Row by row (the row id is warp-uniform after the shuffle, so the valid/invalid
                # branch never diverges): lane l moves 16-byte pieces l, l + 32 (and l + 64 where the
                # row has 72), so consecutive lanes read consecutive bytes.
                stage_base = sk_base + stage * self.kv_bytes
                for t in cutlass.range_constexpr(16):
                    r = cute.arch.shuffle_sync(row, t)
                    # 128B swizzle: address bits 4-6 ^= bits 7-9, which are t % 8 here (rows of a
                    # 1024-byte-aligned 8-row atom are 128 bytes apart), so one XOR per row.
                    row_base = stage_base + (lane_off ^ ((t % 8) << 4))
                    if r >= 0:
                        gRow = mKV[r, 0, None]
                        for k in cutlass.range_constexpr((self.chunks + 31) // 32):
                            if cutlass.const_expr(32 * k + 32 <= self.chunks):
                                cute.copy(atom, cute.local_tile(gRow, (8,), (lane + 32 * k,)),
                                          self.smem_piece(row_base, sK_outer, t, k))
                            elif lane + 32 * k < self.chunks:
                                cute.copy(atom, cute.local_tile(gRow, (8,), (lane + 32 * k,)),
                                          self.smem_piece(row_base, sK_outer, t, k))
                    else:
                        for k in cutlass.range_constexpr((self.chunks + 31) // 32):
                            if cutlass.const_expr(32 * k + 32 <= self.chunks):
                                cute.autovec_copy(zeros, self.smem_piece(row_base, sK_outer, t, k))
                            elif lane + 32 * k < self.chunks:
                                cute.autovec_copy(zeros, self.smem_piece(row_base, sK_outer, t, k))
                cute.arch.cp_async_commit_group()
                next_row = self.slot_row(mKV, mIndices, token, n, (blk + 1) * BLOCK_N + warp * 16 + lane % 16)
                cute.arch.cp_async_wait_group(0)
                # cp.async and the zero stores are generic-proxy writes; WGMMA reads through the
                # async proxy.
                cute.arch.fence_proxy("async.shared", space="cta")
                kv_pipe.producer_commit(state)
                state.advance()

    @cute.jit
    def smem_piece(self, row_base: Int32, sK_outer: cute.Layout, t: cutlass.Constexpr[int],
                   k: cutlass.Constexpr[int]) -> cute.Tensor:
        """The 8 elements (16 bytes) a lane moves as piece k of the warp's row t."""
        offset = cute.crd2idx((t, 256 * k, 0), sK_outer) * 2
        ptr = cute.make_ptr(self.dtype, row_base + offset, cute.AddressSpace.smem, assumed_align=16)
        return cute.make_tensor(ptr, cute.make_layout(8))

    @cute.jit
    def slot_row(self, mKV: cute.Tensor, mIndices: cute.Tensor, token: Int32, n: Int32, slot: Int32) -> Int32:
        """The kv row selected slot ``slot`` of ``token`` reads, or -1 when it is past the
        counted prefix or its index lies outside [0, s_kv)."""
        row = Int32(-1)
        if slot < n:
            idx = mIndices[token, 0, slot]
            if idx >= 0 and idx < mKV.shape[0]:
                row = idx
        return row

    # ------------------------------------------------------------------ consumers
    @cute.jit
    def consume(self, qk_mma: cute.TiledMma, pv_mma: cute.TiledMma, sQ: cute.Tensor, sK: cute.Tensor,
                sP: cute.Tensor, sStat: cute.Tensor, sBias: cute.Tensor, sV_layout: cute.ComposedLayout,
                mQ: cute.Tensor, mIndices: cute.Tensor, mTopkLength: cute.Tensor, mSink: cute.Tensor,
                mOut: cute.Tensor, mMaxLogits: cute.Tensor, mLse: cute.Tensor, kv_pipe, sm_scale: Float32,
                has_topk_length: Int32, has_sink: Int32, half: Int32, ctid: Int32):
        wtid = ctid % 128
        thr_qk, thr_pv, tSrQ, tSrK, tScS, tOrP, tOcO = self.consumer_fragments(qk_mma, pv_mma, sQ, sK, sP, half, wtid)
        scale_log2 = sm_scale * LOG2_E

        head_blocks = mQ.shape[1] // BLOCK_M
        bid, _, _ = cute.arch.block_idx()
        grid, _, _ = cute.arch.grid_dim()
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        for tile in cutlass.range(bid, mQ.shape[0] * head_blocks, grid, unroll=1):
            token, hblk, _, nblk = self.tile_work(tile, head_blocks, mIndices, mTopkLength, has_topk_length)
            self.load_q(mQ, sQ, (token, hblk), ctid)
            acc_o, row_max, row_sum = self.fresh_rows(thr_pv)
            for blk in cutlass.range(nblk, unroll=1):
                self.attend_gathered_block(qk_mma, pv_mma, tSrQ, tSrK, tScS, tOrP, acc_o, row_max, row_sum, sK, sP,
                                           sStat, sBias, sV_layout, kv_pipe, state, scale_log2, half, wtid)
                state.advance()
            self.epilogue(acc_o, tOcO, row_max, row_sum, sStat, mSink, mOut, mMaxLogits, mLse, sm_scale, scale_log2,
                          has_sink, token, hblk, half, wtid)

    @cute.jit
    def q_row(self, mQ: cute.Tensor, where, row: Int32):
        """Row ``row`` of the CTA's Q tile (``load_q``): where = (token, head block)."""
        token, hblk = where
        return mQ[token, hblk * BLOCK_M + row, None], True

    @cute.jit
    def epilogue(self, acc_o: cute.Tensor, tOcO: cute.Tensor, row_max: cute.Tensor, row_sum: cute.Tensor,
                 sStat: cute.Tensor, mSink: cute.Tensor, mOut: cute.Tensor, mMaxLogits: cute.Tensor,
                 mLse: cute.Tensor, sm_scale: Float32, scale_log2: Float32, has_sink: Int32, token: Int32,
                 hblk: Int32, half: Int32, wtid: Int32):
        neg_inf = -Float32.inf
        lse2, inv = self.finish_rows(row_max, row_sum, tOcO, sStat, scale_log2, half, wtid)
        for h in cutlass.range_constexpr(2):
            row, _ = tOcO[2 * h]
            hq = hblk * BLOCK_M + row
            # exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + 2^(sink*log2e - lse2)); +inf sink
            # gives 0, -inf gives 1.  A row without keys already has factor 0.
            if has_sink != 0 and lse2[h] != neg_inf:
                inv[h] = inv[h] / (1.0 + cute.math.exp2(mSink[hq] * LOG2_E - lse2[h], fastmath=False))
            for j in cutlass.range_constexpr(cute.size(acc_o) // 4):
                k = 4 * j + 2 * h
                _, col = tOcO[k]
                pair = cute.make_rmem_tensor(cute.make_layout(2), self.dtype)
                pair[0] = (acc_o[k] * inv[h]).to(self.dtype)
                pair[1] = (acc_o[k + 1] * inv[h]).to(self.dtype)
                cute.autovec_copy(pair, cute.local_tile(mOut[token, hq, None], (2,), ((half * self.v_half + col) // 2,)))
        # one lane per row writes its statistics (rows of a quad are shared by 4 lanes)
        if half == 0 and wtid % 4 == 0:
            for h in cutlass.range_constexpr(2):
                row, _ = tOcO[2 * h]
                hq = hblk * BLOCK_M + row
                out_lse = Float32.inf
                if lse2[h] != neg_inf:
                    out_lse = lse2[h] * LN_2
                mLse[token, hq] = out_lse
                mMaxLogits[token, hq] = row_max[h] * sm_scale
