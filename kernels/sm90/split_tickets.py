"""One launch per decode call: split-KV CTAs that also merge the splits (dense decode).

A dense decode call was two launches, the split kernel then the combine; on the H200 hosts a
launch costs 3.5-5.8 us of the call's ~21 (perf/results/NOTES.md, session 12).  Here the
split kernel's CTAs take their work from a ticket counter instead of their block index:

- ticket t < S, where S is the grid's size, is split tile t: (part, kv head, row block) with
  the part fastest, as the block index was;
- tickets S .. S + C - 1 are merge chunks.  Chunk c covers ``chunk_rows`` consecutive rows of
  the (request, kv head, row block, row) space; a row whose request has more than one split is
  merged there (``combine.merge_row``, one warp per row);
- every later ticket means "no work left": each CTA takes exactly one of those, and stops.

A CTA reserves its next ticket while the current one's work runs (``reserve`` / ``hand_out``),
so the atomic's round trip is hidden.

No CTA waits for a CTA that may never run, so this cannot deadlock even when the grid is not
all resident (other kernels, MPS): a merge chunk waits (spinning) until every split of its row
block has counted itself in ``split_counts``, but chunks are ticketed after every split tile,
so each split it waits for belongs to a CTA that is already running, and a split tile waits on
nothing.  Session 11's in-kernel merge, where the CTA that wrote a request's last split merged
all its rows alone, lost up to 2x at small batches (NOTES); chunks keep the merge as parallel
as the combine kernel's grid was.

The counters (``layouts.operands.split_counters``: the ticket, the finished CTAs, then one
count per (request, kv head, row block)) live in the decode workspace, zeroed when it is made.
The CTA that finishes last sets them back to zero, ready for the next launch on the stream:
each CTA, once its final ticket is drawn and all its work is done, adds itself to the finished
count (acquire-release at GPU scope), and the one that brings it to the grid's size knows that
no CTA still counts a split, waits on a count or draws a ticket.  (Session 13 let the CTA that
drew the launch's last ticket zero them; but tickets are reserved while work runs, so another
CTA could still be merging, waiting on counts that the zeroing took away; a wait bound of 2^22
polls hid it as a few seconds' delay, 2^28 made it a hang in the full test grid.)

In a cluster of n CTAs (dense decode's ``cluster_rows`` n: row blocks nk .. nk + n - 1 of a
part share every page by TMA multicast) a ticket is the cluster's: rank 0's thread 0 draws it
and stores it into every CTA's slots, and a cluster barrier hands it out.  Split ticket
t < S / n is the group of tiles (part, kv head, row blocks nk .. nk + n - 1), the CTA of rank
r taking row block nk + r; a chunk ticket c is chunks nc .. nc + n - 1, one a CTA.  So the
CTAs of a cluster walk the same pages at the same time, and every cluster draws one final
ticket.  The split counts and the finished count stay per CTA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cutlass
import cutlass.cute as cute
from cutlass import Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op

from cute_mla.kernels.common import named_barrier
from cute_mla.kernels.common.cluster import store_to_peer
from cute_mla.kernels.common.combine import merge_row, split_rows
from cute_mla.kernels.common.named_barrier import NamedBarrier
from cute_mla.layouts.constants import BLOCK_M, SPLIT_COUNTS, SPLIT_FINISHED, SPLIT_TICKET
from cute_mla.kernels.sm90.split_kv_decode import query_of_row

# A merge wait gives up after MAX_SPINS polls, each a SPIN_SLEEP_NS sleep and an L2 round trip
# (0.5-1 us): 2-4 minutes, far past the longest split tile a plan allows (one request of 2^31
# tokens, which a block table can give with repeated pages: about 2 s a part at the rate of the
# 1M-token case, 0.85 ms).  Only a schedule that is not the scheduler's own can leave a count
# short, and then the rows it merges are wrong but the kernel ends, rather than hanging.
SPIN_SLEEP_NS = 64
MAX_SPINS = 1 << 28
# A merge chunk's rows per warp at most (8 warps: 32 rows).  A merge ends about 2 us a row after
# its splits (three dependent L2 round trips); 128-row chunks added 15-20 us at b 128 h_q 128.
MAX_CHUNK_WARP_ROWS = 4


@dsl_user_op
def nanosleep(ns, *, loc=None, ip=None) -> None:
    """Suspend the calling thread for about ``ns`` nanoseconds (``nanosleep.u32``)."""
    llvm.inline_asm(None, [Int32(ns).ir_value(loc=loc, ip=ip)], "nanosleep.u32 $0;", "r",
                    has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)


def grid_schedule(batch, threads: int):
    """(gx, gy, gz, split tiles, rows the chunks cover, rows a chunk, chunks) of a launch of
    ``cute.arch.grid_dim()`` CTAs of ``threads`` threads over ``batch`` requests."""
    gx, gy, gz = cute.arch.grid_dim()
    splits = gx * gy * gz
    total_rows = batch * gy * gz * BLOCK_M
    warps = threads // 32
    # About one chunk a CTA, but at most MAX_CHUNK_WARP_ROWS rows a warp: the chunk of the
    # split that ends last is merged after everything else, by one CTA (b 5: 8-row chunks)
    per_cta = warps * splits
    chunk_rows = warps * cutlass.min((total_rows + per_cta - 1) // per_cta, MAX_CHUNK_WARP_ROWS)
    return gx, gy, gz, splits, total_rows, chunk_rows, (total_rows + chunk_rows - 1) // chunk_rows


@dataclass(frozen=True)  # frozen: the DSL then passes it through loops and branches as a constant
class SplitTickets:
    """The ticket schedule of one launch, as every CTA sees it (module docstring)."""

    counters: Any  # (SPLIT_COUNTS + b * h_kv * row_blocks,) int32 (``layouts.operands.split_counters``)
    slots: Any  # (2,) int32 shared: where a taken ticket is handed to every thread
    gx: Any  # the grid: parts, kv heads, row blocks
    gy: Any
    gz: Any
    threads: int  # the CTA's threads, all of which take part
    splits: Any  # split tiles (the grid's CTAs)
    total_rows: Any  # rows of the (request, kv head, row block, row) space the chunks cover
    chunk_rows: Any  # rows a merge chunk covers
    work: Any  # tickets [0, split_tickets) are split tiles, [split_tickets, work) merge chunks

    @staticmethod
    def create(counters: cute.Tensor, slots: cute.Tensor, batch, threads: int) -> "SplitTickets":
        """The schedule of a launch of ``cute.arch.grid_dim()`` CTAs over ``batch`` requests."""
        gx, gy, gz, splits, total_rows, chunk_rows, chunks = grid_schedule(batch, threads)
        return SplitTickets(counters, slots, gx, gy, gz, threads, splits, total_rows, chunk_rows, splits + chunks)

    @property
    def split_tickets(self):
        return self.splits

    @cute.jit
    def reserve(self, tidx: Int32) -> Int32:
        """Thread 0 takes a ticket (the others get 0); ``hand_out`` gives it to every thread.
        Between the two the CTA may work: the atomic's round trip then costs nothing."""
        counter = self.counters.iterator + SPLIT_TICKET  # (the DSL carries no object through an if)
        ticket = Int32(0)
        if tidx == 0:
            ticket = cute.arch.atomic_add(counter, Int32(1), sem="relaxed", scope="gpu")
        return ticket

    @cute.jit
    def hand_out(self, ticket: Int32, draw: Int32, tidx: Int32) -> Int32:
        """Thread 0's ``reserve``d ticket, the CTA's ``draw``-th, in every thread."""
        return self.broadcast(ticket, draw, tidx)

    @cute.jit
    def broadcast(self, value: Int32, draw: Int32, tidx: Int32) -> Int32:
        """Thread 0's ``value`` in every thread of the CTA, through slot ``draw % 2``."""
        slots = self.slots
        if tidx == 0:
            slots[draw % 2] = value
        # one barrier a draw: a slot is rewritten two draws later, after everyone read it
        named_barrier.sync(NamedBarrier.SPLIT_WORK, self.threads)
        return slots[draw % 2]

    def split_tile(self, t: Int32):
        """(part, kv head, row block) of split ticket t."""
        rest = t // self.gx
        return t - rest * self.gx, rest % self.gy, rest // self.gy

    def chunk_start(self, t: Int32):
        """The first row of chunk ticket t."""
        return (t - self.splits) * self.chunk_rows

    def count_of(self, r: Int32, hk: Int32, mblk: Int32):
        """Pointer to the split count of (request r, kv head hk, row block mblk)."""
        return self.counters.iterator + (SPLIT_COUNTS + (r * self.gy + hk) * self.gz + mblk)

    @cute.jit
    def count_split(self, r: Int32, hk: Int32, mblk: Int32, ctid: Int32):
        """Every consumer thread: this CTA's split of (r, hk, mblk) is stored; count it.  Once
        every thread has stored its rows (the barrier), one thread adds the count with release
        semantics at GPU scope, which orders the whole CTA's stores before it (PTX's
        cumulativity: CUTLASS's split-K semaphore releases the same way), so a merge that sees
        the count sees the rows."""
        ptr = self.count_of(r, hk, mblk)
        named_barrier.sync(NamedBarrier.SPLIT_WORK, self.threads)
        if ctid == 0:
            cute.arch.red(ptr, Int32(1), op="add", dtype="s32", sem="release", scope="gpu")

    @cute.jit
    def wait_counted(self, r: Int32, hk: Int32, mblk: Int32, n: Int32, tidx: Int32):
        """Every thread: return once the n splits of (r, hk, mblk) have counted themselves."""
        ptr = self.count_of(r, hk, mblk)
        if tidx == 0:
            spins = Int32(0)
            count = cute.arch.load(ptr, Int32, sem="acquire", scope="gpu")
            while (count < n) & (spins < MAX_SPINS):
                nanosleep(SPIN_SLEEP_NS)
                spins += 1
                count = cute.arch.load(ptr, Int32, sem="acquire", scope="gpu")
        # thread 0's acquire, then the barrier, orders every thread's reads of the rows after it
        named_barrier.sync(NamedBarrier.SPLIT_WORK, self.threads)

    @cute.jit
    def merge_chunk(self, t: Int32, mSplitOffsets: cute.Tensor, mOAccum: cute.Tensor,
                    mLseAccum: cute.Tensor, mOut: cute.Tensor, mLse: cute.Tensor, heads_per_kv: Int32, tidx: Int32):
        """Merge the split rows of chunk ticket t, a warp per row (a chunk starting past the
        last row is empty)."""
        g0 = self.chunk_start(t)
        g1 = cutlass.min(g0 + self.chunk_rows, self.total_rows)
        warp = tidx // 32
        lane = tidx % 32
        rows = mOut.shape[1] * heads_per_kv
        for blk in cutlass.range(g0 // BLOCK_M, (g1 - 1) // BLOCK_M + 1, unroll=1):
            rest = blk // self.gz
            mblk = blk - rest * self.gz
            r = rest // self.gy
            hk = rest - r * self.gy
            start, n = split_rows(mSplitOffsets, mOAccum, r)
            if n > 1:  # the same in every thread: the barrier inside is reached by all
                self.wait_counted(r, hk, mblk, n, tidx)
                first = cutlass.max(g0, blk * BLOCK_M)
                for g in cutlass.range(first + warp, cutlass.min(g1, blk * BLOCK_M + BLOCK_M), self.threads // 32,
                                       unroll=1):
                    m = g - (blk - mblk) * BLOCK_M
                    if m < rows:
                        iq, hq = query_of_row(m, hk, heads_per_kv)
                        merge_row(mOAccum, mLseAccum, None, mOut, mLse, Int32(0), start, n, r, iq, hq, lane)

    @cute.jit
    def finish(self, draw: Int32, tidx: Int32):
        """Every thread, after the CTA's final ticket (its ``draw``-th) with all its work done:
        count the CTA finished; the CTA that finishes last zeroes the counters (module
        docstring).  Thread 0 made every counter access of the CTA, so its acquire-release add
        orders them before the count, and the last CTA's zeroing after everyone's."""
        done = Int32(0)
        if tidx == 0:
            done = cute.arch.atomic_add(self.counters.iterator + SPLIT_FINISHED, Int32(1), sem="acq_rel", scope="gpu")
        done = self.broadcast(done, draw + 1, tidx)
        if done == self.splits - 1:
            counters = self.counters
            for i in cutlass.range(tidx, cute.size(counters), self.threads, unroll=1):
                counters[i] = 0


@dataclass(frozen=True)  # frozen: the DSL then passes it through loops and branches as a constant
class ClusterTickets(SplitTickets):
    """The schedule shared by the CTAs of a cluster along z (module docstring): rank 0 draws,
    a cluster barrier hands out, the CTA of rank r takes row block n k + r of a split ticket
    and chunk n c + r of a chunk ticket."""

    cluster: int = 2  # the CTAs a ticket is shared by
    rank: Any = 0  # this CTA's rank in its cluster

    @staticmethod
    def create(counters: cute.Tensor, slots: cute.Tensor, batch, threads: int, cluster: int) -> "ClusterTickets":
        gx, gy, gz, splits, total_rows, chunk_rows, chunks = grid_schedule(batch, threads)
        _, _, rank = cute.arch.block_in_cluster_idx()
        work = splits // cluster + (chunks + cluster - 1) // cluster
        return ClusterTickets(counters, slots, gx, gy, gz, threads, splits, total_rows, chunk_rows, work, cluster,
                              cute.arch.make_warp_uniform(rank))

    @property
    def split_tickets(self):
        return self.splits // self.cluster

    @cute.jit
    def reserve(self, tidx: Int32) -> Int32:
        """Thread 0 of the cluster's rank 0 takes a ticket (every other thread gets 0)."""
        counter = self.counters.iterator + SPLIT_TICKET
        ticket = Int32(0)
        if (tidx == 0) & (self.rank == 0):
            ticket = cute.arch.atomic_add(counter, Int32(1), sem="relaxed", scope="gpu")
        return ticket

    @cute.jit
    def hand_out(self, ticket: Int32, draw: Int32, tidx: Int32) -> Int32:
        """Rank 0's ``reserve``d ticket, the cluster's ``draw``-th, in every thread of the cluster."""
        slots = self.slots
        if (tidx == 0) & (self.rank == 0):
            slots[draw % 2] = ticket
            for peer in cutlass.range_constexpr(1, self.cluster):
                store_to_peer(slots.iterator.toint() + 4 * (draw % 2), Int32(peer), ticket)
            cute.arch.fence_acq_rel_cluster()  # the stores, before the barrier's relaxed arrive
        # A cluster barrier a draw, the writer's fence releasing and the wait acquiring (a
        # release arrive in every thread cost a MEMBAR.ALL.GPU each).  A slot is rewritten two
        # draws later, after every thread of the cluster read it.  It also publishes the
        # mbarriers' initialisation (``fence.mbarrier_init``) before the first draw.
        cute.arch.cluster_arrive_relaxed()
        cute.arch.cluster_wait()
        return slots[draw % 2]

    def split_tile(self, t: Int32):
        rest = t // self.gx
        return t - rest * self.gx, rest % self.gy, (rest // self.gy) * self.cluster + self.rank

    def chunk_start(self, t: Int32):
        return ((t - self.split_tickets) * self.cluster + self.rank) * self.chunk_rows
