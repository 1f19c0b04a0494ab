"""What every SM90 MLA attention kernel's two consumer warpgroups do with one KV block.

The layout of the work (sparse decode; dense decode and sparse prefill run the seesaw of
``kernels.sm90.seesaw`` instead and take only the layouts, the Q loader and the row
bookkeeping from here):
a CTA owns 64 query rows; a KV block of 64 tokens sits in shared memory as a
K-major (token, d) WGMMA B operand whose first 512 columns are also V.  Consumer
``half`` (0 or 1) computes S for tokens [32*half, 32*half + 32) (64 x 32 = Q K^T),
the two exchange row maxima through shared memory, each writes its half of P (in the
matmul type) to ``sP``, and then consumer ``half`` accumulates O[:, 256*half :
256*half + 256] += P V over all 64 tokens.  Every tensor-core FLOP is done once, at the price of two
256-thread named barriers per block.

Subclasses supply how blocks arrive (the producer role), which logits are masked and
what the epilogue writes; the helpers here are the block's online softmax (the row
statistics are a ``kernels.common.softmax.Softmax``), the row-statistic exchange between
the consumers, the P store and the V view.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, Int64
from cutlass.cute.nvgpu import warpgroup
from cutlass.tensor_utils import LayoutEnum

from cute_mla.kernels.common import named_barrier
from cute_mla.kernels.common.named_barrier import NamedBarrier
from cute_mla.kernels.common.convert import convert_to
from cute_mla.kernels.common.fp8 import bf16x2_to_f16x2
from cute_mla.kernels.common.gmem import copy_16B_async, load_16B, load_16B_shared, store_16B_shared
from cute_mla.kernels.common.mma_sm90 import gemm, store_c_stmatrix, swizzle_128b
from cute_mla.kernels.common.softmax import Softmax

from cute_mla.layouts.constants import BLOCK_M, BLOCK_N, D_V


class QChunk(NamedTuple):
    """One 16-byte chunk of a consumer thread's share of a Q tile copy (``QShare``)."""

    src: int  # byte offset from the share's first chunk in its global row
    dst: Any  # shared address (Int32)
    exists: Any  # True, or a runtime Boolean: the chunk lies inside its row
    rounded: bool  # below ``tail_start``: rounded to f16 where a bf16 Q meets f16 matmuls


class QShare(NamedTuple):
    """A consumer thread's share of a Q tile copy (``q_share``): the tile row it copies, the
    byte offset of its first chunk in that row, its chunks.  Kernels differ only in this map;
    ``load_q``, ``fetch_q`` / ``finish_q`` and sparse prefill's copy all move Q by it."""

    row: Any
    src_off: Any
    chunks: list


@cute.jit
def copy_q_async(share: QShare, src: Int64):
    """cp.async of a thread's chunks of the Q row at global address ``src`` (no group
    committed: the caller waits through a group or an mbarrier)."""
    src = src + share.src_off
    for c in share.chunks:
        if c.exists:
            copy_16B_async(src + Int64(c.src), c.dst)


class TwoConsumerMlaSm90:
    """Base of the SM90 MLA kernels: warpgroup 0 produces KV blocks, warpgroups 1 and 2
    consume them as described in this module's docstring."""

    # shared bytes a KV ring stage takes beside its block (sparse decode's staged scales)
    stage_side_bytes = 0

    threads = 384
    consumer_threads = 256

    stages = 2  # KV blocks in the shared-memory ring

    def __init__(self, dtype, d_qk: int):
        # setmaxnreg moves registers only within what the CTA was launched with (the
        # per-thread ceiling for 384 threads is 168): a split asking for more than that
        # total leaves the consumers' increase waiting forever.
        launch_regs = self.threads * (65536 // self.threads // 8 * 8)
        assert 128 * self.regs_producer + self.consumer_threads * self.regs_consumer <= launch_regs, \
            f"{type(self).__name__}: register split {self.regs_producer}/{self.regs_consumer} exceeds {launch_regs}"
        self.dtype = dtype
        self.d = d_qk
        # Q K^T may switch type for its last columns (sparse decode V32: the bf16 RoPE, which
        # is not part of V, stays bf16 in Q and K): columns [tail_start, d) are tail_dtype.
        self.tail_dtype = dtype
        self.tail_start = d_qk
        self.v_half = D_V // 2
        elt = dtype.width // 8
        self.q_bytes = BLOCK_M * d_qk * elt
        self.kv_bytes = BLOCK_N * d_qk * elt  # one KV block (stage)
        self.p_bytes = BLOCK_M * BLOCK_N * elt
        # sQ + KV ring + P + (row statistics, per-kernel extras, barriers); every operand
        # buffer is 1024-byte aligned for the 128B swizzle.  At d 576 this is 231424 bytes:
        # all the opt-in shared memory an SM90 CTA has next to the allocator's reserved 1 KiB.
        self.smem_bytes = self.q_bytes + self.stages * (self.kv_bytes + self.stage_side_bytes) + self.p_bytes + 2048

    # ------------------------------------------------------------------ layouts / MMAs
    def q_smem_layout(self):
        return sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (BLOCK_M, BLOCK_N, self.d), self.dtype, 1)

    def v_smem_layout(self):
        # V = first 512 columns of a K block read as an MN-major (d, token) operand: with the
        # 128B swizzle both views address the same bytes (see kernels.common.paged_kv).
        return sm90_utils.make_smem_layout_b(LayoutEnum.COL_MAJOR, (BLOCK_M, D_V, BLOCK_N), self.dtype, 1)

    def p_smem_layout(self):
        # P (64 rows x 64 tokens) as the K-major A operand of P V
        return sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (BLOCK_M, self.v_half, BLOCK_N), self.dtype, 1)

    def make_mmas(self):
        """(Q K^T over 32 tokens, P V over 256 columns, Q K^T in ``tail_dtype``).  Built inside
        the kernel: passed in, a tiled MMA's mutable accumulate flag would become a kernel
        parameter."""
        qk_mma, qk_tail_mma = (sm90_utils.make_trivial_tiled_mma(
            t, t, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.K,
            Float32, (1, 1, 1), (BLOCK_M, BLOCK_N // 2)) for t in (self.dtype, self.tail_dtype))
        pv_mma = sm90_utils.make_trivial_tiled_mma(
            self.dtype, self.dtype, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN,
            Float32, (1, 1, 1), (BLOCK_M, self.v_half))
        return qk_mma, pv_mma, qk_tail_mma

    @cute.jit
    def allocate_operands(self, smem, sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout,
                          sP_layout: cute.ComposedLayout = None):
        """sQ, the KV ring sK, sP (None without ``sP_layout``: a kernel that keeps P
        elsewhere) and sStat ((consumer, row) partial row maxima, then row sums, exchanged
        between the consumers)."""
        sQ = smem.allocate_tensor(self.dtype, sQ_layout.outer, byte_alignment=1024, swizzle=sQ_layout.inner)
        sK = smem.allocate_tensor(self.dtype, sK_layout.outer, byte_alignment=1024, swizzle=sK_layout.inner)
        sP = None
        if cutlass.const_expr(sP_layout is not None):
            sP = smem.allocate_tensor(self.dtype, sP_layout.outer, byte_alignment=1024, swizzle=sP_layout.inner)
        sStat = smem.allocate_tensor(Float32, cute.make_layout((2, BLOCK_M)), byte_alignment=16)
        return sQ, sK, sP, sStat

    @cute.jit
    def make_gathered_kv_pipeline(self, smem, producer_threads: cutlass.Constexpr[int]):
        """Sparse decode's KV ring handshake: (sBias, kv_pipe).  ``sBias`` (slot, stage)
        is each gathered slot's logit bias (0 valid, -inf invalid); ``kv_pipe`` is a
        PipelineAsync from ``producer_threads`` producer threads, each arriving once its own
        shared writes of the block are done and fenced, to the 256 consumer threads.  Call
        before the roles split: it synchronises the CTA."""
        sBias = smem.allocate_tensor(Float32, cute.make_layout((BLOCK_N, self.stages)), byte_alignment=16)
        kv_mbar = smem.allocate_array(cutlass.Int64, 2 * self.stages, byte_alignment=8)
        kv_pipe = pipeline.PipelineAsync.create(
            num_stages=self.stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, producer_threads),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.consumer_threads),
            barrier_storage=kv_mbar, defer_sync=True)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()
        return sBias, kv_pipe

    @cute.jit
    def q_share(self, sQ: cute.Tensor, ctid: Int32) -> QShare:
        """This consumer thread's share of a 64-row Q tile copy.  Four threads share a row;
        thread q of a row moves its 16-byte chunks q + 4 j.  In the 128B-swizzled K-major
        layout chunk q + 4 j lies in column tile j // 2 (one 64-column tile of all 64 rows is
        8 KiB) at piece (q + 4 (j % 2)) ^ (row % 8) of its 128-byte line, so every shared
        address is one of two registers plus a constant (computed per chunk, the addresses
        got hoisted out of the piece loop and spilled).  Chunk j holds columns 32 j + 8 q ..
        + 7, so it lies below ``tail_start`` iff 32 j does."""
        per_row = self.consumer_threads // BLOCK_M
        n_chunks = self.d * (self.dtype.width // 8) // 16 // per_row
        assert self.tail_start % 32 == 0
        row = ctid // per_row
        q = ctid % per_row
        dst0 = sQ.iterator.toint() + swizzle_128b(row * 128 + 16 * q)
        dst = (dst0, dst0 ^ 64)
        return QShare(row, Int64(16 * q),
                      [QChunk(64 * j, dst[j % 2] + BLOCK_M * 128 * (j // 2), True, 32 * j < self.tail_start)
                       for j in range(n_chunks)])

    @cute.jit
    def load_q(self, mQ: cute.Tensor, sQ: cute.Tensor, where, ctid: Int32):
        """All 256 consumer threads copy the CTA's 64 query rows into sQ (``q_share``'s map):
        row ``row`` is ``self.q_row(mQ, where, row)`` (a (d,) view and whether it exists;
        missing rows are zero).  A bf16 Q is rounded to f16 on the way when the kernel's
        matmuls run in f16.  All global loads of a half are issued before its first shared
        store, so their latencies overlap."""
        # Nobody may still be reading the previous piece's Q (or its row statistics).
        named_barrier.sync(NamedBarrier.Q_RELOAD, self.consumer_threads)
        share = self.q_share(sQ, ctid)
        gq, exists = self.q_row(mQ, where, share.row)
        src = gq.iterator.toint() + share.src_off
        batch = len(share.chunks) // 2
        for half_batch in cutlass.range_constexpr(2):
            chunks = share.chunks[half_batch * batch:(half_batch + 1) * batch]
            buf = cute.make_rmem_tensor(cute.make_layout((4, batch)), Int32)
            buf.fill(0)
            if exists:
                for j in cutlass.range_constexpr(batch):
                    load_16B(src + Int64(chunks[j].src), buf[None, j])
            if cutlass.const_expr(mQ.element_type != self.dtype):
                self.check_q_rounding(mQ.element_type)
                for j in cutlass.range_constexpr(batch):
                    if cutlass.const_expr(chunks[j].rounded):
                        for i in cutlass.range_constexpr(4):
                            buf[i, j] = bf16x2_to_f16x2(buf[i, j])
            for j in cutlass.range_constexpr(batch):
                store_16B_shared(buf[None, j], chunks[j].dst)
        # Generic-proxy stores read next by WGMMA (async proxy).
        cute.arch.fence_proxy("async.shared", space="cta")
        named_barrier.sync(NamedBarrier.Q_RELOAD, self.consumer_threads)

    def check_q_rounding(self, q_dtype):
        """A Q of another type than the matmuls' is bf16 for matmuls in f16 (sparse decode:
        ``kernels.common.fp8``), rounded only below ``tail_start``."""
        assert q_dtype == cutlass.BFloat16 and self.dtype == cutlass.Float16
        assert self.tail_dtype == q_dtype or self.tail_start == self.d

    @cute.jit
    def fetch_q(self, mQ: cute.Tensor, where, share: QShare, zero_missing: cutlass.Constexpr[bool]):
        """``load_q``'s copy by cp.async, as stored (one group a thread; ``finish_q`` waits for
        it): no registers hold Q on the way, so it can be issued an epilogue early.  The
        caller makes sure nobody reads sQ any more.  A missing row's chunks are zeros, stored
        only with ``zero_missing`` (the first fetch: which rows exist does not change between
        a CTA's pieces in sparse decode, and nothing else writes sQ)."""
        gq, exists = self.q_row(mQ, where, share.row)
        if exists:
            copy_q_async(share, gq.iterator.toint())
        else:
            if cutlass.const_expr(zero_missing):
                zeros = cute.make_rmem_tensor(cute.make_layout(4), Int32)
                zeros.fill(0)
                for c in share.chunks:
                    store_16B_shared(zeros, c.dst)
        cute.arch.cp_async_commit_group()

    @cute.jit
    def finish_q(self, share: QShare, q_dtype: cutlass.Constexpr):
        """Wait for this thread's ``fetch_q`` copies, round its chunks below ``tail_start`` to
        f16 in place (``load_q``'s rule), then make every thread's chunks visible to the MMAs."""
        cute.arch.cp_async_wait_group(0)
        if cutlass.const_expr(q_dtype != self.dtype):
            self.check_q_rounding(q_dtype)
            for c in share.chunks:
                if cutlass.const_expr(c.rounded):
                    if c.exists:
                        chunk = cute.make_rmem_tensor(cute.make_layout(4), Int32)
                        load_16B_shared(c.dst, chunk)
                        for i in cutlass.range_constexpr(4):
                            chunk[i] = bf16x2_to_f16x2(chunk[i])
                        store_16B_shared(chunk, c.dst)
        cute.arch.fence_proxy("async.shared", space="cta")
        named_barrier.sync(NamedBarrier.Q_RELOAD, self.consumer_threads)

    @cute.jit
    def consumer_fragments(self, qk_mma: cute.TiledMma, pv_mma: cute.TiledMma, sQ: cute.Tensor, sK: cute.Tensor,
                           sP: cute.Tensor, half: Int32, wtid: Int32):
        """This thread's MMA slices and operand/coordinate partitions (wtid: thread index
        inside its consumer warpgroup)."""
        thr_qk = qk_mma.get_slice(wtid)
        thr_pv = pv_mma.get_slice(wtid)
        tSrQ = thr_qk.make_fragment_A(thr_qk.partition_A(sQ))  # (MMA, 1, d/16)
        sKhalf = cute.local_tile(sK, (BLOCK_N // 2, self.d, self.stages), (half, 0, 0))  # this consumer's 32 tokens
        tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sKhalf))  # (MMA, 1, d/16, stages)
        tScS = thr_qk.partition_C(cute.make_identity_tensor((BLOCK_M, BLOCK_N // 2)))  # (row, token - 32*half)
        tOrP = thr_pv.make_fragment_A(thr_pv.partition_A(sP))  # (MMA, 1, BLOCK_N/16, 1)
        tOcO = thr_pv.partition_C(cute.make_identity_tensor((BLOCK_M, self.v_half)))  # (row, col) of each O value
        return thr_qk, thr_pv, tSrQ, tSrK, tScS, tOrP, tOcO

    @cute.jit
    def fresh_rows(self, thr_pv, scale_log2: Float32):
        """A tile's running state before its first block: O = 0 (this consumer's 64 x 256
        accumulator) and the ``Softmax`` of this thread's 2 rows."""
        acc_o = thr_pv.make_fragment_C(thr_pv.partition_shape_C((BLOCK_M, self.v_half)))
        acc_o.fill(0.0)
        return acc_o, Softmax.create(2, scale_log2)

    # ------------------------------------------------------------------ per-block steps
    @cute.jit
    def block_softmax(self, acc_s: cute.Tensor, tScS: cute.Tensor, acc_o: cute.Tensor, softmax: Softmax,
                      sStat: cute.Tensor, half: Int32, wtid: Int32):
        """The online softmax of this consumer's 32 (already masked) logits of a block, for the
        2 rows this thread owns: the row maximum is taken over both consumers' halves, so both
        rescale O identically.  Row sums stay per consumer until the epilogue.  On return
        ``acc_s`` holds P."""
        new_max = cute.make_rmem_tensor(cute.make_layout(2), Float32)
        new_max.fill(-Float32.inf)
        softmax.block_max(acc_s, new_max)
        self.exchange_rows(new_max, tScS, sStat, half, wtid, NamedBarrier.ROW_MAX, True)
        factor = softmax.online_softmax(acc_s, new_max)
        # Once a row's maximum has settled the factor is exactly 1: ``rescale_o`` skips the 128
        # multiplies that sit between the max exchange and the P V issue.
        softmax.rescale_o(acc_o, factor)

    @cute.jit
    def attend_gathered_block(self, qk_mma: cute.TiledMma, pv_mma: cute.TiledMma, qk_tail_mma: cute.TiledMma,
                              tSrQ: cute.Tensor, tSrK: cute.Tensor, tScS: cute.Tensor, tOrP: cute.Tensor,
                              acc_o: cute.Tensor, softmax: Softmax, sK: cute.Tensor, sP: cute.Tensor,
                              sStat: cute.Tensor, sBias: cute.Tensor, sV_layout: cute.ComposedLayout, kv_pipe, state,
                              half: Int32, wtid: Int32):
        """One block of gathered tokens (the sparse kernels): S (its columns past
        ``tail_start`` with ``qk_tail_mma``), + the block's logit bias, online softmax, P,
        O += P V, then the stage is released.  (Issuing the next block's S right behind this
        block's P V was measured 15-20% slower: perf/results/NOTES.md, session 7.)

        The producer writes an invalid slot's row as zeros and its bias (``sBias``, (slot,
        stage)) as -inf: its logit is exactly 0 + -inf and its V row adds 0 * 0, so NaN
        that was never loaded cannot reach O."""
        thr_qk = qk_mma.get_slice(wtid)
        thr_pv = pv_mma.get_slice(wtid)
        kv_pipe.consumer_wait(state)
        stage = state.index
        acc_s = thr_qk.make_fragment_C(thr_qk.partition_shape_C((BLOCK_M, BLOCK_N // 2)))
        warpgroup.fence()
        n_main = self.tail_start // 16  # k-blocks of 16 columns
        gemm(qk_mma, acc_s, tSrQ[None, None, None, 0], tSrK[None, None, None, stage], True, (0, n_main))
        if cutlass.const_expr(n_main < self.d // 16):
            gemm(qk_tail_mma, acc_s, tSrQ[None, None, None, 0], tSrK[None, None, None, stage], False,
                 (n_main, self.d // 16))
        warpgroup.commit_group()
        warpgroup.wait_group(0)
        for k in cutlass.range_constexpr(cute.size(acc_s)):
            _, slot = tScS[k]
            acc_s[k] = acc_s[k] + sBias[half * (BLOCK_N // 2) + slot, stage]
        self.block_softmax(acc_s, tScS, acc_o, softmax, sStat, half, wtid)
        self.store_p(acc_s, sP, qk_mma, half, wtid)
        cute.arch.fence_proxy("async.shared", space="cta")
        named_barrier.sync(NamedBarrier.P_READY, self.consumer_threads)
        tOrV = thr_pv.make_fragment_B(thr_pv.partition_B(self.v_view(sK, sV_layout, stage, half)))
        warpgroup.fence()
        gemm(pv_mma, acc_o, tOrP[None, None, None, 0], tOrV, False)
        warpgroup.commit_group()
        # Free the block the moment P V is done, not after the next block's S: with two
        # stages, the next gather can only start here, and its latency is what is exposed.
        warpgroup.wait_group(0)
        kv_pipe.consumer_release(state)

    @cute.jit
    def exchange_rows(self, vals: cute.Tensor, tC: cute.Tensor, sStat: cute.Tensor, half: Int32, wtid: Int32,
                      barrier_id: cutlass.Constexpr[int], is_max: cutlass.Constexpr[bool]):
        """Turn this thread's per-row partial values (its 2 rows, own columns) into the row's
        value over both consumers' columns: reduce across the 4 lanes of a row, publish
        through sStat, meet at ``barrier_id``, fold in the other consumer's value."""
        for h in cutlass.range_constexpr(2):
            if cutlass.const_expr(is_max):
                vals[h] = cute.arch.warp_reduction_max(vals[h], threads_in_group=4)
            else:
                vals[h] = cute.arch.warp_reduction_sum(vals[h], threads_in_group=4)
            if wtid % 4 == 0:
                row, _ = tC[2 * h]
                sStat[half, row] = vals[h]
        named_barrier.sync(barrier_id, self.consumer_threads)
        for h in cutlass.range_constexpr(2):
            row, _ = tC[2 * h]
            if cutlass.const_expr(is_max):
                vals[h] = cute.arch.fmax(vals[h], sStat[1 - half, row])
            else:
                vals[h] = vals[h] + sStat[1 - half, row]

    @cute.jit
    def store_p(self, acc_s: cute.Tensor, sP: cute.Tensor, qk_mma: cute.TiledMma, half: Int32, wtid: Int32):
        """This consumer's 64 x 32 probabilities into its half of sP by ``stmatrix`` (a warp's
        16 x 32 slab is 8 8 x 8 matrices, 2 ``STSM.16.M88.4`` a thread, for 16 4-byte stores
        with a swizzled address each), converted a pair at a time (``convert``)."""
        rP = cute.make_rmem_tensor_like(acc_s, self.dtype)
        convert_to(acc_s, rP)
        store_c_stmatrix(rP, qk_mma, cute.local_tile(sP[None, None, 0], (BLOCK_M, BLOCK_N // 2), (0, half)), wtid)

    @cute.jit
    def v_view(self, sK: cute.Tensor, sV_layout: cute.ComposedLayout, stage: Int32, half: Int32) -> cute.Tensor:
        """(256, 64) MN-major view of V columns [256*half, 256*half + 256) of K stage ``stage``."""
        base = sK[None, None, stage].iterator
        sV = cute.make_tensor(cute.recast_ptr(base, sV_layout.inner), cute.slice_(sV_layout.outer, (None, None, 0)))
        return cute.local_tile(sV, (self.v_half, BLOCK_N), (half, 0))

    @cute.jit
    def finish_rows(self, softmax: Softmax, tOcO: cute.Tensor, sStat: cute.Tensor, half: Int32, wtid: Int32):
        """Row sums over both consumers -> (base-2 lse, 1 / sum) of this thread's 2 rows
        (``Softmax.finalize``)."""
        # Both consumers have read the last block's maxima (before the P barrier), so
        # sStat is free to carry the row sums.
        self.exchange_rows(softmax.row_sum, tOcO, sStat, half, wtid, NamedBarrier.ROW_SUM, False)
        return softmax.finalize()
