"""SM90 dense MLA decode over a paged bf16/fp16 KV cache (split-KV, persistent grid)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.cute.nvgpu.cpasync as cpasync
from cutlass import Float32, Int32
from cutlass.cute.nvgpu import warpgroup

from cute_mla.kernels.common import named_barrier
from cute_mla.kernels.common.cluster import tma_desc_address, tma_load_4d_multicast
from cute_mla.kernels.common.named_barrier import NamedBarrier
from cute_mla.kernels.common.dtypes import dsl_dtype
from cute_mla.kernels.common.paged_kv import (COLUMN_TILE, PAGE, causal_key_limit, clamped_seqlen, kv_smem_layout,
                                              make_kv_column_tma, page_column_tile)
from cute_mla.kernels.common.softmax import LOG2_E, Softmax
from cute_mla.kernels.sm90.seesaw import SeesawConsumers, SeesawFragments
from cute_mla.kernels.sm90.split_kv_decode import DecodePart, QTile, SplitKvDecodeSm90
from cute_mla.kernels.sm90.split_tickets import ClusterTickets, SplitTickets
from cute_mla.layouts.constants import BLOCK_M, D_V

TILES = 9  # 64-column tiles of a 576-wide page
P_TILE = 8  # the RoPE tile: read by S only, so it holds the block's P once S is done
V_LEFT = (0, 1, 2, 3)  # V columns 0..255 (O_L, warpgroup 0)
V_RIGHT = (4, 5, 6, 7)  # V columns 256..511 (O_R, warpgroup 1)


@dataclass(frozen=True)  # frozen: the DSL passes it through loops and branches as a constant
class TileBarriers:
    """One mbarrier per (page buffer, column tile): it completes when that tile's TMA bytes
    have landed (``DenseDecodeSm90.load_tiles`` arms it, ``s_block`` waits on it).  In a
    cluster, also one per (page buffer, warpgroup, CTA rank): it completes when that CTA's
    warpgroup has read its copy of the tiles this warpgroup reloads in that buffer
    (``DenseDecodeSm90.share_tiles``; the barrier of the own rank is unused).  One barrier a
    sender, not one counting n - 1 arrivals: a fast CTA's next arrival could then complete
    the phase a slow CTA has not arrived at yet; one sender's arrivals come in its order."""

    base: Any  # Int64 in shared memory: 2 * TILES [buffer * TILES + tile], then 4 * cluster peer barriers
    cluster: int = 1

    @staticmethod
    def create(smem, cluster: int = 1) -> "TileBarriers":
        count = 2 * TILES if cluster == 1 else 2 * TILES + 4 * cluster
        return TileBarriers(smem.allocate_array(cutlass.Int64, count, byte_alignment=8), cluster)

    def of(self, buf, tile):
        return self.base + (buf * TILES + tile)

    def peer_read(self, buf, wg, sender):
        return self.base + (2 * TILES + (buf * 2 + wg) * self.cluster + sender)

    @cute.jit
    def init(self):
        """One thread: each tile barrier completes on one arrival (its expect_tx) plus the
        bytes; each peer barrier on its sender's one arrival."""
        for i in cutlass.range_constexpr(2 * TILES):
            cute.arch.mbarrier_init(self.base + i, 1)
        if cutlass.const_expr(self.cluster != 1):
            for i in cutlass.range_constexpr(4 * self.cluster):
                cute.arch.mbarrier_init(self.base + 2 * TILES + i, 1)


@dataclass(frozen=True)  # frozen: the DSL passes it through loops and branches as a constant
class KeyMask:
    """Which keys of a request this thread's two rows attend to: tokens below the row's limit,
    the request's length less s_q - 1 - i for query token i under causal masking
    (``DenseDecodeSm90.key_mask``).  Blocks that end at or below ``min_limit`` need no mask."""

    row_limit: Any  # (2,) Int32: the key limit of each of this thread's rows
    min_limit: Any  # the smaller of the two

    @cute.jit
    def apply(self, acc_s: cute.Tensor, tScS: cute.Tensor, tok0: Int32):
        """Keys at or past each row's limit in a block starting at token ``tok0`` become -inf
        (selected, never multiplied, so NaN in masked positions disappears)."""
        if tok0 + PAGE > self.min_limit:
            for k in cutlass.range_constexpr(cute.size(acc_s)):
                _, tok = tScS[k]
                if tok0 + tok >= self.row_limit[(k // 2) % 2]:
                    acc_s[k] = -Float32.inf


class KvLoads(NamedTuple):
    """What a warp needs to TMA a page's tiles into a buffer (``load_tiles``)."""

    atom: Any  # the TMA copy atom of k_cache's 64-column tiles
    tma: Any  # k_cache as the TMA's coordinate tensor
    block_table: Any  # (b, max_blocks) page ids
    sK: Any  # the two page buffers
    bars: TileBarriers
    rank: Any = 0  # in a cluster: this CTA's rank
    peer_phase: Any = None  # in a cluster: (2,) Int32, the next peer-barrier phase of each buffer


class BlockCtx(NamedTuple):
    """The seesaw hooks' context for one pair of blocks of one request."""

    loads: KvLoads
    hk: Any  # kv head
    next_blocks: Any  # ((request, block, exists) for buffer 0, for buffer 1): what to load next
    phase: Any  # tile-barrier phase of this warpgroup's buffer
    mask: KeyMask  # the keys this thread's rows attend to
    seqlen: Any  # the request's (clamped) length


class DenseDecodeSm90(SeesawConsumers, SplitKvDecodeSm90):
    """Dense MLA decode: O = softmax(Q K^T * scale) V with V = K[:, :512], one kv head at a time.

    Grid: (num_sm_parts, h_kv, ceil(s_q * h_q / h_kv / 64)) split tiles, taken by ticket
    (``kernels.sm90.split_tickets``): a tile owns 64 query rows (row m = query token
    m // h_r, head m % h_r of the kv head's h_r = h_q / h_kv) and walks the (request, KV
    block range, split) pieces its part of ``sched_meta`` lists.  Once every tile is taken,
    the CTAs' later tickets merge the split requests' rows, so a call is one launch.

    Two warpgroups and no producer warpgroup: the seesaw consumers of
    ``kernels.sm90.seesaw`` (the per-pair schedule is described there), with the pages
    of buffer w in the K-major (token, 576) layout whose RoPE tile holds the block's P.

    Loads: every page arrives as 9 column tiles (TMA, one mbarrier each).  A tile is
    reloaded, with the block two ahead (or the next piece's first blocks), by the
    warpgroup that last reads it, right after that read: wg 0 reloads V_L tiles 0-3 of
    both buffers and the P tile of buffer 1, wg 1 the V_R tiles 4-7 of both and the P
    tile of buffer 0.  A page's P tile is free once S of it is done, because V reads
    only columns 0..511.  S waits tile by tile, so it starts on the tiles freed first.

    Clusters (``cluster_rows`` n > 1): the n CTAs of row blocks nk .. nk + n - 1 read the
    same pages, so each page is loaded once for all of them.  At each reload point every
    CTA tells the others its copy of the tiles is read, waits until they have said the same,
    then issues its share of the tiles by TMA multicast into all n (``share_tiles``).  Without
    it each row block's CTA read every page through L2 itself: twice FlashMLA's L2 lookups at
    h_q 128 (perf/results/NOTES.md, session 15).  Tickets are then the cluster's.

    Named barriers: ``NamedBarrier`` Q_RELOAD / ROW_SUM among all 256 threads,
    ``NamedBarrier`` MAX_0 / MAX_1 / P_0 / P_1 (one warpgroup arrives, the other
    syncs) and TAIL (warpgroup-local).  Tokens past a request's length are masked by
    selection before the softmax and their V rows are zeroed in shared memory before
    P V, so NaN there never reaches an output.

    Output: a request computed in one split is finalised here (O / sum, natural-log
    lse; no valid key gives O = 0, lse = +inf); otherwise each split writes fp32 O and
    its base-2 lse to the partial buffers, counts itself, and a merge chunk later
    finalises the rows (``combine.merge_row``).
    """

    threads = 256
    consumer_threads = 256
    regs_producer = 0  # no producer warpgroup and no setmaxnreg: 256 threads may use 255
    regs_consumer = 255  # registers each (only the base class's launch-budget check reads these)

    def __init__(self, dtype: str, d_qk: int = 576, cluster_rows: int = 1):
        """``cluster_rows`` n > 1: the CTAs of row blocks nk .. nk + n - 1 of a part run as one
        cluster and load every page once between them, each issuing its share of a page's
        tiles by TMA multicast into all (``share_tiles``); the plan picks it when a kv head's
        row blocks divide into such groups (``plans.dense_cluster_rows``)."""
        super().__init__(dsl_dtype(dtype), d_qk)
        assert cluster_rows in (1, 2, 4)
        self.cluster_rows = cluster_rows
        self.cluster = (1, 1, cluster_rows)
        assert d_qk == TILES * COLUMN_TILE and D_V == 2 * len(V_LEFT) * COLUMN_TILE
        self.tile_elems = PAGE * COLUMN_TILE
        self.tile_bytes = self.tile_elems * self.dtype.width // 8
        # sQ + two pages + (row statistics, maxima, 18 mbarriers, 2 ticket slots); no P buffer.
        self.smem_bytes = self.q_bytes + 2 * self.kv_bytes + 2048
        # Tiles each warpgroup reloads in each buffer (see the class docstring).
        self.reload_tiles = ((V_LEFT, V_RIGHT + (P_TILE,)), (V_LEFT + (P_TILE,), V_RIGHT))  # [buffer][warpgroup]

    @cute.jit
    def __call__(self, q: cute.Tensor, k_cache: cute.Tensor, block_table: cute.Tensor, cache_seqlens: cute.Tensor,
                 sched_meta: cute.Tensor, split_offsets: cute.Tensor, out: cute.Tensor, lse: cute.Tensor,
                 o_accum: cute.Tensor, lse_accum: cute.Tensor, split_counters: cute.Tensor, softmax_scale: Float32,
                 causal: Int32, heads_per_kv: Int32, stream: cuda.CUstream):
        # q (b, s_q, h_q, d); k_cache (num_blocks, PAGE, h_kv, d); out (b, s_q, h_q, 512); lse (b, h_q, s_q)
        kv_atom, mKTma = make_kv_column_tma(k_cache, self.dtype)
        rows = q.shape[1] * heads_per_kv
        grid = [sched_meta.shape[0], k_cache.shape[2], cute.ceil_div(rows, BLOCK_M)]
        self.kernel(q, kv_atom, mKTma, block_table, cache_seqlens, sched_meta, split_offsets,
                    out, lse, o_accum, lse_accum, split_counters, softmax_scale, causal, heads_per_kv,
                    self.q_smem_layout(), kv_smem_layout(self.dtype, self.d, 2), self.v_smem_layout(),
                    self.p_smem_layout()).launch(
            grid=grid, block=[self.threads, 1, 1], cluster=list(self.cluster), smem=self.smem_bytes, stream=stream,
            min_blocks_per_mp=1)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, kv_atom: cute.CopyAtom, mKTma: cute.Tensor, mBlockTable: cute.Tensor,
               mSeqlens: cute.Tensor, mSchedMeta: cute.Tensor, mSplitOffsets: cute.Tensor, mOut: cute.Tensor,
               mLse: cute.Tensor, mOAccum: cute.Tensor, mLseAccum: cute.Tensor, mCounters: cute.Tensor,
               softmax_scale: Float32, causal: Int32, heads_per_kv: Int32,
               sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout, sV_layout: cute.ComposedLayout,
               sP_layout: cute.ComposedLayout):
        # Parameters in layouts.operands.dense_decode_args order; static objects (no parameter) last.
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())

        smem = cutlass.memory.SmemAllocator()
        sQ, sK, _, sStat = self.allocate_operands(smem, sQ_layout, sK_layout)  # P lives in the pages' RoPE tiles
        sMax = smem.allocate_tensor(Float32, cute.make_layout((2, BLOCK_M)), byte_alignment=16)
        bars = TileBarriers.create(smem, self.cluster_rows)
        sTicket = smem.allocate_tensor(Int32, cute.make_layout(2), byte_alignment=8)
        if cutlass.const_expr(self.cluster_rows == 1):
            tickets = SplitTickets.create(mCounters, sTicket, mOut.shape[0], self.consumer_threads)
        else:
            tickets = ClusterTickets.create(mCounters, sTicket, mOut.shape[0], self.consumer_threads, self.cluster_rows)
        first = tickets.reserve(tidx)  # its round trip overlaps the set-up below
        if tidx == 0:
            bars.init()
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()
        if warp == 0:
            cpasync.prefetch_descriptor(kv_atom)

        if cutlass.const_expr(self.cluster_rows == 1):
            loads = KvLoads(kv_atom, mKTma, mBlockTable, sK, bars)
        else:
            peer_phase = cute.make_rmem_tensor(cute.make_layout(2), Int32)
            peer_phase[0] = Int32(0)
            peer_phase[1] = Int32(0)
            loads = KvLoads(kv_atom, mKTma, mBlockTable, sK, bars, tickets.rank, peer_phase)
        if warp < 4:
            self.consume(sQ, sK, sStat, sMax, sV_layout, sP_layout, loads, tickets, first, mQ, mSeqlens, mSchedMeta,
                         mSplitOffsets, mOut, mLse, mOAccum, mLseAccum, softmax_scale, causal, heads_per_kv, tidx, 0)
        else:
            self.consume(sQ, sK, sStat, sMax, sV_layout, sP_layout, loads, tickets, first, mQ, mSeqlens, mSchedMeta,
                         mSplitOffsets, mOut, mLse, mOAccum, mLseAccum, softmax_scale, causal, heads_per_kv, tidx, 1)

    # ------------------------------------------------------------------ loads
    @cute.jit
    def seqlen_of(self, mSeqlens: cute.Tensor, max_blocks: Int32, r: Int32) -> Int32:
        """Request r's length, clamped to what its block table row can hold."""
        return clamped_seqlen(mSeqlens, r, max_blocks * PAGE)

    @cute.jit
    def load_tiles(self, loads, hk: Int32, r: Int32, blk: Int32, buf: cutlass.Constexpr[int],
                   tiles: cutlass.Constexpr):
        """One warp: TMA of ``tiles`` of block ``blk`` of request r into buffer ``buf``,
        each tile on its own mbarrier.  An out-of-range page id is harmless: TMA
        bounds-checks it, fills zeros and still completes the bytes."""
        kv_atom, mKTma, mBlockTable, sK, bars = loads.atom, loads.tma, loads.block_table, loads.sK, loads.bars
        page = mBlockTable[r, blk]
        sTiles = cute.flat_divide(sK, (PAGE, COLUMN_TILE))  # (PAGE, 64, 1, TILES, 2)
        for t in cutlass.range_constexpr(len(tiles)):
            tile = tiles[t]
            sT = sTiles[None, None, 0, tile, buf]
            gT = page_column_tile(mKTma, hk, page, tile)
            tKs, tKg = cpasync.tma_partition(kv_atom, 0, cute.make_layout(1), cute.group_modes(sT, 0, 2),
                                             cute.group_modes(gT, 0, 2))
            bar = bars.of(buf, tile)
            with cute.arch.elect_one():
                cute.arch.mbarrier_arrive_and_expect_tx(bar, self.tile_bytes)
            cute.copy(kv_atom, tKg, tKs, tma_bar_ptr=bar)

    @cute.jit
    def share_tiles(self, loads, hk: Int32, r: Int32, blk: Int32, buf: cutlass.Constexpr[int],
                    wg: cutlass.Constexpr[int]):
        """One warp, in a cluster: warpgroup ``wg``'s reload of block ``blk`` of request r into
        buffer ``buf``, shared with the other CTAs (which run the same code at the same point
        of the same tile).  Every CTA expects each tile's bytes on its own tile barriers and
        tells the others that its copy of the tiles is read; once all the others have said
        the same, each issues its share of the tiles by multicast into all.  A CTA waits only
        for the others to reach the point it has itself reached, and each one's arrival
        precedes its wait, so the cluster cannot deadlock where one CTA alone would not."""
        n = self.cluster_rows
        bars, rank, peer_phase = loads.bars, loads.rank, loads.peer_phase
        tiles = self.reload_tiles[buf][wg]
        page = loads.block_table[r, blk]  # its load overlaps the wait below
        with cute.arch.elect_one():
            for t in cutlass.range_constexpr(len(tiles)):
                cute.arch.mbarrier_arrive_and_expect_tx(bars.of(buf, tiles[t]), self.tile_bytes)
            for other in cutlass.range_constexpr(1, n):
                cute.arch.mbarrier_arrive(bars.peer_read(buf, wg, rank), peer_cta_rank_in_cluster=(rank + other) % n)
        for sender in cutlass.range_constexpr(n):
            if sender != rank:
                cute.arch.mbarrier_wait(bars.peer_read(buf, wg, sender), peer_phase[buf])
        peer_phase[buf] = peer_phase[buf] ^ 1
        desc = tma_desc_address(loads.atom)
        sTiles = cute.flat_divide(loads.sK, (PAGE, COLUMN_TILE))  # (PAGE, 64, 1, TILES, 2)
        # tile i of the set is issued by rank (i + buf) % n, so the sets of 5 tiles rotate ranks
        for owner in cutlass.range_constexpr(n):
            if rank == owner:
                with cute.arch.elect_one():
                    for t in cutlass.range_constexpr(len(tiles)):
                        if cutlass.const_expr((t + buf) % n == owner):
                            tile = tiles[t]
                            tma_load_4d_multicast(sTiles[None, None, 0, tile, buf].iterator.toint(), desc,
                                                  (tile * COLUMN_TILE, 0, hk, page), bars.of(buf, tile).toint(),
                                                  (1 << n) - 1)

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
            if cutlass.const_expr(self.cluster_rows == 1):
                self.load_tiles(loads, hk, r, blk, buf, self.reload_tiles[buf][wg])
            else:
                self.share_tiles(loads, hk, r, blk, buf, wg)

    # ------------------------------------------------------------------ seesaw hooks (ctx: a BlockCtx)
    @cute.jit
    def s_block(self, qk_mma: cute.TiledMma, acc_s: cute.Tensor, tSrQ: cute.Tensor, tSrK: cute.Tensor,
                tScS: cute.Tensor, ctx, buf: cutlass.Constexpr[int], blk: Int32):
        """S = Q K^T of the block in ``buf``, issued tile by tile as the tiles land, then masked."""
        for t in cutlass.range_constexpr(TILES):
            cute.arch.mbarrier_wait(ctx.loads.bars.of(buf, t), ctx.phase)
            warpgroup.fence()
            for kk in cutlass.range_constexpr(COLUMN_TILE // 16):
                k = t * (COLUMN_TILE // 16) + kk
                qk_mma.set(warpgroup.Field.ACCUMULATE, k != 0)
                cute.gemm(qk_mma, acc_s, tSrQ[None, None, k, 0], tSrK[None, None, k, buf], acc_s)
        warpgroup.commit_group()
        warpgroup.wait_group(0)
        ctx.mask.apply(acc_s, tScS, blk * PAGE)

    @cute.jit
    def skip_block(self, ctx, buf: cutlass.Constexpr[int]):
        pass  # nothing was loaded into the buffer of a missing odd block

    @cute.jit
    def prepare_v(self, sK: cute.Tensor, ctx, buf: cutlass.Constexpr[int], blk: Int32, wg: cutlass.Constexpr[int],
                  wtid: Int32):
        self.zero_tail(sK, buf, ctx.seqlen - blk * PAGE, wg, wtid)

    @cute.jit
    def release(self, ctx, buf: cutlass.Constexpr[int], wg: cutlass.Constexpr[int], wtid: Int32):
        """Reload this warpgroup's tiles of ``buf`` with the block two ahead."""
        self.reload(ctx.loads, ctx.hk, ctx.next_blocks[buf], buf, wg, wtid)

    @cute.jit
    def key_mask(self, row_limit: cute.Tensor, tScS: cute.Tensor, seqlen: Int32, causal: Int32, s_q: Int32,
                 hk: Int32, mblk: Int32, heads_per_kv: Int32) -> KeyMask:
        """The ``KeyMask`` of this thread's two rows for a request of ``seqlen`` tokens, its row
        limits written into ``row_limit``."""
        for h in cutlass.range_constexpr(2):
            row, _ = tScS[2 * h]
            row_limit[h] = seqlen
            if causal != 0:
                iq, _ = self.query_of_row(mblk * BLOCK_M + row, hk, heads_per_kv)
                row_limit[h] = causal_key_limit(seqlen, s_q, iq)
        return KeyMask(row_limit, cutlass.min(row_limit[0], row_limit[1]))

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
            named_barrier.sync(NamedBarrier.TAIL_0 + wg, 128)

    @cute.jit
    def p_tile(self, sK: cute.Tensor, sP_layout: cute.ComposedLayout, buf: cutlass.Constexpr[int]) -> cute.Tensor:
        """Page ``buf``'s P tile (its RoPE columns) as the (64 rows, 64 tokens) K-major A
        operand: the same bytes and swizzle as a (token, column) B tile."""
        return self.p_view(sK[None, None, buf].iterator + P_TILE * self.tile_elems, sP_layout)

    # ------------------------------------------------------------------ a warpgroup's work
    @cute.jit
    def pair(self, frags, acc_o: cute.Tensor, softmax: Softmax, rows, sK: cute.Tensor, loads: KvLoads, hk: Int32,
             next_blocks, phase: Int32, mask: KeyMask, seqlen: Int32, a: Int32, hi: Int32, wtid: Int32,
             wg: cutlass.Constexpr[int]):
        """This warpgroup's part of the pair of blocks (a, a + 1); returns its buffer's next
        tile-barrier phase.  (The context is built here, not in the caller's staged loop: the
        DSL carries plain tuples across a loop body, not NamedTuples.)"""
        ctx = BlockCtx(loads, hk, next_blocks, phase, mask, seqlen)
        self.step(frags, acc_o, softmax, rows, sK, ctx, a, hi, wtid, wg)
        # buffer 1 holds no block when the pair is a lone last block
        if cutlass.const_expr(wg == 0):
            phase = phase ^ 1
        elif a + 1 < hi:
            phase = phase ^ 1
        return phase

    @cute.jit
    def consume(self, sQ: cute.Tensor, sK: cute.Tensor, sStat: cute.Tensor, sMax: cute.Tensor,
                sV_layout: cute.ComposedLayout, sP_layout: cute.ComposedLayout, loads, tickets: SplitTickets,
                first: Int32, mQ: cute.Tensor, mSeqlens: cute.Tensor, mSchedMeta: cute.Tensor,
                mSplitOffsets: cute.Tensor, mOut: cute.Tensor, mLse: cute.Tensor, mOAccum: cute.Tensor,
                mLseAccum: cute.Tensor, softmax_scale: Float32, causal: Int32, heads_per_kv: Int32, tidx: Int32, wg: cutlass.Constexpr[int]):
        """Warpgroup ``wg``: the CTA's tickets (``split_tickets``; ``first`` reserved) in turn.  A
        split tile runs S of buffer ``wg``'s blocks and O columns [256 wg, 256 wg + 256)
        (``split_tile``); a merge chunk merges rows a warp at a time.  Each next ticket is
        reserved while the current one's work runs, so its round trip is hidden: during a
        split tile's last piece (not earlier: at the start a CTA could take a second tile
        before a late CTA took its first, and the two would run one after the other), during
        a merge chunk at once."""
        wtid = tidx % 128
        p_tiles = (self.p_tile(sK, sP_layout, 0), self.p_tile(sK, sP_layout, 1))
        frags, rows, tOcO = self.seesaw_fragments(sQ, sK, sMax, sV_layout, p_tiles, wg, wtid)
        phase = Int32(0)  # of this warpgroup's buffer's tile barriers
        draw = Int32(0)
        work, splits = tickets.work, tickets.split_tickets  # (the DSL carries no object through a loop condition)
        t = tickets.hand_out(first, draw, tidx)
        while t < work:
            draw += 1
            if t < splits:
                part, hk, mblk = tickets.split_tile(t)
                phase, next_ticket = self.split_tile(frags, rows, tOcO, sQ, sK, sStat, loads, tickets, mQ, mSeqlens,
                                                     DecodePart(mSchedMeta, mSplitOffsets, part), mOut, mLse, mOAccum,
                                                     mLseAccum, softmax_scale, causal, heads_per_kv, hk, mblk, phase,
                                                     tidx, wg)
                t = tickets.hand_out(next_ticket, draw, tidx)
            else:
                next_ticket = tickets.reserve(tidx)  # no split tile is left: nothing to hold from others
                tickets.merge_chunk(t, mSplitOffsets, mOAccum, mLseAccum, mOut, mLse, heads_per_kv, tidx)
                t = tickets.hand_out(next_ticket, draw, tidx)
        tickets.finish(draw, tidx)

    @cute.jit
    def split_tile(self, frags, rows, tOcO: cute.Tensor, sQ: cute.Tensor, sK: cute.Tensor, sStat: cute.Tensor,
                   loads, tickets: SplitTickets, mQ: cute.Tensor, mSeqlens: cute.Tensor, sched: DecodePart,
                   mOut: cute.Tensor, mLse: cute.Tensor, mOAccum: cute.Tensor, mLseAccum: cute.Tensor,
                   softmax_scale: Float32, causal: Int32, heads_per_kv: Int32, hk: Int32, mblk: Int32, phase: Int32,
                   tidx: Int32, wg: cutlass.Constexpr[int]):
        """Warpgroup ``wg``'s share of split tile (part ``sched``, kv head hk, row block mblk):
        every piece of the part, each finalised or written as a counted partial (``epilogue``).
        Returns its buffer's next tile-barrier phase and the next ticket, reserved as the last
        piece starts (``SplitTickets.reserve``)."""
        mBlockTable = loads.block_table
        wtid = tidx % 128
        fields = SeesawFragments(*frags)
        tScS = fields.tScS
        row_limit = cute.make_rmem_tensor(cute.make_layout(2), Int32)
        scale_log2 = softmax_scale * LOG2_E
        s_q = mQ.shape[1]
        max_blocks = mBlockTable.shape[1]

        begin_req = sched.begin_req()
        end_req = sched.end_req()
        prev_blocks = Int32(0)
        next_ticket = Int32(-1)
        for r in cutlass.range(begin_req, end_req + 1, unroll=1):
            if r == end_req:
                next_ticket = tickets.reserve(tidx)
            seqlen = self.seqlen_of(mSeqlens, max_blocks, r)
            lo, hi = sched.block_range(seqlen, r)
            split = sched.split_of(r, begin_req)
            nr = r + 1
            nlo, nhi = Int32(0), Int32(0)
            if nr <= end_req:
                nlo, nhi = sched.block_range(self.seqlen_of(mSeqlens, max_blocks, nr), nr)
            nxt = (nr, nlo, nhi, (nr <= end_req) & (nlo < nhi))
            # The previous piece's last pair already loaded this piece's first pair when both have blocks.
            if (prev_blocks <= 0) | (hi <= lo):
                self.reload(loads, hk, (r, lo, lo < hi), 0, wg, wtid)
                self.reload(loads, hk, (r, lo + 1, lo + 1 < hi), 1, wg, wtid)
            self.load_q(mQ, sQ, QTile(r, hk, mblk, heads_per_kv), tidx)

            mask = self.key_mask(row_limit, tScS, seqlen, causal, s_q, hk, mblk, heads_per_kv)
            acc_o, softmax = self.fresh_rows(fields.pv_reg.get_slice(wtid), scale_log2)
            for a in cutlass.range(lo, hi, 2, unroll=1):
                phase = self.pair(frags, acc_o, softmax, rows, sK, loads, hk, self.next_blocks(r, a, hi, nxt), phase,
                                  mask, seqlen, a, hi, wtid, wg)
            prev_blocks = hi - lo

            self.epilogue(acc_o, tOcO, softmax, sStat, mOut, mLse, mOAccum, mLseAccum, r, hk, mblk, heads_per_kv, wg,
                          sched.splits(r), sched.split_row(r, split), wtid, tickets=tickets)
        if next_ticket < 0:  # a part without pieces
            next_ticket = tickets.reserve(tidx)
        return phase, next_ticket
