"""What the SM90 split-KV decode kernels (dense and sparse) share: the work of a CTA.

A decode CTA owns 64 query rows of one kv head (row m = query token m // h_r, head
m % h_r, with h_r = h_q / h_kv query heads per kv head) and walks the pieces its part
of ``sched_meta`` lists (``DecodePart``; ``schedules.decode_plan``): (request, KV
blocks [lo, hi), split).  For each piece it loads Q, runs its consumer loop over the
blocks (dense: the seesaw of ``kernels.sm90.seesaw``; sparse: the split-S core of
``kernels.sm90.mla_consumers``), and either finalises the request (one split) or writes
the split's partial O and base-2 lse for the merge (dense decode: its own CTAs,
``kernels.sm90.split_tickets``; sparse decode: the combine kernel).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from cute_mla.kernels.common.fragment_store import store_row, store_row_pairs
from cute_mla.kernels.common.softmax import Softmax, output_lse, sink_denominator
from cute_mla.kernels.sm90.mla_consumers import TwoConsumerMlaSm90
from cute_mla.layouts.constants import (BLOCK_M, BLOCK_N, META_BEGIN_BLOCK, META_BEGIN_REQ, META_BEGIN_SPLIT,
                                        META_END_BLOCK, META_END_REQ)


@cute.jit
def query_of_row(m: Int32, hk: Int32, heads_per_kv: Int32):
    """Query row m of kv head hk -> (query token, q head): rows run over the kv head's h_r
    query heads fastest, then over the query tokens.  h_r is h_q / h_kv, except that sparse
    decode gives each query token whole row blocks (h_r = max(h_q, 64)), since its tokens
    gather different keys: with h_q < 64 rows h_q .. 63 of a block are no head
    (``SplitKvDecodeSm90.row_exists``)."""
    iq = m // heads_per_kv
    return iq, hk * heads_per_kv + (m - iq * heads_per_kv)


@dataclass(frozen=True)  # frozen: the DSL passes it through loops and branches as a constant
class DecodePart:
    """The tile scheduler of the split-KV decode kernels: one part of the schedule
    (``schedules.decode_plan``; grid ``schedules.grids.split_kv``).  A part visits requests
    ``begin_req()`` .. ``end_req()``, of each the KV blocks ``block_range`` gives, and writes its
    piece of a request as split ``split_of`` (partial row ``split_row``) when the request has more
    than one (``splits``)."""

    meta: Any  # sched_meta (parts, SCHED_META_FIELDS) int32
    split_offsets: Any  # (b + 1,) int32: request r's partial rows start at split_offsets[r]
    part: Any

    def begin_req(self) -> Int32:
        return self.meta[self.part, META_BEGIN_REQ]

    def end_req(self) -> Int32:
        """The last request (inclusive; below ``begin_req()`` in a part without pieces)."""
        return self.meta[self.part, META_END_REQ]

    @cute.jit
    def block_range(self, seqlen: Int32, r: Int32):
        """KV blocks [lo, hi) of request r (``seqlen`` tokens) that this part computes."""
        lo = Int32(0)
        hi = (seqlen + BLOCK_N - 1) // BLOCK_N
        if r == self.meta[self.part, META_BEGIN_REQ]:
            lo = self.meta[self.part, META_BEGIN_BLOCK]
        if r == self.meta[self.part, META_END_REQ]:
            hi = cutlass.min(hi, self.meta[self.part, META_END_BLOCK])
        return lo, hi

    @cute.jit
    def split_of(self, r: Int32, begin_req: Int32) -> Int32:
        """The split index of this part's piece of request r: a part's first request may have
        begun in an earlier part."""
        split = Int32(0)
        if r == begin_req:
            split = self.meta[self.part, META_BEGIN_SPLIT]
        return split

    def splits(self, r: Int32) -> Int32:
        """How many parts compute request r (1: it is finalised where it is computed)."""
        return self.split_offsets[r + 1] - self.split_offsets[r]

    def split_row(self, r: Int32, split: Int32) -> Int32:
        """The partial row of split ``split`` of request r."""
        return self.split_offsets[r] + split


class QTile(NamedTuple):
    """Which 64 query rows a decode CTA loads (``load_q`` / ``q_row``)."""

    request: Any
    kv_head: Any
    row_block: Any  # rows [64 row_block, 64 row_block + 64) of the kv head's s_q * h_r rows
    heads_per_kv: Any  # h_r: rows per query token (h_q / h_kv; sparse decode: max(h_q, 64))


class SplitKvDecodeSm90(TwoConsumerMlaSm90):
    """Base of the SM90 decode kernels: piece bookkeeping, Q load and the split-aware
    epilogue; subclasses own the producer and the per-block masking."""

    @cute.jit
    def query_of_row(self, m: Int32, hk: Int32, heads_per_kv: Int32):
        """``query_of_row`` (the module's function)."""
        return query_of_row(m, hk, heads_per_kv)

    @cute.jit
    def row_exists(self, m: Int32, hq: Int32, mOut: cute.Tensor, heads_per_kv: Int32):
        """Whether query row m (of q head hq, ``query_of_row``) is a real one: within the
        s_q * h_r rows and a head below h_q."""
        return (m < mOut.shape[1] * heads_per_kv) & (hq < mOut.shape[2])

    @cute.jit
    def q_row(self, mQ: cute.Tensor, where: QTile, row: Int32):
        """Row ``row`` of the CTA's Q tile (``load_q``), and whether it exists (``row_exists``;
        a missing row is zeros and never stored)."""
        m = where.row_block * BLOCK_M + row
        iq, hq = self.query_of_row(m, where.kv_head, where.heads_per_kv)
        return mQ[where.request, iq, hq, None], self.row_exists(m, hq, mQ, where.heads_per_kv)

    @cute.jit
    def epilogue(self, acc_o: cute.Tensor, tOcO: cute.Tensor, softmax: Softmax, sStat: cute.Tensor, mOut: cute.Tensor,
                 mLse: cute.Tensor, mOAccum: cute.Tensor, mLseAccum: cute.Tensor, r: Int32, hk: Int32, mblk: Int32,
                 heads_per_kv: Int32, half: Int32, nsplits: Int32, split_row: Int32, wtid: Int32,
                 mSink: cute.Tensor = None, has_sink: Int32 = 0, tickets=None, finished=None):
        """Finalise (one split) or write this split's partials (and, with ``tickets``, count
        them for the merge: ``kernels.sm90.split_tickets``).  With ``mSink`` a finalised row
        is scaled by exp(lse) / (exp(lse) + exp(sink)); split partials are left unscaled, the
        combine applies the sink once.  ``finished``: ``finish_rows``' result when the caller
        took it already."""
        neg_inf = -Float32.inf
        if cutlass.const_expr(finished is None):
            finished = self.finish_rows(softmax, tOcO, sStat, half, wtid)
        lse2, inv = finished
        # This thread's O values lie in 2 rows: (query token, q head, whether it exists) of each
        rows = []
        for h in cutlass.range_constexpr(2):
            row, _ = tOcO[2 * h]
            m = mblk * BLOCK_M + row
            iq, hq = self.query_of_row(m, hk, heads_per_kv)
            rows.append((iq, hq, self.row_exists(m, hq, mOut, heads_per_kv)))
        if cutlass.const_expr(mSink is not None):
            if nsplits == 1 and has_sink != 0:
                for h in cutlass.range_constexpr(2):
                    # a row without keys (lse2 = -inf) already has factor 0; a row past
                    # h_q reads the last head's sink and is never stored
                    _, hq, _ = rows[h]
                    if lse2[h] != neg_inf:
                        sink = mSink[cutlass.min(hq, mOut.shape[2] - 1)]
                        inv[h] = inv[h] / sink_denominator(sink, lse2[h], fastmath=False)
        # A finalised row goes out 16 bytes a lane (``fragment_store``: every lane shuffles,
        # rows that do not exist store nothing), a split's partial 8 bytes a lane.
        for h in cutlass.range_constexpr(2):
            iq, hq, exists = rows[h]
            if nsplits == 1:
                store_row(acc_o, h, inv[h], mOut[r, iq, hq, None], half * self.v_half, wtid, exists)
            elif exists:
                store_row_pairs(acc_o, h, inv[h], mOAccum[split_row, iq, hq, None], half * self.v_half, wtid)
        # one lane per row writes its lse (rows of a quad are shared by 4 lanes)
        if half == 0 and wtid % 4 == 0:
            for h in cutlass.range_constexpr(2):
                iq, hq, exists = rows[h]
                if exists:
                    if nsplits == 1:
                        mLse[r, hq, iq] = output_lse(lse2[h])
                    else:
                        mLseAccum[split_row, iq, hq] = lse2[h]
        if cutlass.const_expr(tickets is not None):
            if nsplits > 1:
                tickets.count_split(r, hk, mblk, half * 128 + wtid)
