"""Storing rows of an SM90 WGMMA accumulator to global memory, 16 bytes a lane.

In an m64nN accumulator fragment (element k = e + 2 h + 4 j) the four lanes of a quad
share a row (h picks one of the lane's two rows) and lane q holds columns 8 j + 2 q and
8 j + 2 q + 1 of every 8-column chunk j.  Stored as it lies, a 16-bit output is 4 bytes a
lane: one warp-wide store touches 8 rows with 16 bytes each.  ``store_row`` first
transposes groups of four chunks across the quad (``quad_transpose``), so that lane q holds
all 8 columns of chunk 4 G + q and a quad writes 64 contiguous bytes of its row with one
16-byte store a lane: a quarter of the store instructions, each filling whole sectors.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

CHUNKS_PER_STORE = 4  # 8-column chunks a quad stores together (4 lanes x 16 bytes)


def _pick(cond, a, b):
    """a where ``cond`` holds, else b (one SEL)."""
    return Int32(cutlass.select_(cond, a, b))


@cute.jit
def quad_transpose(w: cute.Tensor, q: Int32) -> cute.Tensor:
    """The quad's 4 x 4 word transpose: lane q's word i becomes lane i's word q.

    ``w`` is 4 Int32 registers; lane q (0-3 within its quad) gets back the words
    (lane 0's w[q], lane 1's w[q], lane 2's w[q], lane 3's w[q]).  Two butterfly
    stages of two shuffles each (across lane bit 1, then bit 0); every lane of the
    warp must take part."""
    lo = (q & 1) == 0
    top = (q & 2) == 0
    # Stage 1 (lanes q, q ^ 2): keep the words of this lane's column pair 2 (q >> 1) + {0, 1},
    # send the other pair; after it a[i] / b[i] = lane q's / lane q ^ 2's word 2 (q >> 1) + i.
    a0 = _pick(top, w[0], w[2])
    a1 = _pick(top, w[1], w[3])
    b0 = cute.arch.shuffle_sync_bfly(_pick(top, w[2], w[0]), offset=2)
    b1 = cute.arch.shuffle_sync_bfly(_pick(top, w[3], w[1]), offset=2)
    # Stage 2 (lanes q, q ^ 1): keep word q of each row held, send the partner its word.
    own_a = _pick(lo, a0, a1)  # lane q's word q
    own_b = _pick(lo, b0, b1)  # lane q ^ 2's word q
    got_a = cute.arch.shuffle_sync_bfly(_pick(lo, a1, a0), offset=1)  # lane q ^ 1's word q
    got_b = cute.arch.shuffle_sync_bfly(_pick(lo, b1, b0), offset=1)  # lane q ^ 3's word q
    # Words from lanes 2 (q >> 1) + {0, 1} (e) and from the other pair of lanes (f).
    e0 = _pick(lo, own_a, got_a)
    e1 = _pick(lo, got_a, own_a)
    f0 = _pick(lo, own_b, got_b)
    f1 = _pick(lo, got_b, own_b)
    out = cute.make_rmem_tensor(cute.make_layout(4), Int32)
    out[0] = _pick(top, e0, f0)
    out[1] = _pick(top, e1, f1)
    out[2] = _pick(top, f0, e0)
    out[3] = _pick(top, f1, e1)
    return out


@cute.jit
def store_row(acc: cute.Tensor, h: cutlass.Constexpr[int], scale: Float32, dst_row: cute.Tensor, col0: Int32,
              lane: Int32, store=None):
    """Row half ``h`` of this lane's accumulator ``acc`` (columns [0, N), N a multiple of
    32), times ``scale``, into ``dst_row`` (a global row of 16-bit elements, 16-byte
    aligned) at columns col0 + [0, N); col0 a multiple of 8.  A ``store`` that is False
    skips the stores, not the shuffles, so that every lane of the warp still takes part."""
    dtype = dst_row.element_type
    q = lane % 4
    for g in cutlass.range_constexpr(cute.size(acc) // (4 * CHUNKS_PER_STORE)):
        vals = cute.make_rmem_tensor(cute.make_layout(2 * CHUNKS_PER_STORE), dtype)
        for i in cutlass.range_constexpr(CHUNKS_PER_STORE):
            k = 4 * (CHUNKS_PER_STORE * g + i) + 2 * h
            vals[2 * i] = (acc[k] * scale).to(dtype)
            vals[2 * i + 1] = (acc[k + 1] * scale).to(dtype)
        words = quad_transpose(cute.recast_tensor(vals, Int32), q)
        chunk = (col0 // 8) + CHUNKS_PER_STORE * g + q
        dst = cute.local_tile(dst_row, (8,), (chunk,))
        if cutlass.const_expr(store is None):
            cute.autovec_copy(cute.recast_tensor(words, dtype), dst)
        elif store:
            cute.autovec_copy(cute.recast_tensor(words, dtype), dst)
