"""SM90 dense MLA decode over a paged bf16/fp16 KV cache (split-KV, persistent grid)."""
from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.cute.nvgpu.cpasync as cpasync
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32
from cutlass.cute.nvgpu import warpgroup

from kernels.common.dtypes import dsl_dtype
from kernels.common.mma_sm90 import gemm
from kernels.common.paged_kv import (COLUMN_TILE, PAGE, kv_smem_layout, make_kv_column_tma,
                                     page_column_tile)
from kernels.common.softmax import LOG2_E
from kernels.sm90.mla_consumers import BLOCK_M, NamedBarrier
from kernels.sm90.split_kv_decode import SplitKvDecodeSm90
from layouts.operands import D_V

TILES = 9  # 64-column tiles of a 576-wide page
P_TILE = 8  # the RoPE tile: read by S only, so it holds the block's P once S is done
V_LEFT = (0, 1, 2, 3)  # V columns 0..255 (O_L, warpgroup 0)
V_RIGHT = (4, 5, 6, 7)  # V columns 256..511 (O_R, warpgroup 1)


class SeesawBarrier:
    """Named barriers between the two warpgroups (ids after ``NamedBarrier``'s)."""

    MAX_0 = 7  # warpgroup 0 published its row maxima after S of the even block
    MAX_1 = 8  # warpgroup 1 published the pair's row maxima
    P_0 = 9  # the even block's P (at the pair's maxima) is in its page's P tile
    P_1 = 10  # the odd block's P is in its page's P tile
    TAIL = 11  # + warpgroup: its zeroed V rows are written (warpgroup-local)


class DenseDecodeSm90(SplitKvDecodeSm90):
    """Dense MLA decode: O = softmax(Q K^T * scale) V with V = K[:, :512], one kv head at a time.

    Grid: (num_sm_parts, h_kv, ceil(s_q * h_q / h_kv / 64)).  A CTA owns 64 query rows
    (row m = query token m // h_r, head m % h_r of the kv head's h_r = h_q / h_kv) and
    walks the (request, KV block range, split) pieces its part of ``sched_meta`` lists.

    Two warpgroups, no producer warpgroup ("seesaw", after FlashMLA's public write-up).
    Warpgroup w owns O columns [256 w, 256 w + 256) and page buffer w of two.  Blocks
    go in pairs (even block in buffer 0, odd in buffer 1); per pair:

      wg 0: S0 = Q K0^T (64 x 64); m0 = max(m, rowmax S0) -> smem; P0; O_L = O_L * a + P0 V0_L
            (P0 from registers); once wg 1 has published m1: P0 * exp(m0 - m1) -> page 0's
            P tile; O_L *= exp(m0 - m1); O_L += P1 V1_L (P1 from page 1's P tile)
      wg 1: S1 = Q K1^T; m1 = max(m0, rowmax S1) -> smem; P1 -> page 1's P tile;
            O_R = O_R * a' + P0' V0_R (page 0's P tile) + P1 V1_R (P1 from registers)

    so one warpgroup's softmax runs under the other's tensor-core work, and each S is a
    64 x 64 GEMM by one warpgroup (Q is read from shared memory once per block, not
    twice).  The running sum stays per warpgroup until the epilogue adds the two.

    Loads: every page arrives as 9 column tiles (TMA, one mbarrier each).  A tile is
    reloaded, with the block two ahead (or the next piece's first blocks), by the
    warpgroup that last reads it, right after that read: wg 0 reloads V_L tiles 0-3 of
    both buffers and the P tile of buffer 1, wg 1 the V_R tiles 4-7 of both and the P
    tile of buffer 0.  A page's P tile is free once S of it is done, because V reads
    only columns 0..511.  S waits tile by tile, so it starts on the tiles freed first.

    Named barriers: ``NamedBarrier`` Q_RELOAD / ROW_SUM among all 256 threads,
    ``SeesawBarrier`` MAX_0 / MAX_1 / P_0 / P_1 (one warpgroup arrives, the other
    syncs) and TAIL (warpgroup-local).  Tokens past a request's length are masked by
    selection before the softmax and their V rows are zeroed in shared memory before
    P V, so NaN there never reaches an output.

    Output: a request computed in one split is finalised here (O / sum, natural-log
    lse; no valid key gives O = 0, lse = +inf); otherwise each split writes fp32 O and
    its base-2 lse to the partial buffers for the combine kernel.
    """

    threads = 256
    consumer_threads = 256
    regs_producer = 0  # no producer warpgroup
    regs_consumer = 255

    def __init__(self, dtype: str, d_qk: int = 576):
        super().__init__(dsl_dtype(dtype), d_qk)
        assert d_qk == TILES * COLUMN_TILE and D_V == 2 * len(V_LEFT) * COLUMN_TILE
        self.tile_elems = PAGE * COLUMN_TILE
        self.tile_bytes = self.tile_elems * self.dtype.width // 8
        # sQ + two pages + (row statistics, maxima, 18 mbarriers); no separate P buffer.
        self.smem_bytes = self.q_bytes + 2 * self.kv_bytes + 2048
        # Tiles each warpgroup reloads in each buffer (see the class docstring).
        self.reload_tiles = ((V_LEFT, V_RIGHT + (P_TILE,)), (V_LEFT + (P_TILE,), V_RIGHT))  # [buffer][warpgroup]

    def make_seesaw_mmas(self):
        """(S = Q K^T, 64 x 64; O_half += P V with P from registers; same with P from smem)."""
        major_k, major_mn = cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN
        qk = sm90_utils.make_trivial_tiled_mma(self.dtype, self.dtype, major_k, major_k, Float32, (1, 1, 1),
                                               (BLOCK_M, PAGE))
        pv_reg = sm90_utils.make_trivial_tiled_mma(self.dtype, self.dtype, major_k, major_mn, Float32, (1, 1, 1),
                                                   (BLOCK_M, self.v_half), warpgroup.OperandSource.RMEM)
        pv_smem = sm90_utils.make_trivial_tiled_mma(self.dtype, self.dtype, major_k, major_mn, Float32, (1, 1, 1),
                                                    (BLOCK_M, self.v_half))
        return qk, pv_reg, pv_smem

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mBlockTable: cute.Tensor, mSeqlens: cute.Tensor,
                 mSchedMeta: cute.Tensor, mSplitOffsets: cute.Tensor, mOut: cute.Tensor, mLse: cute.Tensor,
                 mOAccum: cute.Tensor, mLseAccum: cute.Tensor, softmax_scale: Float32, causal: Int32,
                 heads_per_kv: Int32, stream: cuda.CUstream):
        # mQ (b, s_q, h_q, d); mK (num_blocks, PAGE, h_kv, d); mOut (b, s_q, h_q, 512); mLse (b, h_q, s_q)
        kv_atom, mKTma = make_kv_column_tma(mK, self.dtype)
        rows = mQ.shape[1] * heads_per_kv
        grid = [mSchedMeta.shape[0], mK.shape[2], cute.ceil_div(rows, BLOCK_M)]
        self.kernel(mQ, kv_atom, mKTma, mBlockTable, mSeqlens, mSchedMeta, mSplitOffsets,
                    mOut, mLse, mOAccum, mLseAccum, softmax_scale, causal, heads_per_kv,
                    self.q_smem_layout(), kv_smem_layout(self.dtype, self.d, 2), self.v_smem_layout(),
                    self.p_smem_layout()).launch(
            grid=grid, block=[self.threads, 1, 1], smem=self.smem_bytes, stream=stream, min_blocks_per_mp=1)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, kv_atom: cute.CopyAtom, mKTma: cute.Tensor, mBlockTable: cute.Tensor,
               mSeqlens: cute.Tensor, mSchedMeta: cute.Tensor, mSplitOffsets: cute.Tensor, mOut: cute.Tensor,
               mLse: cute.Tensor, mOAccum: cute.Tensor, mLseAccum: cute.Tensor, softmax_scale: Float32,
               causal: Int32, heads_per_kv: Int32,
               sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout, sV_layout: cute.ComposedLayout,
               sP_layout: cute.ComposedLayout):
        # Parameters in layouts.operands.dense_decode_args order; static objects (no parameter) last.
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())

        smem = cutlass.memory.SmemAllocator()
        sQ = smem.allocate_tensor(self.dtype, sQ_layout.outer, byte_alignment=1024, swizzle=sQ_layout.inner)
        sK = smem.allocate_tensor(self.dtype, sK_layout.outer, byte_alignment=1024, swizzle=sK_layout.inner)
        sStat = smem.allocate_tensor(Float32, cute.make_layout((2, BLOCK_M)), byte_alignment=16)
        sMax = smem.allocate_tensor(Float32, cute.make_layout((2, BLOCK_M)), byte_alignment=16)
        bars = smem.allocate_array(cutlass.Int64, 2 * TILES, byte_alignment=8)  # [buffer * TILES + tile]
        if tidx == 0:
            for i in cutlass.range_constexpr(2 * TILES):
                cute.arch.mbarrier_init(bars + i, 1)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()
        if warp == 0:
            cpasync.prefetch_descriptor(kv_atom)

        loads = (kv_atom, mKTma, mBlockTable, sK, bars)
        if warp < 4:
            self.consume(sQ, sK, sStat, sMax, sV_layout, sP_layout, loads, mQ, mSeqlens, mSchedMeta, mSplitOffsets,
                         mOut, mLse, mOAccum, mLseAccum, softmax_scale, causal, heads_per_kv, tidx, 0)
        else:
            self.consume(sQ, sK, sStat, sMax, sV_layout, sP_layout, loads, mQ, mSeqlens, mSchedMeta, mSplitOffsets,
                         mOut, mLse, mOAccum, mLseAccum, softmax_scale, causal, heads_per_kv, tidx, 1)

    # ------------------------------------------------------------------ loads
    @cute.jit
    def seqlen_of(self, mSeqlens: cute.Tensor, max_blocks: Int32, r: Int32) -> Int32:
        """Request r's length, clamped to what its block table row can hold, so that no
        length, however wrong, makes a kernel read past the table."""
        return cutlass.min(cutlass.max(mSeqlens[r], 0), max_blocks * PAGE)

    @cute.jit
    def load_tiles(self, loads, hk: Int32, r: Int32, blk: Int32, buf: cutlass.Constexpr[int],
                   tiles: cutlass.Constexpr):
        """One warp: TMA of ``tiles`` of block ``blk`` of request r into buffer ``buf``,
        each tile on its own mbarrier.  An out-of-range page id is harmless: TMA
        bounds-checks it, fills zeros and still completes the bytes."""
        kv_atom, mKTma, mBlockTable, sK, bars = loads
        page = mBlockTable[r, blk]
        sTiles = cute.flat_divide(sK, (PAGE, COLUMN_TILE))  # (PAGE, 64, 1, TILES, 2)
        for t in cutlass.range_constexpr(len(tiles)):
            tile = tiles[t]
            sT = sTiles[None, None, 0, tile, buf]
            gT = page_column_tile(mKTma, hk, page, tile)
            tKs, tKg = cpasync.tma_partition(kv_atom, 0, cute.make_layout(1), cute.group_modes(sT, 0, 2),
                                             cute.group_modes(gT, 0, 2))
            bar = bars + (buf * TILES + tile)
            with cute.arch.elect_one():
                cute.arch.mbarrier_arrive_and_expect_tx(bar, self.tile_bytes)
            cute.copy(kv_atom, tKg, tKs, tma_bar_ptr=bar)

    @cute.jit
    def next_blocks(self, r: Int32, a: Int32, hi: Int32, nxt):
        """Where the buffers go after the pair starting at block a of request r: (request,
        block, exists) for buffer 0 and for buffer 1 -- the next pair of this piece, or the
        first pair of the next piece ``nxt`` = (request, lo, hi, exists) once this piece ends."""
        nr, nlo, nhi, nok = nxt
        r0, b0, ok0 = r, a + 2, a + 2 < hi
        r1, b1, ok1 = r, a + 3, a + 3 < hi
        if a + 2 >= hi:
            r0, b0, ok0 = nr, nlo, nok
            r1, b1, ok1 = nr, nlo + 1, nok & (nlo + 1 < nhi)
        return (r0, b0, ok0), (r1, b1, ok1)

    @cute.jit
    def reload(self, loads, hk: Int32, target, buf: cutlass.Constexpr[int], wg: cutlass.Constexpr[int],
               wtid: Int32):
        r, blk, ok = target
        # The first warp of the warpgroup, converged: the TMA copy elects its own lane.
        if ok & (wtid < 32):
            self.load_tiles(loads, hk, r, blk, buf, self.reload_tiles[buf][wg])

    # ------------------------------------------------------------------ per-pair steps
    @cute.jit
    def s_gemm(self, qk_mma: cute.TiledMma, acc_s: cute.Tensor, tSrQ: cute.Tensor, tSrK: cute.Tensor, bars,
               buf: cutlass.Constexpr[int], phase: Int32):
        """S = Q K^T of the block in ``buf``, issued tile by tile as the tiles land."""
        for t in cutlass.range_constexpr(TILES):
            cute.arch.mbarrier_wait(bars + (buf * TILES + t), phase)
            warpgroup.fence()
            for kk in cutlass.range_constexpr(COLUMN_TILE // 16):
                k = t * (COLUMN_TILE // 16) + kk
                qk_mma.set(warpgroup.Field.ACCUMULATE, k != 0)
                cute.gemm(qk_mma, acc_s, tSrQ[None, None, k, 0], tSrK[None, None, k, buf], acc_s)
        warpgroup.commit_group()
        warpgroup.wait_group(0)

    @cute.jit
    def mask(self, acc_s: cute.Tensor, tScS: cute.Tensor, tok0: Int32, row_limit: cute.Tensor, min_limit: Int32):
        """Keys at or past each row's limit become -inf (selected, never multiplied, so NaN
        in masked positions disappears)."""
        if tok0 + PAGE > min_limit:
            for k in cutlass.range_constexpr(cute.size(acc_s)):
                _, tok = tScS[k]
                if tok0 + tok >= row_limit[(k // 2) % 2]:
                    acc_s[k] = -Float32.inf

    @cute.jit
    def max_into(self, acc_s: cute.Tensor, m_in: cute.Tensor, m_out: cute.Tensor):
        """m_out = max(m_in, max of S over each of this thread's 2 rows, whole row)."""
        for h in cutlass.range_constexpr(2):
            m_out[h] = m_in[h]
        for k in cutlass.range_constexpr(cute.size(acc_s)):
            h = (k // 2) % 2  # acc fragment order (2 cols, 2 rows, N/8 col groups)
            m_out[h] = cute.arch.fmax(m_out[h], acc_s[k])
        for h in cutlass.range_constexpr(2):
            m_out[h] = cute.arch.warp_reduction_max(m_out[h], threads_in_group=4)

    @cute.jit
    def publish_max(self, m: cute.Tensor, sMax: cute.Tensor, tScS: cute.Tensor, wg: cutlass.Constexpr[int],
                    wtid: Int32, barrier_id: cutlass.Constexpr[int]):
        if wtid % 4 == 0:
            for h in cutlass.range_constexpr(2):
                row, _ = tScS[2 * h]
                sMax[wg, row] = m[h]
        cute.arch.barrier_arrive(barrier_id=barrier_id, number_of_threads=self.threads)

    @cute.jit
    def read_max(self, m: cute.Tensor, sMax: cute.Tensor, tScS: cute.Tensor, wg: cutlass.Constexpr[int],
                 barrier_id: cutlass.Constexpr[int]):
        cute.arch.barrier(barrier_id=barrier_id, number_of_threads=self.threads)
        for h in cutlass.range_constexpr(2):
            row, _ = tScS[2 * h]
            m[h] = sMax[wg, row]

    @cute.jit
    def rescale(self, m_old: cute.Tensor, m_new: cute.Tensor, base: cute.Tensor, factor: cute.Tensor,
                scale_log2: Float32):
        """base = m_new in scaled log2 units (0 for a row with no key yet, so exp2 sees -inf,
        not NaN) and factor = exp2(m_old - m_new) scaled (1 while m_old is -inf: the row's
        sums are still 0, and a huge factor would turn 0 into NaN)."""
        neg_inf = -Float32.inf
        for h in cutlass.range_constexpr(2):
            b = m_new[h] * scale_log2
            if m_new[h] == neg_inf:
                b = Float32(0.0)
            prev = m_old[h] * scale_log2
            if m_old[h] == neg_inf:
                prev = b
            base[h] = b
            factor[h] = cute.math.exp2(prev - b, fastmath=True)

    @cute.jit
    def exponentiate(self, acc_s: cute.Tensor, base: cute.Tensor, row_sum: cute.Tensor, factor: cute.Tensor,
                     scale_log2: Float32):
        """S -> P = exp2(S * scale - base) in place; row_sum = row_sum * factor + sum(P)."""
        for h in cutlass.range_constexpr(2):
            row_sum[h] = row_sum[h] * factor[h]
        for k in cutlass.range_constexpr(cute.size(acc_s)):
            h = (k // 2) % 2
            p = cute.math.exp2(acc_s[k] * scale_log2 - base[h], fastmath=True)
            acc_s[k] = p
            row_sum[h] += p

    @cute.jit
    def scale_o(self, acc_o: cute.Tensor, factor: cute.Tensor):
        # Once a row's maximum has settled the factor is exactly 1: skip the 128 multiplies.
        if factor[0] != 1.0 or factor[1] != 1.0:
            for k in cutlass.range_constexpr(cute.size(acc_o)):
                acc_o[k] = acc_o[k] * factor[(k // 2) % 2]

    @cute.jit
    def store_p(self, rP: cute.Tensor, factor, tScS: cute.Tensor, sP: cute.Tensor):
        """P (the register operand, optionally times a per-row ``factor``) into a page's P
        tile: fragment elements 2j, 2j+1 are adjacent columns of one row, one 4-byte store
        each.  Rescaling the rounded P rounds twice; that keeps S's fp32 registers dead
        while P V runs (with them live the kernel spills)."""
        for j in cutlass.range_constexpr(cute.size(rP) // 2):
            row, tok = tScS[2 * j]
            pair = cute.make_rmem_tensor(cute.make_layout(2), self.dtype)
            if cutlass.const_expr(factor is None):
                pair[0] = rP[2 * j]
                pair[1] = rP[2 * j + 1]
            else:
                pair[0] = (rP[2 * j].to(Float32) * factor[j % 2]).to(self.dtype)
                pair[1] = (rP[2 * j + 1].to(Float32) * factor[j % 2]).to(self.dtype)
            cute.autovec_copy(pair, cute.local_tile(sP[row, None], (2,), (tok // 2,)))
        # Generic stores read next by WGMMA (async proxy).
        cute.arch.fence_proxy("async.shared", space="cta")

    @cute.jit
    def to_operand(self, acc_s: cute.Tensor, rP: cute.Tensor):
        """S/P accumulator -> register A operand of P V: a 64 x 64 accumulator fragment and
        the A fragment of four k16 steps list the same (row, column) pairs in the same
        order, so this is an element-wise conversion."""
        for k in cutlass.range_constexpr(cute.size(acc_s)):
            rP[k] = acc_s[k].to(self.dtype)

    @cute.jit
    def zero_tail(self, sK: cute.Tensor, buf: cutlass.Constexpr[int], valid: Int32, wg: cutlass.Constexpr[int],
                  wtid: Int32):
        """Zero this warpgroup's V columns of the tokens past the request's end (they may be
        NaN; P there is 0, but 0 * NaN is not), then make them visible to its WGMMA."""
        if valid < PAGE:
            for i in cutlass.range(wtid, PAGE * self.v_half, 128):
                t = i // self.v_half
                c = i - t * self.v_half
                if t >= valid:
                    sK[t, wg * self.v_half + c, buf] = self.dtype(0.0)
            cute.arch.fence_proxy("async.shared", space="cta")
            cute.arch.barrier(barrier_id=SeesawBarrier.TAIL + wg, number_of_threads=128)

    @cute.jit
    def p_tile(self, sK: cute.Tensor, sP_layout: cute.ComposedLayout, buf: cutlass.Constexpr[int]) -> cute.Tensor:
        """Page ``buf``'s P tile (its RoPE columns) as the (64 rows, 64 tokens) K-major A
        operand: the same bytes and swizzle as a (token, column) B tile."""
        base = sK[None, None, buf].iterator + P_TILE * self.tile_elems
        return cute.make_tensor(cute.recast_ptr(base, sP_layout.inner), cute.slice_(sP_layout.outer, (None, None, 0)))

    # ------------------------------------------------------------------ a warpgroup's work
    @cute.jit
    def consume(self, sQ: cute.Tensor, sK: cute.Tensor, sStat: cute.Tensor, sMax: cute.Tensor,
                sV_layout: cute.ComposedLayout, sP_layout: cute.ComposedLayout, loads, mQ: cute.Tensor,
                mSeqlens: cute.Tensor, mSchedMeta: cute.Tensor, mSplitOffsets: cute.Tensor, mOut: cute.Tensor,
                mLse: cute.Tensor, mOAccum: cute.Tensor, mLseAccum: cute.Tensor, softmax_scale: Float32,
                causal: Int32, heads_per_kv: Int32, tidx: Int32, wg: cutlass.Constexpr[int]):
        """Warpgroup ``wg``: S of buffer ``wg``'s blocks, O columns [256 wg, 256 wg + 256)."""
        _, _, _, _, bars = loads
        mBlockTable = loads[2]
        qk_mma, pv_reg, pv_smem = self.make_seesaw_mmas()
        wtid = tidx % 128
        part, hk, mblk = cute.arch.block_idx()
        other = 1 - wg
        thr_qk = qk_mma.get_slice(wtid)
        thr_reg = pv_reg.get_slice(wtid)
        thr_smem = pv_smem.get_slice(wtid)
        tSrQ = thr_qk.make_fragment_A(thr_qk.partition_A(sQ))  # (MMA, 1, d/16, 1)
        tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sK))  # (MMA, 1, d/16, 2)
        tScS = thr_qk.partition_C(cute.make_identity_tensor((BLOCK_M, PAGE)))  # (row, token)
        tOcO = thr_reg.partition_C(cute.make_identity_tensor((BLOCK_M, self.v_half)))  # (row, col - 256 wg)
        # own block: P from registers; the other warpgroup's block: P from its page's P tile
        tOrV_own = thr_reg.make_fragment_B(thr_reg.partition_B(self.v_view(sK, sV_layout, wg, wg)))
        tOrV_other = thr_smem.make_fragment_B(thr_smem.partition_B(self.v_view(sK, sV_layout, other, wg)))
        tOrP_other = thr_smem.make_fragment_A(thr_smem.partition_A(self.p_tile(sK, sP_layout, other)))
        sP_own = self.p_tile(sK, sP_layout, wg)
        rP = thr_reg.make_fragment_A(thr_reg.partition_shape_A((BLOCK_M, PAGE)))
        acc_s = thr_qk.make_fragment_C(thr_qk.partition_shape_C((BLOCK_M, PAGE)))
        m_pair = cute.make_rmem_tensor(cute.make_layout(2), Float32)  # max after this pair
        m_even = cute.make_rmem_tensor(cute.make_layout(2), Float32)  # max after the even block
        base = cute.make_rmem_tensor(cute.make_layout(2), Float32)
        factor = cute.make_rmem_tensor(cute.make_layout(2), Float32)
        factor2 = cute.make_rmem_tensor(cute.make_layout(2), Float32)
        row_limit = cute.make_rmem_tensor(cute.make_layout(2), Int32)
        scale_log2 = softmax_scale * LOG2_E
        s_q = mQ.shape[1]
        max_blocks = mBlockTable.shape[1]
        phase = Int32(0)  # of this warpgroup's buffer's tile barriers

        begin_req = mSchedMeta[part, 0]
        end_req = mSchedMeta[part, 2]
        prev_blocks = Int32(0)
        for r in cutlass.range(begin_req, end_req + 1, unroll=1):
            seqlen = self.seqlen_of(mSeqlens, max_blocks, r)
            lo, hi = self.block_range(seqlen, mSchedMeta, part, r)
            split = Int32(0)
            if r == begin_req:
                split = mSchedMeta[part, 4]
            nr = r + 1
            nlo, nhi = Int32(0), Int32(0)
            if nr <= end_req:
                nlo, nhi = self.block_range(self.seqlen_of(mSeqlens, max_blocks, nr), mSchedMeta, part, nr)
            nxt = (nr, nlo, nhi, (nr <= end_req) & (nlo < nhi))
            # The previous piece's last pair already loaded this piece's first pair when both have blocks.
            if (prev_blocks <= 0) | (hi <= lo):
                self.reload(loads, hk, (r, lo, lo < hi), 0, wg, wtid)
                self.reload(loads, hk, (r, lo + 1, lo + 1 < hi), 1, wg, wtid)
            self.load_q(mQ, sQ, (r, hk, mblk, heads_per_kv), tidx)

            # Key limit of this thread's two rows: the request length, less s_q-1-i for query
            # token i under causal masking; only blocks that reach min_limit need masking.
            for h in cutlass.range_constexpr(2):
                row, _ = tScS[2 * h]
                row_limit[h] = seqlen
                if causal != 0:
                    iq, _ = self.query_of_row(mblk * BLOCK_M + row, hk, heads_per_kv)
                    row_limit[h] = seqlen - (s_q - 1 - iq)
            min_limit = cutlass.min(row_limit[0], row_limit[1])
            acc_o, row_max, row_sum = self.fresh_rows(thr_reg)
            for a in cutlass.range(lo, hi, 2, unroll=1):
                nxt0, nxt1 = self.next_blocks(r, a, hi, nxt)
                if cutlass.const_expr(wg == 0):
                    self.even_step(qk_mma, pv_reg, pv_smem, acc_s, rP, tSrQ, tSrK, tScS, tOrV_own, tOrV_other,
                                   tOrP_other, sP_own, sK, sMax, acc_o, row_max, row_sum, m_even, m_pair, base,
                                   factor, factor2, row_limit, min_limit, loads, hk, nxt0, nxt1, phase, a, hi, seqlen,
                                   scale_log2, wtid)
                else:
                    self.odd_step(qk_mma, pv_reg, pv_smem, acc_s, rP, tSrQ, tSrK, tScS, tOrV_own, tOrV_other,
                                  tOrP_other, sP_own, sK, sMax, acc_o, row_max, row_sum, m_even, m_pair, base,
                                  factor, row_limit, min_limit, loads, hk, nxt0, nxt1, phase, a, hi, seqlen,
                                  scale_log2, wtid)
                if cutlass.const_expr(wg == 0):
                    phase = phase ^ 1
                else:
                    if a + 1 < hi:
                        phase = phase ^ 1
                for h in cutlass.range_constexpr(2):
                    row_max[h] = m_pair[h]
            prev_blocks = hi - lo

            nsplits = mSplitOffsets[r + 1] - mSplitOffsets[r]
            self.epilogue(acc_o, tOcO, row_max, row_sum, sStat, mOut, mLse, mOAccum, mLseAccum, r, hk, mblk,
                          heads_per_kv, wg, scale_log2, nsplits, mSplitOffsets[r] + split, wtid)

    @cute.jit
    def even_step(self, qk_mma, pv_reg, pv_smem, acc_s, rP, tSrQ, tSrK, tScS, tOrV_own, tOrV_other, tOrP_other,
                  sP_own, sK, sMax, acc_o, row_max, row_sum, m_even, m_pair, base, factor, factor2, row_limit,
                  min_limit: Int32, loads, hk: Int32, nxt0, nxt1, phase: Int32, a: Int32, hi: Int32,
                  seqlen: Int32, scale_log2: Float32, wtid: Int32):
        """Warpgroup 0's part of the pair (a in buffer 0, a + 1 in buffer 1 if a + 1 < hi)."""
        bars = loads[4]
        self.s_gemm(qk_mma, acc_s, tSrQ, tSrK, bars, 0, phase)
        self.mask(acc_s, tScS, a * PAGE, row_limit, min_limit)
        self.max_into(acc_s, row_max, m_even)
        self.publish_max(m_even, sMax, tScS, 0, wtid, SeesawBarrier.MAX_0)
        self.rescale(row_max, m_even, base, factor, scale_log2)
        self.exponentiate(acc_s, base, row_sum, factor, scale_log2)
        self.scale_o(acc_o, factor)
        self.to_operand(acc_s, rP)
        self.zero_tail(sK, 0, seqlen - a * PAGE, 0, wtid)
        warpgroup.fence()
        gemm(pv_reg, acc_o, rP, tOrV_own, False)
        warpgroup.commit_group()
        # The pair's maxima: the even block's P handed to warpgroup 1 is rescaled to them.
        self.read_max(m_pair, sMax, tScS, 1, SeesawBarrier.MAX_1)
        self.rescale(m_even, m_pair, base, factor2, scale_log2)
        self.store_p(rP, factor2, tScS, sP_own)
        cute.arch.barrier_arrive(barrier_id=SeesawBarrier.P_0, number_of_threads=self.threads)
        warpgroup.wait_group(0)
        self.reload(loads, hk, nxt0, 0, 0, wtid)
        if a + 1 >= hi:  # a lone last block: buffer 1 is already free
            self.reload(loads, hk, nxt1, 1, 0, wtid)
        self.scale_o(acc_o, factor2)
        for h in cutlass.range_constexpr(2):
            row_sum[h] = row_sum[h] * factor2[h]
        cute.arch.barrier(barrier_id=SeesawBarrier.P_1, number_of_threads=self.threads)
        if a + 1 < hi:
            self.zero_tail(sK, 1, seqlen - (a + 1) * PAGE, 0, wtid)
            warpgroup.fence()
            gemm(pv_smem, acc_o, tOrP_other, tOrV_other, False)
            warpgroup.commit_group()
            warpgroup.wait_group(0)
            self.reload(loads, hk, nxt1, 1, 0, wtid)

    @cute.jit
    def odd_step(self, qk_mma, pv_reg, pv_smem, acc_s, rP, tSrQ, tSrK, tScS, tOrV_own, tOrV_other, tOrP_other,
                 sP_own, sK, sMax, acc_o, row_max, row_sum, m_even, m_pair, base, factor, row_limit,
                 min_limit: Int32, loads, hk: Int32, nxt0, nxt1, phase: Int32, a: Int32, hi: Int32,
                 seqlen: Int32, scale_log2: Float32, wtid: Int32):
        """Warpgroup 1's part of the pair (a in buffer 0, a + 1 in buffer 1 if a + 1 < hi)."""
        bars = loads[4]
        if a + 1 < hi:
            self.s_gemm(qk_mma, acc_s, tSrQ, tSrK, bars, 1, phase)
            self.mask(acc_s, tScS, (a + 1) * PAGE, row_limit, min_limit)
        self.read_max(m_even, sMax, tScS, 0, SeesawBarrier.MAX_0)
        for h in cutlass.range_constexpr(2):
            m_pair[h] = m_even[h]
        if a + 1 < hi:
            self.max_into(acc_s, m_even, m_pair)
        self.publish_max(m_pair, sMax, tScS, 1, wtid, SeesawBarrier.MAX_1)
        self.rescale(row_max, m_pair, base, factor, scale_log2)
        if a + 1 < hi:
            self.exponentiate(acc_s, base, row_sum, factor, scale_log2)
            self.to_operand(acc_s, rP)
            self.store_p(rP, None, tScS, sP_own)
        else:
            for h in cutlass.range_constexpr(2):
                row_sum[h] = row_sum[h] * factor[h]
        cute.arch.barrier_arrive(barrier_id=SeesawBarrier.P_1, number_of_threads=self.threads)
        self.scale_o(acc_o, factor)
        if a + 1 < hi:
            self.zero_tail(sK, 1, seqlen - (a + 1) * PAGE, 1, wtid)
        cute.arch.barrier(barrier_id=SeesawBarrier.P_0, number_of_threads=self.threads)
        self.zero_tail(sK, 0, seqlen - a * PAGE, 1, wtid)
        # P0' V0_R is waited for before P1 V1_R is issued.  An MMA chain left in flight into
        # the branch below makes ptxas serialise every WGMMA of the kernel; issuing both back
        # to back with branch-local waits measured 3-7% slower (P1 V1_R then runs ahead of
        # warpgroup 0's P1 V1_L, whose release of buffer 1 the next pair waits for).
        warpgroup.fence()
        gemm(pv_smem, acc_o, tOrP_other, tOrV_other, False)
        warpgroup.commit_group()
        warpgroup.wait_group(0)
        self.reload(loads, hk, nxt0, 0, 1, wtid)
        if a + 1 < hi:
            warpgroup.fence()
            gemm(pv_reg, acc_o, rP, tOrV_own, False)
            warpgroup.commit_group()
            warpgroup.wait_group(0)
        self.reload(loads, hk, nxt1, 1, 1, wtid)
