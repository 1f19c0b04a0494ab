"""The "seesaw" consumer core of the SM90 MLA kernels (after FlashMLA's public write-up).

Two warpgroups, two KV buffers of one 64-token block each.  Warpgroup w owns O columns
[256 w, 256 w + 256) and computes S of the blocks in buffer w; blocks go in pairs (even
block in buffer 0, odd block in buffer 1):

  wg 0: S0 = Q K0^T (64 x 64); m0 = max(m, rowmax S0) -> smem; P0; O_L = O_L * a + P0 V0_L
        (P0 from registers); once wg 1 has published m1: P0 * exp(m0 - m1) -> buffer 0's
        P tile; O_L *= exp(m0 - m1); O_L += P1 V1_L (P1 from buffer 1's P tile)
  wg 1: S1 = Q K1^T; m1 = max(m0, rowmax S1) -> smem; P1 -> buffer 1's P tile;
        O_R = O_R * a' + P0' V0_R (buffer 0's P tile) + P1 V1_R (P1 from registers)

so one warpgroup's softmax runs under the other's tensor-core work, and each S is a 64 x 64
GEMM by one warpgroup (Q is read from shared memory once per block).  Running sums stay per
warpgroup until the epilogue adds the two (``finish_rows``).

A kernel using this core supplies how a block gets into its buffer and out again, through
four hooks taking its own context ``ctx`` (a NamedTuple of the kernel's):
  ``s_block(qk_mma, acc_s, tSrQ, tSrK, tScS, ctx, buf, blk)``  wait for the block, S, mask;
  ``skip_block(ctx, buf)``  warpgroup 1 of a lone last block (no odd block);
  ``prepare_v(sK, ctx, buf, blk, wg, wtid)``  before this warpgroup's P V reads buffer buf;
  ``release(ctx, buf, wg, wtid)``  this warpgroup has read buffer buf for the last time.
Warpgroup 0 releases V_L of both buffers, warpgroup 1 V_R of both; buffer 0's P tile is
last read by warpgroup 1, buffer 1's by warpgroup 0.  Users: dense decode (pages by TMA,
reloaded tile by tile) and sparse prefill (gathered rows on a half-block ring).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32
from cutlass.cute.nvgpu import warpgroup

from cute_mla.kernels.common import named_barrier
from cute_mla.kernels.common.convert import convert_to
from cute_mla.kernels.common.named_barrier import NamedBarrier
from cute_mla.kernels.common.mma_sm90 import gemm, store_c_stmatrix
from cute_mla.kernels.common.softmax import Softmax
from cute_mla.layouts.constants import BLOCK_M, BLOCK_N


class SeesawFragments(NamedTuple):
    """One thread's MMAs and operand partitions (``SeesawConsumers.seesaw_fragments``)."""

    qk_mma: Any  # S = Q K^T, 64 x 64
    pv_reg: Any  # O_half += P V, P from registers
    pv_smem: Any  # O_half += P V, P from shared memory
    acc_s: Any  # S accumulator
    rP: Any  # P as the register A operand
    tSrQ: Any  # (MMA, 1, d/16, 1)
    tSrK: Any  # (MMA, 1, d/16, 2): both buffers
    tScS: Any  # (row, token) of each S element
    tOrV_own: Any  # V of this warpgroup's buffer, its half of the columns
    tOrV_other: Any  # V of the other buffer
    tOrP_other: Any  # the other buffer's P tile as the smem A operand
    sP_own: Any  # this warpgroup's buffer's P tile
    sMax: Any  # (2, 64) row maxima exchanged between the warpgroups


class RowScratch(NamedTuple):
    """Per-row registers (2 rows a thread) of one pair's softmax."""

    m_even: Any  # maxima after the even block
    m_pair: Any  # maxima of the pair
    base: Any  # exponent base (scaled maxima)
    factor: Any  # rescale factor of O and the sums
    factor2: Any  # second rescale factor (warpgroup 0, after the odd block)


class SeesawConsumers:
    """Mixin: the per-pair steps and their softmax helpers (see the module docstring)."""

    def make_seesaw_mmas(self):
        """(S = Q K^T, 64 x 64; O_half += P V with P from registers; same with P from smem)."""
        major_k, major_mn = cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN
        qk = sm90_utils.make_trivial_tiled_mma(self.dtype, self.dtype, major_k, major_k, Float32, (1, 1, 1),
                                               (BLOCK_M, BLOCK_N))
        pv_reg = sm90_utils.make_trivial_tiled_mma(self.dtype, self.dtype, major_k, major_mn, Float32, (1, 1, 1),
                                                   (BLOCK_M, self.v_half), warpgroup.OperandSource.RMEM)
        pv_smem = sm90_utils.make_trivial_tiled_mma(self.dtype, self.dtype, major_k, major_mn, Float32, (1, 1, 1),
                                                    (BLOCK_M, self.v_half))
        return qk, pv_reg, pv_smem

    @cute.jit
    def seesaw_fragments(self, sQ: cute.Tensor, sK: cute.Tensor, sMax: cute.Tensor, sV_layout: cute.ComposedLayout,
                         p_tiles, wg: cutlass.Constexpr[int], wtid: Int32):
        """This thread's MMAs, operand partitions and per-row state: (frags, rows, tOcO), frags
        the fields of ``SeesawFragments`` and rows a ``RowScratch``.
        ``p_tiles`` = (buffer 0's P tile, buffer 1's), each a (64 rows, 64 tokens) K-major
        A operand in shared memory."""
        qk_mma, pv_reg, pv_smem = self.make_seesaw_mmas()
        thr_qk = qk_mma.get_slice(wtid)
        thr_reg = pv_reg.get_slice(wtid)
        thr_smem = pv_smem.get_slice(wtid)
        other = 1 - wg
        tSrQ = thr_qk.make_fragment_A(thr_qk.partition_A(sQ))  # (MMA, 1, d/16, 1)
        tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sK))  # (MMA, 1, d/16, 2)
        tScS = thr_qk.partition_C(cute.make_identity_tensor((BLOCK_M, BLOCK_N)))  # (row, token)
        tOcO = thr_reg.partition_C(cute.make_identity_tensor((BLOCK_M, self.v_half)))  # (row, col - 256 wg)
        # own block: P from registers; the other warpgroup's block: P from its buffer's P tile
        tOrV_own = thr_reg.make_fragment_B(thr_reg.partition_B(self.v_view(sK, sV_layout, wg, wg)))
        tOrV_other = thr_smem.make_fragment_B(thr_smem.partition_B(self.v_view(sK, sV_layout, other, wg)))
        tOrP_other = thr_smem.make_fragment_A(thr_smem.partition_A(p_tiles[other]))
        rP = thr_reg.make_fragment_A(thr_reg.partition_shape_A((BLOCK_M, BLOCK_N)))
        acc_s = thr_qk.make_fragment_C(thr_qk.partition_shape_C((BLOCK_M, BLOCK_N)))
        # handed on as a plain tuple (the DSL threads tuples, not NamedTuples, through staged loops);
        # read it back with SeesawFragments(*frags)
        frags = tuple(SeesawFragments(qk_mma, pv_reg, pv_smem, acc_s, rP, tSrQ, tSrK, tScS, tOrV_own,
                                      tOrV_other, tOrP_other, p_tiles[wg], sMax))
        rows = RowScratch(*(cute.make_rmem_tensor(cute.make_layout(2), Float32) for _ in RowScratch._fields))
        return frags, rows, tOcO

    # ------------------------------------------------------------------ softmax helpers
    @cute.jit
    def max_into(self, softmax: Softmax, acc_s: cute.Tensor, m_in: cute.Tensor, m_out: cute.Tensor):
        """m_out = max(m_in, max of S over each of this thread's 2 rows, whole row)."""
        for h in cutlass.range_constexpr(2):
            m_out[h] = m_in[h]
        softmax.block_max(acc_s, m_out)
        for h in cutlass.range_constexpr(2):
            m_out[h] = cute.arch.warp_reduction_max(m_out[h], threads_in_group=4)

    @cute.jit
    def publish_max(self, m: cute.Tensor, sMax: cute.Tensor, tScS: cute.Tensor, wg: cutlass.Constexpr[int],
                    wtid: Int32, barrier_id: cutlass.Constexpr[int]):
        if wtid % 4 == 0:
            for h in cutlass.range_constexpr(2):
                row, _ = tScS[2 * h]
                sMax[wg, row] = m[h]
        named_barrier.arrive(barrier_id, self.consumer_threads)

    @cute.jit
    def read_max(self, m: cute.Tensor, sMax: cute.Tensor, tScS: cute.Tensor, wg: cutlass.Constexpr[int],
                 barrier_id: cutlass.Constexpr[int]):
        named_barrier.sync(barrier_id, self.consumer_threads)
        for h in cutlass.range_constexpr(2):
            row, _ = tScS[2 * h]
            m[h] = sMax[wg, row]

    @cute.jit
    def store_p(self, rP: cute.Tensor, factor, sP: cute.Tensor, qk_mma: cute.TiledMma, acc_s: cute.Tensor,
                wtid: Int32):
        """P (the register operand, optionally times a per-row ``factor``) into a P tile by
        ``stmatrix``: a warp's 16 x 64 slab is 16 8 x 8 matrices, four an instruction, each lane
        giving one matrix row's address (the 16-byte rows the tile's 128-byte swizzle keeps
        whole).  32-bit stores took 16 instructions a thread, each with its own swizzled address
        recomputed every pair (ptxas kept 16 address registers' worth of work in the loop;
        SASS, session 29); FlashMLA stores its P with 4 ``STSM``.  Rescaling the rounded P rounds
        twice; that keeps S's fp32 registers dead while P V runs (with them live the kernel
        spills)."""
        src = rP
        if cutlass.const_expr(factor is not None):
            scaled = cute.make_rmem_tensor_like(rP, Float32)
            for k in cutlass.range_constexpr(cute.size(rP)):
                scaled[k] = rP[k].to(Float32) * factor[(k // 2) % 2]  # pairs alternate the 2 rows
            src = cute.make_rmem_tensor_like(rP)
            convert_to(scaled, src)
        # the A operand lists P's elements in the S accumulator's order (``to_operand``)
        store_c_stmatrix(cute.make_tensor(src.iterator, acc_s.layout), qk_mma, sP, wtid)
        # Generic stores read next by WGMMA (async proxy).
        cute.arch.fence_proxy("async.shared", space="cta")

    @cute.jit
    def to_operand(self, acc_s: cute.Tensor, rP: cute.Tensor):
        """S/P accumulator -> register A operand of P V: a 64 x 64 accumulator fragment and
        the A fragment of four k16 steps list the same (row, column) pairs in the same
        order, so this is an element-wise conversion (bf16 a pair at a time, ``convert``)."""
        convert_to(acc_s, rP)

    def p_view(self, base, sP_layout: cute.ComposedLayout) -> cute.Tensor:
        """A (64 rows, 64 tokens) K-major A operand (P) at ``base``."""
        return cute.make_tensor(cute.recast_ptr(base, sP_layout.inner), cute.slice_(sP_layout.outer, (None, None, 0)))

    # ------------------------------------------------------------------ a pair of blocks
    @cute.jit
    def step(self, frags, acc_o: cute.Tensor, softmax: Softmax, rows, sK: cute.Tensor, ctx, a: Int32, hi: Int32,
             wtid: Int32, wg: cutlass.Constexpr[int]):
        """Warpgroup ``wg``'s part of the pair (a, a + 1): ``even_step`` or ``odd_step``."""
        if cutlass.const_expr(wg == 0):
            self.even_step(frags, acc_o, softmax, rows, sK, ctx, a, hi, wtid)
        else:
            self.odd_step(frags, acc_o, softmax, rows, sK, ctx, a, hi, wtid)

    @cute.jit
    def even_step(self, frags, acc_o: cute.Tensor, softmax: Softmax, rows, sK: cute.Tensor, ctx, a: Int32, hi: Int32,
                  wtid: Int32):
        """Warpgroup 0's part of the pair (a in buffer 0, a + 1 in buffer 1 if a + 1 < hi);
        on return the softmax's maxima are the pair's."""
        (qk_mma, pv_reg, pv_smem, acc_s, rP, tSrQ, tSrK, tScS, tOrV_own, tOrV_other, tOrP_other, sP_own,
         sMax) = SeesawFragments(*frags)
        m_even, m_pair, base, factor, factor2 = rows
        self.s_block(qk_mma, acc_s, tSrQ, tSrK, tScS, ctx, 0, a)
        self.max_into(softmax, acc_s, softmax.row_max, m_even)
        self.publish_max(m_even, sMax, tScS, 0, wtid, NamedBarrier.MAX_0)
        softmax.rescale_to(m_even, base, factor)
        softmax.exponentiate(acc_s, base, factor)
        softmax.rescale_o(acc_o, factor)
        self.to_operand(acc_s, rP)
        self.prepare_v(sK, ctx, 0, a, 0, wtid)
        warpgroup.fence()
        gemm(pv_reg, acc_o, rP, tOrV_own, False)
        warpgroup.commit_group()
        # The pair's maxima: the even block's P handed to warpgroup 1 is rescaled to them.
        self.read_max(m_pair, sMax, tScS, 1, NamedBarrier.MAX_1)
        softmax.rescale_to(m_pair, base, factor2)
        self.store_p(rP, factor2, sP_own, qk_mma, acc_s, wtid)
        named_barrier.arrive(NamedBarrier.P_0, self.consumer_threads)
        warpgroup.wait_group(0)
        self.release(ctx, 0, 0, wtid)
        if a + 1 >= hi:  # a lone last block: nothing of buffer 1 to read this pair
            self.release(ctx, 1, 0, wtid)
        softmax.rescale_o(acc_o, factor2)
        softmax.scale_sums(factor2)
        named_barrier.sync(NamedBarrier.P_1, self.consumer_threads)
        if a + 1 < hi:
            self.prepare_v(sK, ctx, 1, a + 1, 0, wtid)
            warpgroup.fence()
            gemm(pv_smem, acc_o, tOrP_other, tOrV_other, False)
            warpgroup.commit_group()
            warpgroup.wait_group(0)
            self.release(ctx, 1, 0, wtid)

    @cute.jit
    def odd_step(self, frags, acc_o: cute.Tensor, softmax: Softmax, rows, sK: cute.Tensor, ctx, a: Int32, hi: Int32,
                 wtid: Int32):
        """Warpgroup 1's part of the pair (a in buffer 0, a + 1 in buffer 1 if a + 1 < hi);
        on return the softmax's maxima are the pair's."""
        (qk_mma, pv_reg, pv_smem, acc_s, rP, tSrQ, tSrK, tScS, tOrV_own, tOrV_other, tOrP_other, sP_own,
         sMax) = SeesawFragments(*frags)
        m_even, m_pair, base, factor, factor2 = rows
        if a + 1 < hi:
            self.s_block(qk_mma, acc_s, tSrQ, tSrK, tScS, ctx, 1, a + 1)
        else:
            self.skip_block(ctx, 1)
        self.read_max(m_even, sMax, tScS, 0, NamedBarrier.MAX_0)
        for h in cutlass.range_constexpr(2):
            m_pair[h] = m_even[h]
        if a + 1 < hi:
            self.max_into(softmax, acc_s, m_even, m_pair)
        self.publish_max(m_pair, sMax, tScS, 1, wtid, NamedBarrier.MAX_1)
        softmax.rescale_to(m_pair, base, factor)
        if a + 1 < hi:
            softmax.exponentiate(acc_s, base, factor)
            self.to_operand(acc_s, rP)
            self.store_p(rP, None, sP_own, qk_mma, acc_s, wtid)
        else:
            softmax.scale_sums(factor)
        named_barrier.arrive(NamedBarrier.P_1, self.consumer_threads)
        softmax.rescale_o(acc_o, factor)
        if a + 1 < hi:
            self.prepare_v(sK, ctx, 1, a + 1, 1, wtid)
        named_barrier.sync(NamedBarrier.P_0, self.consumer_threads)
        self.prepare_v(sK, ctx, 0, a, 1, wtid)
        # P0' V0_R is waited for before P1 V1_R is issued.  An MMA chain left in flight into
        # the branch below makes ptxas serialise every WGMMA of the kernel; issuing both back
        # to back with branch-local waits measured 3-7% slower in dense decode (P1 V1_R then
        # runs ahead of warpgroup 0's P1 V1_L, whose release of buffer 1 the next pair waits for).
        warpgroup.fence()
        gemm(pv_smem, acc_o, tOrP_other, tOrV_other, False)
        warpgroup.commit_group()
        warpgroup.wait_group(0)
        self.release(ctx, 0, 1, wtid)
        if a + 1 < hi:
            warpgroup.fence()
            gemm(pv_reg, acc_o, rP, tOrV_own, False)
            warpgroup.commit_group()
            warpgroup.wait_group(0)
        self.release(ctx, 1, 1, wtid)
