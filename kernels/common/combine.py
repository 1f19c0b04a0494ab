"""Split-KV combine: merge partial attention outputs by their log-sum-exp.

Architecture-neutral (plain loads/stores, warp shuffles), so it is compiled for
every target.
"""
from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from cute_mla.kernels.common.softmax import LN_2, sink_denominator
from cute_mla.layouts.constants import COMBINE_HEADS_PER_CTA, D_V

CHUNKS = D_V // 128  # 128-column chunks of a row: float4s a lane (``merge_row``), warps a row (the combine)
# Partial-row float4 loads a combine lane keeps in flight: one batch covers the 4 splits a row of
# the small-head plans at b 32, the 16-17 of sparse decode at b 2.
IN_FLIGHT = 16
assert IN_FLIGHT <= 32  # a lane of the warp weighs each split of a batch (``add_columns``)


def lane_columns():
    """(4, 32, CHUNKS) view of a 512-wide row: lane l owns columns [4 l + 128 j, + 4) of chunk j,
    so each of a warp's loads and stores of a chunk is one coalesced 512-byte line."""
    return cute.make_layout((4, 32, CHUNKS), stride=(1, 4, 128))
# Rows of at most this many splits take ``accumulate_serial``, the others
# ``accumulate_broadcast`` (same run, H200, session 12: broadcast 7-9% slower at 2 splits
# a row (b128: 29.4-29.9 us against 27.6-28.0), as fast at 4, 2-4% faster at 8).
SERIAL_SPLITS = 2


class CombineKernel:
    """Finalise attention rows from split-KV partials.

    Work split, by variant (``columns``; ``schedules.grids.combine_columns`` picks it from the
    call's row count):
      0  one warp a (request, query token, head) row (``merge_row``): a CTA of
         ``COMBINE_HEADS_PER_CTA`` warps covers that many heads of one (request, query token);
         grid (ceil(h_q / 4), s_q, b);
      1  one CTA a row, warp w its 128 columns [128 w, 128 w + 128) (``merge_columns``); grid
         (h_q, s_q, b).  A warp keeps ``IN_FLIGHT`` splits' loads of its columns in flight and
         issues the first ones before it reads the splits' lse, so a row of up to ``IN_FLIGHT``
         splits costs one round trip to L2 after the split counts.  Four times the warps for
         the same rows: it wins where the rows are too few to fill the GPU (the b 2 and b 32
         small-head plans; ``COMBINE_COLUMNS_MAX_ROWS`` has the measurement).

    Per row, with n = the request's split count and lse2_i the partials' base-2 lse:
      lse2 = log2(sum_i exp2(lse2_i)),  O = sum_i exp2(lse2_i - lse2) * O_i.
    Splits with lse2_i = -inf (no valid key) never reach the sum (variant 1 loads their rows,
    inside the partials buffer, and drops them), so whatever those rows hold cannot leak.  A
    row with no valid key at all becomes O = 0, lse = +inf.  The attention sink scales O by
    1 / (1 + exp(sink - lse)), here and nowhere else, so it is applied exactly once.

    Launched as a programmatic dependent (PDL) of the split kernel: everything before
    ``griddepcontrol_wait`` overlaps the producer's tail.
    """

    def __init__(self, dtype: str, columns: int = 0):
        # ``dtype`` (the variant) types the ``out`` operand of the ABI; the kernel reads it there
        # (the merges convert to ``mOut.element_type``), so nothing here keeps it
        self.columns = bool(columns)
        self.heads_per_cta = 1 if self.columns else COMBINE_HEADS_PER_CTA
        self.threads = 32 * (CHUNKS if self.columns else COMBINE_HEADS_PER_CTA)
        self.smem_bytes = 0

    @cute.jit
    def __call__(self, o_accum: cute.Tensor, lse_accum: cute.Tensor, split_offsets: cute.Tensor,
                 attn_sink: cute.Tensor, out: cute.Tensor, lse: cute.Tensor,
                 skip_single_split: Int32, has_sink: Int32, stream: cuda.CUstream):
        b, s_q, h_q = out.shape[0], out.shape[1], out.shape[2]
        self.kernel(o_accum, lse_accum, split_offsets, attn_sink, out, lse, skip_single_split, has_sink).launch(
            grid=[cute.ceil_div(h_q, self.heads_per_cta), s_q, b],
            block=[self.threads, 1, 1],
            stream=stream,
            use_pdl=True,
        )

    @cute.kernel
    def kernel(self, mOAccum: cute.Tensor, mLseAccum: cute.Tensor, mSplitOffsets: cute.Tensor,
               mSink: cute.Tensor, mOut: cute.Tensor, mLse: cute.Tensor,
               skip_single_split: Int32, has_sink: Int32):
        # mOAccum (n_splits, s_q, h_q, d_v) f32, mLseAccum (n_splits, s_q, h_q) f32 (log2)
        # mOut (b, s_q, h_q, d_v), mLse (b, h_q, s_q) f32 (natural log)
        lane = cute.arch.lane_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        hblk, iq, ib = cute.arch.block_idx()
        h = hblk
        if cutlass.const_expr(not self.columns):
            h = hblk * self.heads_per_cta + warp
        h_q = mOut.shape[2]

        # Everything above is independent of the producer; partials are read only after it.
        cute.arch.griddepcontrol_wait()
        if h < h_q:
            start, n = split_rows(mSplitOffsets, mOAccum, ib)
            if not (skip_single_split != 0 and n == 1):
                if cutlass.const_expr(self.columns):
                    merge_columns(mOAccum, mLseAccum, mSink, mOut, mLse, has_sink, start, n, ib, iq, h, lane, warp)
                else:
                    merge_row(mOAccum, mLseAccum, mSink, mOut, mLse, has_sink, start, n, ib, iq, h, lane)


@cute.jit
def split_rows(mSplitOffsets: cute.Tensor, mOAccum: cute.Tensor, ib: Int32):
    """(first partial row, split count) of request ib, clamped into the partials buffer: no
    schedule, however wrong, makes a merge read outside it."""
    rows = mOAccum.shape[0]
    start = cutlass.min(cutlass.max(mSplitOffsets[ib], 0), rows)
    return start, cutlass.min(cutlass.max(mSplitOffsets[ib + 1], start), rows) - start


@cute.jit
def merge_row(mOAccum: cute.Tensor, mLseAccum: cute.Tensor, mSink, mOut: cute.Tensor, mLse: cute.Tensor,
              has_sink: Int32, start: Int32, n: Int32, ib: Int32, iq: Int32, h: Int32, lane: Int32):
    """One warp: merge the n partial rows ``start ..`` of (query token iq, head h) into row
    (ib, iq, h) of out and lse, by the formulas of ``CombineKernel`` (the sink only when
    ``mSink`` is a tensor and ``has_sink`` is set).  The dense decode kernel's own merge chunks
    (``kernels.sm90.split_tickets.SplitTickets.merge_chunk``) and the combine kernel's variant 0
    run it."""
    neg_inf = -Float32.inf
    lse2 = row_lse2(mLseAccum, start, n, iq, h, lane)

    row_layout = lane_columns()
    acc = cute.make_rmem_tensor(cute.make_layout((4, CHUNKS), stride=(1, 4)), Float32)
    acc.fill(0.0)
    if lse2 != neg_inf:
        if n <= SERIAL_SPLITS:
            accumulate_serial(mOAccum, mLseAccum, acc, row_layout, lse2, start, n, iq, h, lane)
        else:
            accumulate_broadcast(mOAccum, mLseAccum, acc, row_layout, lse2, start, n, iq, h, lane)

    write_merged(acc, mSink, has_sink, lse2, mOut, mLse, ib, iq, h, lane, None)


@cute.jit
def row_lse2(mLseAccum: cute.Tensor, start: Int32, n: Int32, iq: Int32, h: Int32, lane: Int32) -> Float32:
    """One warp: the base-2 lse of (query token iq, head h) over its n partials ``start ..``
    (lanes striding over splits); -inf when every split is empty."""
    neg_inf = -Float32.inf
    m = neg_inf
    for i in cutlass.range(lane, n, 32):
        m = cute.arch.fmax(m, mLseAccum[start + i, iq, h])
    m = cute.arch.warp_reduction_max(m)
    lse2 = neg_inf
    if m != neg_inf:
        s = Float32(0.0)
        for i in cutlass.range(lane, n, 32):
            s += cute.math.exp2(mLseAccum[start + i, iq, h] - m, fastmath=True)
        s = cute.arch.warp_reduction_sum(s)
        lse2 = m + cute.math.log2(s, fastmath=False)
    return lse2


@cute.jit
def write_merged(acc: cute.Tensor, mSink, has_sink: Int32, lse2: Float32, mOut: cute.Tensor, mLse: cute.Tensor,
                 ib: Int32, iq: Int32, h: Int32, lane: Int32, chunk):
    """Finish a merged row of base-2 lse ``lse2`` and write it: lse = +inf and O = 0 for a row
    without a valid key, else the natural-log lse and O = ``acc`` (scaled by 1 /
    ``sink_denominator`` with the sink: ``mSink`` a tensor and ``has_sink`` set).  ``acc`` holds
    this lane's columns (``lane_columns``) of every chunk (``chunk`` None; lane 0 writes the lse)
    or of chunk ``chunk`` (lane 0 of chunk 0 writes it)."""
    lse_out = Float32.inf
    scale = Float32(0.0)
    if lse2 != -Float32.inf:
        lse_out = lse2 * LN_2
        scale = Float32(1.0)
        if cutlass.const_expr(mSink is not None):
            if has_sink != 0:
                scale = 1.0 / sink_denominator(mSink[h], lse2, fastmath=True)
    res = cute.make_rmem_tensor_like(acc, mOut.element_type)
    for k in cutlass.range_constexpr(cute.size(acc)):
        res[k] = (acc[k] * scale).to(mOut.element_type)
    gOutRow = cute.make_tensor(mOut[ib, iq, h, None].iterator, lane_columns())
    if cutlass.const_expr(chunk is None):
        cute.autovec_copy(res, gOutRow[None, lane, None])
        if lane == 0:
            mLse[ib, h, iq] = lse_out
    else:
        cute.autovec_copy(res, gOutRow[None, lane, chunk])
        if chunk == 0 and lane == 0:
            mLse[ib, h, iq] = lse_out


@cute.jit
def merge_columns(mOAccum: cute.Tensor, mLseAccum: cute.Tensor, mSink, mOut: cute.Tensor, mLse: cute.Tensor,
                  has_sink: Int32, start: Int32, n: Int32, ib: Int32, iq: Int32, h: Int32, lane: Int32,
                  chunk: Int32):
    """One warp of the combine: columns [128 chunk, 128 chunk + 128) of row (ib, iq, h), merged
    from its n partial rows ``start ..`` as ``merge_row`` merges whole rows, ``IN_FLIGHT`` splits'
    loads at a time; the first batch is issued before the lse is reduced."""
    parts = cute.make_rmem_tensor(cute.make_layout((4, IN_FLIGHT)), Float32)
    load_columns(mOAccum, parts, start, 0, n, iq, h, lane, chunk)
    lse2 = row_lse2(mLseAccum, start, n, iq, h, lane)  # -inf when n is 0
    acc = cute.make_rmem_tensor(cute.make_layout(4), Float32)
    acc.fill(0.0)
    if lse2 != -Float32.inf:
        add_columns(mLseAccum, acc, parts, lse2, start, 0, n, iq, h, lane)
        for c0 in cutlass.range(IN_FLIGHT, n, IN_FLIGHT, unroll=1):
            load_columns(mOAccum, parts, start, c0, n, iq, h, lane, chunk)
            add_columns(mLseAccum, acc, parts, lse2, start, c0, n, iq, h, lane)
    write_merged(acc, mSink, has_sink, lse2, mOut, mLse, ib, iq, h, lane, chunk)


@cute.jit
def load_columns(mOAccum: cute.Tensor, parts: cute.Tensor, start: Int32, c0: Int32, n: Int32, iq: Int32, h: Int32,
                 lane: Int32, chunk: Int32):
    """parts[:, j] = this lane's 4 columns of chunk ``chunk`` of split c0 + j, for the splits
    c0 .. c0 + ``IN_FLIGHT`` below n: one 16-byte load each, all issued before any is used (the
    others are left as they are; ``add_columns`` never reads them)."""
    row_layout = lane_columns()
    for j in cutlass.range_constexpr(IN_FLIGHT):
        if c0 + j < n:
            gRow = cute.make_tensor(mOAccum[start + c0 + j, iq, h, None].iterator, row_layout)
            cute.autovec_copy(gRow[None, lane, chunk], parts[None, j])


@cute.jit
def add_columns(mLseAccum: cute.Tensor, acc: cute.Tensor, parts: cute.Tensor, lse2: Float32, start: Int32,
                c0: Int32, n: Int32, iq: Int32, h: Int32, lane: Int32):
    """acc += exp2(lse2_i - lse2) * O_i over the batch of splits c0 .. (``load_columns``): lane j
    weighs split c0 + j (0 when empty or past n), the warp broadcasts the weights by shuffles, and
    an empty split's columns are never added (NaN times 0 would be NaN)."""
    w_lane = Float32(0.0)
    if lane < IN_FLIGHT and c0 + lane < n:
        lse_i = mLseAccum[start + c0 + lane, iq, h]
        if lse_i != -Float32.inf:
            w_lane = cute.math.exp2(lse_i - lse2, fastmath=True)
    for j in cutlass.range_constexpr(IN_FLIGHT):
        w = cute.arch.shuffle_sync(w_lane, j)
        if w != 0.0:
            for k in cutlass.range_constexpr(4):
                acc[k] += w * parts[k, j]


@cute.jit
def accumulate_serial(mOAccum: cute.Tensor, mLseAccum: cute.Tensor, acc: cute.Tensor, row_layout,
                      lse2: Float32, start: Int32, n: Int32, iq: Int32, h: Int32, lane: Int32):
    """acc += exp2(lse2_i - lse2) * O_i split after split (each row load waits on its lse):
    the fewest instructions, for rows of few splits."""
    for i in cutlass.range(n):
        lse_i = mLseAccum[start + i, iq, h]
        if lse_i != -Float32.inf:  # an empty split's row (whatever it holds) is never read
            w = cute.math.exp2(lse_i - lse2, fastmath=True)
            gRow = cute.make_tensor(mOAccum[start + i, iq, h, None].iterator, row_layout)
            part = cute.make_rmem_tensor_like(acc)
            cute.autovec_copy(gRow[None, lane, None], part)
            for k in cutlass.range_constexpr(4 * CHUNKS):
                acc[k] += w * part[k]


@cute.jit
def accumulate_broadcast(mOAccum: cute.Tensor, mLseAccum: cute.Tensor, acc: cute.Tensor, row_layout,
                         lse2: Float32, start: Int32, n: Int32, iq: Int32, h: Int32, lane: Int32):
    """The same sum, 32 splits at a time: each lane weighs one of them (0 for an empty
    split), then the warp walks them with the weight broadcast by a shuffle, so no row load
    waits on a loaded lse and consecutive splits' rows are in flight together (the serial
    walk made a 66-split row latency-bound: 12.7 us against FlashMLA's 9.5 at V32 b2 s_q2,
    ncu, session 12)."""
    for c0 in cutlass.range(0, n, 32, unroll=1):
        w_lane = Float32(0.0)
        if c0 + lane < n:
            lse_i = mLseAccum[start + c0 + lane, iq, h]
            if lse_i != -Float32.inf:
                w_lane = cute.math.exp2(lse_i - lse2, fastmath=True)
        for j in cutlass.range(cutlass.min(n - c0, 32), unroll=4):
            w = cute.arch.shuffle_sync(w_lane, j)
            if w != 0.0:  # an empty split's row (whatever it holds) is never read
                gRow = cute.make_tensor(mOAccum[start + c0 + j, iq, h, None].iterator, row_layout)
                part = cute.make_rmem_tensor_like(acc)
                cute.autovec_copy(gRow[None, lane, None], part)
                for k in cutlass.range_constexpr(4 * CHUNKS):
                    acc[k] += w * part[k]
