"""SM90 sparse MLA prefill (``flash_mla_sparse_fwd``): each query token attends to its own
top-k rows of a flat bf16 KV tensor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64
from cutlass.cute.nvgpu import warpgroup

from cute_mla.kernels.common import named_barrier
from cute_mla.kernels.common.named_barrier import NamedBarrier
from cute_mla.kernels.common.fragment_store import store_row
from cute_mla.kernels.common.gmem import copy_16B_async_zfill
from cute_mla.kernels.common.paged_kv import COLUMN_TILE, kv_smem_layout
from cute_mla.kernels.common.softmax import LOG2_E, Softmax, output_lse, sink_denominator
from cute_mla.kernels.common.topk import counted
from cute_mla.kernels.sm90.mla_consumers import TwoConsumerMlaSm90, copy_q_async
from cute_mla.kernels.sm90.seesaw import SeesawConsumers, SeesawFragments
from cute_mla.layouts.constants import BLOCK_M, BLOCK_N

V_L_TILES = 4  # column tiles 0-3 of a block: V_L, read by warpgroup 0's P V
GROUP = 8  # producer threads per 128-byte line (one 64-column tile row of a kv row)


@dataclass(frozen=True)  # frozen: the DSL passes it through loops and branches as a constant
class RingBarriers:
    """The kernel's mbarriers (class docstring of ``SparsePrefillSm90``, "Ring"): for each
    (buffer, half), half 0 = L and 1 = R, a ``full`` one (the producer's copies of the half
    have landed) and an ``empty`` one (its last reader released it); then the ``q`` one (the
    consumers' copies of the next tile's Q have landed)."""

    base: Any  # 9 Int64 in shared memory: full (buffer, half), empty (buffer, half), q

    @staticmethod
    def create(smem) -> "RingBarriers":
        return RingBarriers(smem.allocate_array(Int64, 9, byte_alignment=8))

    def full(self, buf, half):
        return self.base + (2 * buf + half)

    def empty(self, buf, half):
        """Half ``half`` of buffer ``buf``; each half has one last reader, warpgroup ``half``."""
        return self.base + (4 + 2 * buf + half)

    def q(self):
        return self.base + 8

    @cute.jit
    def init(self, producer_threads: cutlass.Constexpr[int], consumer_threads: cutlass.Constexpr[int]):
        """One thread: each L half's ``full`` counts the producer's cp.async arrivals and its
        bias writes, an R half's the cp.asyncs; ``empty`` one consumer warpgroup; ``q`` every
        consumer thread's copies."""
        for b in cutlass.range_constexpr(2):
            cute.arch.mbarrier_init(self.full(b, 0), 2 * producer_threads)
            cute.arch.mbarrier_init(self.full(b, 1), producer_threads)
        for b in cutlass.range_constexpr(2):
            for half in cutlass.range_constexpr(2):
                cute.arch.mbarrier_init(self.empty(b, half), 128)
        cute.arch.mbarrier_init(self.q(), consumer_threads)


@dataclass(frozen=True)  # frozen: the DSL passes it through loops and branches as a constant
class PrefillTiles:
    """The tile scheduler of sparse prefill: tile t is query token t // head_blocks, head block
    t % head_blocks, s_q * head_blocks of them; the CTA of block index b in a persistent grid of
    G CTAs (``schedules.grids.sparse_prefill``) takes tiles b, b + G, b + 2 G, ..."""

    head_blocks: Any  # blocks of 64 query heads
    count: Any  # tiles
    first: Any  # this CTA's first tile: its block index
    stride: Any  # the grid's size

    @staticmethod
    def create(s_q, head_blocks) -> "PrefillTiles":
        bid, _, _ = cute.arch.block_idx()
        grid, _, _ = cute.arch.grid_dim()
        return PrefillTiles(head_blocks, s_q * head_blocks, bid, grid)

    def coords(self, tile):
        """(query token, head block) of tile ``tile``."""
        token = tile // self.head_blocks
        return token, tile - token * self.head_blocks


class NextQ(NamedTuple):
    """The next tile's Q copy, which the last pair of a tile starts (``start``)."""

    mQ: Any
    sQ: Any
    tile: Any
    tiles: PrefillTiles
    ctid: Any
    start: Any


class PairCtx(NamedTuple):
    """The seesaw hooks' context for one pair of gathered blocks."""

    bars: RingBarriers
    phase: Any  # phase of this pair's half-block barriers
    sBias: Any  # (slot, buffer) logit bias: 0, or -inf for a slot that gathered nothing
    next_q: NextQ


class SparsePrefillSm90(SeesawConsumers, TwoConsumerMlaSm90):
    """O = softmax(Q K_sel^T * scale) V_sel for 64 query heads of one query token, where
    K_sel are the kv rows its ``indices`` select (V = their first 512 columns).

    Persistent grid of min(tiles, SMs) CTAs over s_q * h_q / 64 tiles (``PrefillTiles``), tile =
    token * (h_q / 64) + head block, so both head blocks of a token run at the same time and the second
    finds the gathered rows in L2.  A tile is ceil(n / 64) blocks of 64 selected slots,
    n = min(topk, topk_length[token]), taken in pairs (even block in buffer 0, odd block in
    buffer 1); an odd count is padded with one block of invalid slots, which gathers nothing
    and adds nothing.  The producer runs ahead into the next tile's blocks while the
    consumers finish a tile's epilogue; the successor's Q is copied into sQ during that
    epilogue (started by each consumer warpgroup right after its last MMA of the tile that
    reads sQ has completed, completing on the ``q`` mbarrier).

    Warp roles (384 threads):
      warpgroup 0  producer: gathers the 64 selected rows of a block with 16-byte cp.async
                   straight into the K-major 128B-swizzled layout the tensor cores read.
                   Thread 8 g + c moves 16-byte piece c of each 128-byte line of rows
                   16 j + g (j < 4): all its rows share one swizzle phase, so every shared
                   address is one per-thread base plus a constant.  A slot whose index is
                   outside [0, s_kv) or past topk_length reads nothing (a zero-filling
                   cp.async) and gets logit bias -inf.
      warpgroups 1, 2  consumers: the seesaw of ``kernels.sm90.seesaw`` (warpgroup w
                   computes S of buffer w's blocks and O columns [256 w, 256 w + 256)).
                   The even block's P goes to buffer 0's RoPE tile (d 576) or a P buffer
                   (d 512), the odd block's to a P buffer.

    Ring: each buffer is two halves, L = column tiles 0-3 (V_L) and R = tiles 4.. (V_R and,
    at d 576, RoPE), each with a ``full`` and an ``empty`` mbarrier (``RingBarriers``), so the
    producer refills a half as soon as its last reader is done with it instead of waiting for
    the whole block:
      L0: warpgroup 0 (S0, P0 V0_L)     R0: warpgroup 1 last (P0 V0_R, P0 in its RoPE tile)
      R1: warpgroup 1 (S1, P1 V1_R)     L1: warpgroup 0 last (P1 V1_L)
    so each half is released by one warpgroup (128 arrivals) and refilled in that order.
    ``full`` completes when all 128 producer threads' cp.asyncs of the half have landed
    (``cp.async.mbarrier.arrive.noinc``), the producer never waits for its own copies; an L
    half also carries the block's logit biases (``sBias``), written by the producer before
    an ordinary arrive (so L's count is 256).  Consumers fence the landed half into the
    async proxy before their WGMMAs read it.

    Output: out = O / sum scaled by the sink factor exp(lse) / (exp(lse) + exp(sink)),
    lse and max_logits in natural-log scale of the scaled logits, without the sink.  No
    valid key gives out = 0, lse = +inf, max_logits = -inf.
    """

    producer_threads = 128
    regs_producer = 40
    regs_consumer = 232

    def __init__(self, d_qk: int):
        super().__init__(cutlass.BFloat16, d_qk)
        self.tiles = d_qk // COLUMN_TILE
        # With RoPE columns (d 576) buffer 0's last tile is free once S0 is done and holds P0
        # (read last by warpgroup 1, which also releases R0); P1 cannot live in buffer 1's R
        # half, which warpgroup 1 releases before warpgroup 0 has read P1.
        self.p_in_stage = d_qk > 512
        self.p_buffers = 1 if self.p_in_stage else 2
        self.smem_bytes = self.q_bytes + self.stages * self.kv_bytes + self.p_buffers * self.p_bytes + 2048

    @cute.jit
    def __call__(self, q: cute.Tensor, kv: cute.Tensor, indices: cute.Tensor, topk_length: cute.Tensor,
                 attn_sink: cute.Tensor, out: cute.Tensor, max_logits: cute.Tensor, lse: cute.Tensor,
                 sm_scale: Float32, has_topk_length: Int32, has_sink: Int32, stream: cuda.CUstream):
        # q (s_q, h_q, d); kv (s_kv, 1, d); indices (s_q, 1, topk); out (s_q, h_q, 512)
        sK_layout = kv_smem_layout(self.dtype, self.d, self.stages)
        # Persistent: the launcher starts min(tiles, SMs) CTAs (schedules.grids.sparse_prefill), each
        # walking its tiles (PrefillTiles); this grid only serves the ahead-of-time compile.
        grid = [q.shape[0] * (q.shape[1] // BLOCK_M), 1, 1]
        self.kernel(q, kv, indices, topk_length, attn_sink, out, max_logits, lse, sm_scale, has_topk_length,
                    has_sink, self.q_smem_layout(), sK_layout, self.v_smem_layout(), self.p_smem_layout()).launch(
            grid=grid, block=[self.threads, 1, 1], smem=self.smem_bytes, stream=stream, min_blocks_per_mp=1)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mKV: cute.Tensor, mIndices: cute.Tensor, mTopkLength: cute.Tensor,
               mSink: cute.Tensor, mOut: cute.Tensor, mMaxLogits: cute.Tensor, mLse: cute.Tensor,
               sm_scale: Float32, has_topk_length: Int32, has_sink: Int32,
               sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout, sV_layout: cute.ComposedLayout,
               sP_layout: cute.ComposedLayout):
        # Parameters in layouts.operands.sparse_prefill_args order; static objects last.
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg = warp // 4

        smem = cutlass.memory.SmemAllocator()
        sP0 = None
        if cutlass.const_expr(not self.p_in_stage):
            # first, so that every 1024-byte aligned operand buffer packs without a gap
            sP0 = smem.allocate_tensor(self.dtype, sP_layout.outer, byte_alignment=1024, swizzle=sP_layout.inner)
        sQ, sK, sP, sStat = self.allocate_operands(smem, sQ_layout, sK_layout, sP_layout)
        if cutlass.const_expr(self.p_in_stage):
            p_tiles = (self.p_view(sK[None, None, 0].iterator + (self.tiles - 1) * BLOCK_N * COLUMN_TILE, sP_layout),
                       self.p_view(sP.iterator, sP_layout))
        else:
            p_tiles = (self.p_view(sP0.iterator, sP_layout), self.p_view(sP.iterator, sP_layout))
        sMax = smem.allocate_tensor(Float32, cute.make_layout((2, BLOCK_M)), byte_alignment=16)
        sBias = smem.allocate_tensor(Float32, cute.make_layout((BLOCK_N, self.stages)), byte_alignment=16)
        bars = RingBarriers.create(smem)
        if tidx == 0:
            bars.init(self.producer_threads, self.consumer_threads)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        if wg == 0:
            cute.arch.setmaxregister_decrease(self.regs_producer)
            self.load(mKV, mIndices, mTopkLength, has_topk_length, sK, sK_layout.outer, sBias, bars,
                      mQ.shape[1] // BLOCK_M, mQ.shape[0], tidx)
        else:
            cute.arch.setmaxregister_increase(self.regs_consumer)
            if warp < 8:
                self.consume(sQ, sK, sStat, sMax, sBias, sV_layout, p_tiles, bars, mQ, mIndices, mTopkLength, mSink,
                             mOut, mMaxLogits, mLse, sm_scale, has_topk_length, has_sink, tidx - 128, 0)
            else:
                self.consume(sQ, sK, sStat, sMax, sBias, sV_layout, p_tiles, bars, mQ, mIndices, mTopkLength, mSink,
                             mOut, mMaxLogits, mLse, sm_scale, has_topk_length, has_sink, tidx - 128, 1)

    @cute.jit
    def tile_work(self, tile: Int32, tiles: PrefillTiles, mIndices: cute.Tensor, mTopkLength: cute.Tensor,
                  has_topk_length: Int32):
        """Tile -> (token, head block, counted slots n, pairs of blocks).  Selected slots
        [0, n) count; a topk_length outside [0, topk] is clamped into it."""
        token, hblk = tiles.coords(tile)
        n = counted(mIndices.shape[2], mTopkLength, has_topk_length, token)
        return token, hblk, n, (n + 2 * BLOCK_N - 1) // (2 * BLOCK_N)

    # ------------------------------------------------------------------ producer
    @cute.jit
    def load(self, mKV: cute.Tensor, mIndices: cute.Tensor, mTopkLength: cute.Tensor, has_topk_length: Int32,
             sK: cute.Tensor, sK_outer: cute.Layout, sBias: cute.Tensor, bars: RingBarriers, head_blocks: Int32,
             s_q: Int32, ptid: Int32):
        g = ptid // GROUP  # rows 16 j + g of every block
        c = ptid % GROUP  # 16-byte piece c of each of their 128-byte lines
        # 128B swizzle: address bits 4-6 ^= bits 7-9 = row % 8 = g % 8 for all of this thread's
        # rows (tiles are 8 KiB, rows 128 bytes apart), so one XOR serves every piece.
        lane_off = (cute.crd2idx((g, GROUP * c, 0), sK_outer) * 2) ^ ((g % 8) << 4)
        dst_base = sK.iterator.toint() + lane_off
        kv_base = mKV.iterator.toint() + Int64(16 * c)
        row_bytes = Int64(mKV.stride[0] * 2)
        rows = cute.make_rmem_tensor(cute.make_layout((4, 2)), Int32)  # (j, buffer) kv row or -1
        tiles = PrefillTiles.create(s_q, head_blocks)
        phase = Int32(0)
        for tile in cutlass.range(tiles.first, tiles.count, tiles.stride, unroll=1):
            token, _, n, pairs = self.tile_work(tile, tiles, mIndices, mTopkLength, has_topk_length)
            for pair in cutlass.range(pairs, unroll=1):
                for b in cutlass.range_constexpr(2):
                    for j in cutlass.range_constexpr(4):
                        rows[j, b] = self.slot_row(mKV, mIndices, token, n, (2 * pair + b) * BLOCK_N + 16 * j + g)
                # In the order the consumers free the halves (class docstring).
                self.fill_half(rows, sBias, bars, dst_base, kv_base, row_bytes, sK_outer, phase, 0, 0, g, c)
                self.fill_half(rows, sBias, bars, dst_base, kv_base, row_bytes, sK_outer, phase, 0, 1, g, c)
                self.fill_half(rows, sBias, bars, dst_base, kv_base, row_bytes, sK_outer, phase, 1, 1, g, c)
                self.fill_half(rows, sBias, bars, dst_base, kv_base, row_bytes, sK_outer, phase, 1, 0, g, c)
                phase = phase ^ 1

    @cute.jit
    def fill_half(self, rows: cute.Tensor, sBias: cute.Tensor, bars: RingBarriers, dst_base: Int32, kv_base: Int64,
                  row_bytes: Int64, sK_outer: cute.Layout, phase: Int32, buf: cutlass.Constexpr[int],
                  half: cutlass.Constexpr[int], g: Int32, c: Int32):
        """Once its last reader is done, start this thread's copies of half ``half`` of
        buffer ``buf``; ``full`` fires when they have landed."""
        cute.arch.mbarrier_wait(bars.empty(buf, half), phase ^ 1)
        t0 = 0 if half == 0 else V_L_TILES
        t1 = V_L_TILES if half == 0 else self.tiles
        for j in cutlass.range_constexpr(4):
            r = rows[j, buf]
            src = kv_base + Int64(cutlass.max(r, 0)) * row_bytes
            size = Int32(16)
            if r < 0:
                size = Int32(0)
            for t in cutlass.range_constexpr(t0, t1):
                # (row 16 j, column 64 t, buffer) relative to this thread's (g, 8 c, 0): a constant.
                dst = dst_base + cute.crd2idx((16 * j, COLUMN_TILE * t, buf), sK_outer) * 2
                copy_16B_async_zfill(dst, src + 2 * COLUMN_TILE * t, size)
        cute.arch.cp_async_mbarrier_arrive_noinc(bars.full(buf, half))
        if cutlass.const_expr(half == 0):
            if c == 0:
                for j in cutlass.range_constexpr(4):
                    bias = Float32(0.0)
                    if rows[j, buf] < 0:
                        bias = -Float32.inf
                    sBias[16 * j + g, buf] = bias
            cute.arch.mbarrier_arrive(bars.full(buf, 0))

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
    def consume(self, sQ: cute.Tensor, sK: cute.Tensor, sStat: cute.Tensor, sMax: cute.Tensor, sBias: cute.Tensor,
                sV_layout: cute.ComposedLayout, p_tiles, bars: RingBarriers, mQ: cute.Tensor, mIndices: cute.Tensor,
                mTopkLength: cute.Tensor, mSink: cute.Tensor, mOut: cute.Tensor, mMaxLogits: cute.Tensor,
                mLse: cute.Tensor, sm_scale: Float32, has_topk_length: Int32, has_sink: Int32, ctid: Int32,
                wg: cutlass.Constexpr[int]):
        """Consumer warpgroup ``wg``: S of buffer ``wg``'s blocks, O columns [256 wg, 256 wg + 256)."""
        wtid = ctid % 128
        frags, rows, tOcO = self.seesaw_fragments(sQ, sK, sMax, sV_layout, p_tiles, wg, wtid)
        pv_reg = SeesawFragments(*frags).pv_reg
        scale_log2 = sm_scale * LOG2_E
        tiles = PrefillTiles.create(mQ.shape[0], mQ.shape[1] // BLOCK_M)
        phase = Int32(0)
        q_phase = Int32(0)
        if tiles.first < tiles.count:
            self.start_q_copy(mQ, sQ, bars, tiles.first, tiles, ctid)
        for tile in cutlass.range(tiles.first, tiles.count, tiles.stride, unroll=1):
            token, hblk, _, pairs = self.tile_work(tile, tiles, mIndices, mTopkLength, has_topk_length)
            # Both warpgroups are past the previous tile's epilogue (its sStat exchange).
            named_barrier.sync(NamedBarrier.Q_RELOAD, self.consumer_threads)
            cute.arch.mbarrier_wait(bars.q(), q_phase)
            cute.arch.fence_proxy("async.shared", space="cta")  # cp.async wrote sQ; WGMMA reads it
            q_phase = q_phase ^ 1
            acc_o, softmax = self.fresh_rows(pv_reg.get_slice(wtid), scale_log2)
            nxt = tile + tiles.stride
            for pair in cutlass.range(pairs, unroll=1):
                # The last pair's final release starts the next tile's Q copy.
                next_q = (mQ, sQ, nxt, tiles, ctid, (pair == pairs - 1) & (nxt < tiles.count))
                self.pair(frags, acc_o, softmax, rows, sK, bars, phase, sBias, next_q, pair, pairs, wtid, wg)
                phase = phase ^ 1
            if pairs == 0 and nxt < tiles.count:
                self.start_q_copy(mQ, sQ, bars, nxt, tiles, ctid)
            self.epilogue(acc_o, tOcO, softmax, sStat, mSink, mOut, mMaxLogits, mLse, sm_scale, has_sink, token, hblk,
                          wg, wtid)

    @cute.jit
    def start_q_copy(self, mQ: cute.Tensor, sQ: cute.Tensor, bars: RingBarriers, tile: Int32, tiles: PrefillTiles,
                     ctid: Int32):
        """Start copying tile ``tile``'s 64 query rows into sQ (this thread's share); the
        ``q`` mbarrier completes when all 256 consumer threads' copies have landed.  The
        caller guarantees no MMA still reads sQ.  ``load_q``'s map (``q_share``)."""
        token, hblk = tiles.coords(tile)
        share = self.q_share(sQ, ctid)
        copy_q_async(share, mQ[token, hblk * BLOCK_M + share.row, None].iterator.toint())
        cute.arch.cp_async_mbarrier_arrive_noinc(bars.q())

    @cute.jit
    def pair(self, frags, acc_o: cute.Tensor, softmax: Softmax, rows, sK: cute.Tensor, bars: RingBarriers,
             phase: Int32, sBias: cute.Tensor, next_q, pair: Int32, pairs: Int32, wtid: Int32,
             wg: cutlass.Constexpr[int]):
        """This warpgroup's part of pair ``pair`` of the tile (the context is built here, not in
        the caller's staged loop: the DSL carries plain tuples across a loop body, not
        NamedTuples).  hi = 2 * pairs: the seesaw's lone-last-block path is never taken."""
        ctx = PairCtx(bars, phase, sBias, NextQ(*next_q))
        self.step(frags, acc_o, softmax, rows, sK, ctx, 2 * pair, 2 * pairs, wtid, wg)

    # ------------------------------------------------------------------ seesaw hooks (ctx: a PairCtx)
    @cute.jit
    def s_block(self, qk_mma: cute.TiledMma, acc_s: cute.Tensor, tSrQ: cute.Tensor, tSrK: cute.Tensor,
                tScS: cute.Tensor, ctx, buf: cutlass.Constexpr[int], blk: Int32):
        """S = Q K^T of the gathered block in buffer ``buf``, half by half in the order the
        producer fills them (L then R for buffer 0, R then L for buffer 1), plus each slot's
        bias (0, or -inf for a slot that gathered nothing)."""
        bars, phase, sBias = ctx.bars, ctx.phase, ctx.sBias
        k_steps = COLUMN_TILE // 16
        first = True
        for i in cutlass.range_constexpr(2):
            half = i if buf == 0 else 1 - i
            cute.arch.mbarrier_wait(bars.full(buf, half), phase)
            # The half was written by cp.async (generic proxy); WGMMA reads through the async proxy.
            cute.arch.fence_proxy("async.shared", space="cta")
            warpgroup.fence()
            t0 = 0 if half == 0 else V_L_TILES
            t1 = V_L_TILES if half == 0 else self.tiles
            for k in cutlass.range_constexpr(t0 * k_steps, t1 * k_steps):
                qk_mma.set(warpgroup.Field.ACCUMULATE, not first)
                cute.gemm(qk_mma, acc_s, tSrQ[None, None, k, 0], tSrK[None, None, k, buf], acc_s)
                first = False
        warpgroup.commit_group()
        warpgroup.wait_group(0)
        for k in cutlass.range_constexpr(cute.size(acc_s)):
            _, slot = tScS[k]
            acc_s[k] = acc_s[k] + sBias[slot, buf]

    @cute.jit
    def skip_block(self, ctx, buf: cutlass.Constexpr[int]):
        pass  # never reached: tiles are padded to whole pairs

    @cute.jit
    def prepare_v(self, sK: cute.Tensor, ctx, buf: cutlass.Constexpr[int], blk: Int32, wg: cutlass.Constexpr[int],
                  wtid: Int32):
        pass  # invalid slots are already zero rows

    @cute.jit
    def release(self, ctx, buf: cutlass.Constexpr[int], wg: cutlass.Constexpr[int], wtid: Int32):
        """Warpgroup 0 is the last reader of both L halves, warpgroup 1 of both R halves.
        Buffer 1 is each warpgroup's last release of a pair, after both S GEMMs (the only
        readers of sQ) have completed: in a tile's last pair it starts the next Q copy."""
        cute.arch.mbarrier_arrive(ctx.bars.empty(buf, wg))
        if cutlass.const_expr(buf == 1):
            q = ctx.next_q
            if q.start:
                self.start_q_copy(q.mQ, q.sQ, ctx.bars, q.tile, q.tiles, q.ctid)

    @cute.jit
    def epilogue(self, acc_o: cute.Tensor, tOcO: cute.Tensor, softmax: Softmax, sStat: cute.Tensor,
                 mSink: cute.Tensor, mOut: cute.Tensor, mMaxLogits: cute.Tensor, mLse: cute.Tensor, sm_scale: Float32,
                 has_sink: Int32, token: Int32, hblk: Int32, half: Int32, wtid: Int32):
        neg_inf = -Float32.inf
        lse2, inv = self.finish_rows(softmax, tOcO, sStat, half, wtid)
        for h in cutlass.range_constexpr(2):
            row, _ = tOcO[2 * h]
            hq = hblk * BLOCK_M + row
            # a row without keys already has factor 0
            if has_sink != 0 and lse2[h] != neg_inf:
                inv[h] = inv[h] / sink_denominator(mSink[hq], lse2[h], fastmath=False)
            store_row(acc_o, h, inv[h], mOut[token, hq, None], half * self.v_half, wtid)
        # one lane per row writes its statistics (rows of a quad are shared by 4 lanes)
        if half == 0 and wtid % 4 == 0:
            for h in cutlass.range_constexpr(2):
                row, _ = tOcO[2 * h]
                hq = hblk * BLOCK_M + row
                mLse[token, hq] = output_lse(lse2[h])
                mMaxLogits[token, hq] = softmax.row_max[h] * sm_scale
