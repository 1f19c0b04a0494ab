"""Storing rows of an SM90 WGMMA accumulator to global memory, 16 bytes a lane.

In an m64nN accumulator fragment (element k = e + 2 h + 4 j) the four lanes of a quad
share a row (h picks one of the lane's two rows) and lane q holds columns 8 j + 2 q and
8 j + 2 q + 1 of every 8-column chunk j.  Stored as it lies that is 4 bytes a lane for a
16-bit output (a warp-wide store touches 8 rows with 16 bytes each, half sectors) and 8
for fp32.  ``store_row`` first moves words across the quad with butterfly shuffles
(``exchange``) so that, in each group g of 4 chunks, lane q holds all 8 columns of chunk
4 g + q of its row, and the quad writes 64 contiguous bytes with one 16-byte store a lane.
fp32 rows (split partials) keep 8-byte stores (``store_row_pairs``).

Measured on an H200 (run 20261204-183209 against -183224, same device call): sparse
prefill 1.02-1.19x faster (s_q 70000 topk 128: 5195 -> 4372 us), sparse decode up to 1.15x.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

QUAD = 4  # lanes sharing an accumulator row


def _pick(cond, a, b):
    """a where ``cond`` holds, else b (one SEL)."""
    return Int32(cutlass.select_(cond, a, b))


@cute.jit
def exchange(w: list, q: Int32, lane_bit: cutlass.Constexpr[int], word_bit: cutlass.Constexpr[int]) -> list:
    """Swap bit ``lane_bit`` of the lane index with bit ``word_bit`` of the word index over
    the quad: afterwards lane q's word u holds what lane q' had as word u', where q' is q
    with bit ``lane_bit`` set to u's bit ``word_bit`` and u' is u with bit ``word_bit`` set
    to q's bit ``lane_bit``.  ``w`` is 4 Int32 words; two shuffles (every lane of the warp
    must take part)."""
    bit_clear = ((q >> lane_bit) & 1) == 0  # bit lane_bit of this lane's index is 0
    out = list(w)
    for p in cutlass.range_constexpr(4):
        if cutlass.const_expr((p >> word_bit) & 1 == 0):
            x, y = w[p], w[p | (1 << word_bit)]  # the pair's words with bit word_bit 0 and 1
            # keep the word whose bit equals the lane's, send the other to the partner lane
            got = cute.arch.shuffle_sync_bfly(_pick(bit_clear, y, x), offset=1 << lane_bit)
            out[p] = _pick(bit_clear, x, got)
            out[p | (1 << word_bit)] = _pick(bit_clear, got, y)
    return out


@cute.jit
def store_row(acc: cute.Tensor, h: cutlass.Constexpr[int], scale: Float32, dst_row: cute.Tensor, col0: Int32,
              lane: Int32, store=None):
    """Row half ``h`` of this lane's accumulator ``acc`` (columns [0, N), N a multiple of
    32), times ``scale``, into ``dst_row`` (a global row of 16-bit elements, 16-byte
    aligned) at columns col0 + [0, N); col0 a multiple of 8.  A ``store`` that is False
    skips the stores, not the shuffles, so that every lane of the warp still takes part."""
    dtype = dst_row.element_type
    q = lane % QUAD
    for g in cutlass.range_constexpr(cute.size(acc) // (4 * QUAD)):
        vals = cute.make_rmem_tensor(cute.make_layout(2 * QUAD), dtype)
        for i in cutlass.range_constexpr(QUAD):
            k = 4 * (QUAD * g + i) + 2 * h
            vals[2 * i] = (acc[k] * scale).to(dtype)
            vals[2 * i + 1] = (acc[k + 1] * scale).to(dtype)
        packed = cute.recast_tensor(vals, Int32)
        # word u = chunk 4 g + u's columns 2 q, 2 q + 1 -> lane q: chunk 4 g + q, word u
        # from lane u (a transpose over the quad)
        words = exchange(exchange([packed[i] for i in range(4)], q, 1, 1), q, 0, 0)
        res = cute.make_rmem_tensor(cute.make_layout(4), Int32)
        for i in cutlass.range_constexpr(4):
            res[i] = words[i]
        dst = cute.local_tile(dst_row, (8,), (col0 // 8 + QUAD * g + q,))
        if cutlass.const_expr(store is None):
            cute.autovec_copy(cute.recast_tensor(res, dtype), dst)
        elif store:
            cute.autovec_copy(cute.recast_tensor(res, dtype), dst)


@cute.jit
def store_row_pairs(acc: cute.Tensor, h: cutlass.Constexpr[int], scale: Float32, dst_row: cute.Tensor, col0: Int32,
                    lane: Int32):
    """As ``store_row`` for fp32 rows, without the exchange: each lane stores its column
    pairs (8 bytes; a quad fills whole 32-byte sectors).  The exchanged 16-byte form made
    dense decode spill (255 registers, 7 local words, against 233 and none) and left sparse
    decode's split plans as fast as before (branch ``wide-partials``, run 20261204-190941)."""
    q = lane % QUAD
    for j in cutlass.range_constexpr(cute.size(acc) // 4):
        k = 4 * j + 2 * h
        pair = cute.make_rmem_tensor(cute.make_layout(2), Float32)
        pair[0] = acc[k] * scale
        pair[1] = acc[k + 1] * scale
        cute.autovec_copy(pair, cute.local_tile(dst_row, (2,), ((col0 + 8 * j + 2 * q) // 2,)))
