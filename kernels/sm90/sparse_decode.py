"""SM90 FP8 sparse MLA decode (``flash_mla_with_kvcache`` with ``indices``): each query
token attends to its own top-k tokens of an FP8 paged cache (plus, optionally, top-k
tokens of a second "extra" cache), dequantised on the fly to the matmul type (f16 or
bf16: the ``matmul`` flag)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Float32, Int32, Int64

from cute_mla.kernels.common.fp8 import (bf16x2_to_f16x2, dequant_e4m3x4, dequant_e4m3x4_bf16, f16x2_scale,
                                         f32_from_bits, ue8m0_to_f32)
from cute_mla.kernels.common.gmem import (copy_8B_async, copy_16B_async, load_8B, load_8B_shared, load_16B,
                                          load_16B_shared, load_i32, prefetch_l2, store_8B_shared, store_16B_shared)
from cute_mla.kernels.common.mma_sm90 import swizzle_128b
from cute_mla.kernels.common.paged_kv import kv_smem_layout
from cute_mla.kernels.common.softmax import LOG2_E
from cute_mla.kernels.common.topk import counted
from cute_mla.kernels.sm90.split_kv_decode import DecodePart, QTile, SplitKvDecodeSm90
from cute_mla.layouts.constants import BLOCK_M, BLOCK_N, D_V
from cute_mla.layouts.kv_cache import get_format

PIECE = 16  # bytes a lane moves at once (one 128-bit load or shared store)
# the ``matmul`` flag: the type of Q, the dequantised cache, P and the WGMMAs
MATMUL_DTYPES = {"f16": cutlass.Float16, "bf16": cutlass.BFloat16}


@dataclass(frozen=True)  # frozen: the DSL passes it through loops and branches as a constant
class SlotLengths:
    """How many of each request's selected slots count: its ``topk`` main slots (or
    ``topk_length[r]`` of them, clamped into [0, topk]), then, with an extra cache, its extra
    slots likewise; the main slots are padded to whole blocks in the schedule's length."""

    topk: Any
    topk_length: Any  # (b,) int32, read where has_topk_length
    has_topk_length: Any
    extra_topk: Any
    extra_topk_length: Any
    has_extra: Any
    has_extra_topk_length: Any

    @cute.jit
    def of(self, r: Int32):
        """(main slots, main blocks, extra slots, scheduler length) of request r."""
        n = counted(self.topk, self.topk_length, self.has_topk_length, r)
        nb = (n + BLOCK_N - 1) // BLOCK_N
        nx = Int32(0)
        if self.has_extra != 0:
            nx = counted(self.extra_topk, self.extra_topk_length, self.has_extra_topk_length, r)
        return n, nb, nx, nb * BLOCK_N + nx


class StageWriter(NamedTuple):
    """What a producer lane needs to open a ring stage and issue a block's copies into it
    (``SparseDecodeSm90.open_stage``); made once in ``load``."""

    kv_pipe: Any
    sk_base: Any  # the ring's shared address
    offs: Any  # the lane's byte offsets in a stage (``load``)
    sK_outer: Any  # the ring's layout
    sBias: Any  # (slot, stage) logit biases
    scale_base: Any  # (``stage_ahead``) the staged scales' shared address
    slot: Any  # the slot of each block the lane resolves
    warp: Any
    lane: Any


class SparseDecodeSm90(SplitKvDecodeSm90):
    """O = softmax(Q K_sel^T * scale) V_sel for 64 query heads of one query token, where
    K_sel are the FP8 cache tokens the token's ``indices`` select (then those its
    ``extra_indices`` select in the extra cache), dequantised on the fly; V = the first 512
    dims of K (V32: the NoPE part; MODEL1: NoPE and RoPE).

    Matmul type (the ``matmul`` flag; the API picks V32 f16, MODEL1 bf16 unless told
    otherwise, ``cute_mla.ops.sparse_decode_matmul``).  "f16": the codes become f16 (times
    the f16-rounded scale, one rounding), Q is rounded to f16 as it is loaded, P is f16;
    V32's RoPE columns of S stay a bf16 MMA on bf16 Q and K, MODEL1's RoPE (part of V) is
    converted to f16.  q and the dequantised cache must lie inside f16's range.  "bf16":
    codes times the float32 scale rounded to bf16 (FlashMLA's numerics, bf16's range); Q,
    RoPE and P stay bf16.  Either way O is accumulated in f32 and written in q's bf16.

    Split-KV work as in dense decode (``kernels.sm90.split_kv_decode``) with h_p =
    max(h_q, 64) rows per query token (its heads, then rows that are no head when h_q is
    8, 16 or 32): grid (parts, 1, s_q * h_p / 64), row block z = query token z // (h_p /
    64), heads (z % (h_p / 64)) * 64 onwards.  A request's "KV" is its counted main
    slots, padded to whole 64-slot blocks, then its counted extra slots: n =
    min(max(topk_length, 0), topk) main slots and
    likewise for the extra ones, so its length for the scheduler is
    ceil(n / 64) * 64 + n_extra (``ops.sparse_decode`` computes the same on the host stream).

    Warp roles (384 threads):
      warpgroup 0  producer: warp w fills rows 16w .. 16w + 15 (16 selected slots) of a
                   block's stage, in two steps (``stage_raw``, ``convert_raw``):
                   1. every copy at once, so their latencies overlap: the FP8 codes by
                      cp.async into a staging area inside the stage itself (the second half
                      of the area their 16-bit values will occupy), the bf16 RoPE by
                      cp.async to its final place, the scales into registers;
                   2. per 64-column group, codes -> the matmul type (``kernels.common.fp8``)
                      into the 128B-swizzled K-major layout WGMMA reads; then (f16 MODEL1)
                      RoPE bf16 -> f16 in place.
                   Lane l handles quarter l % 4 of each group of tokens l // 4 and 8 + l // 4
                   in both steps.  The next block's token records are prefetched to L2
                   and the indices of the block after it loaded while the copies fly.  A
                   slot past the counted prefix, or whose index is outside [0, num_blocks *
                   page size), is never dereferenced: its row is zeros, its logit bias -inf.
      warpgroups 1, 2  consumers: the split-S / split-O scheme of
                   ``kernels.sm90.mla_consumers`` (``attend_gathered_block``).

    Pipeline ``kv`` (PipelineAsync, 128 producer threads -> 256 consumer threads), one
    block per stage: each producer thread fences its shared stores into the async proxy
    and arrives (it waits for its own copies anyway, to convert them); the logit bias of a
    block travels in ``sBias``.  (The seesaw of sparse prefill, on a half-block ring, was
    tried here and was 30-50% slower: perf/results/NOTES.md, session 6.)

    Output as dense decode's, plus the sink on requests finalised here (one split);
    multi-split requests get it in the combine.  No valid key gives out = 0, lse = +inf.
    """

    producer_threads = 128
    # 128 * 64 + 256 * 216 <= 384 * 168: setmaxnreg can only hand out what the CTA was launched
    # with (168 per thread, the launch ceiling for 384 threads); asking for more deadlocks.
    regs_producer = 64
    regs_consumer = 216
    # where the producer's FP8 codes wait between their gather and their conversion: False, a
    # staging area in the stage (cp.async; at 64 registers a lane cannot hold its 256 codes);
    # True, the lane's registers (``ld.global``, 64 registers: a kernel whose producer has them)
    raw_in_registers = False
    # (with ``raw_in_registers``) the next block's codes are loaded into each 64-code group's
    # registers as soon as this block's group is converted, so the next gather is in flight
    # during this block's conversion (the registers are reused: no second block of them, which
    # lost in session 23's c2); its RoPE still waits for its stage
    gather_during_convert = False
    # (with ``gather_during_convert``) the next block's RoPE lines, which its code and scale
    # loads do not touch, are prefetched into L2 as its gather starts
    prefetch_rope_ahead = False
    # (without ``raw_in_registers``) the producer opens block j + 1's stage and issues all of its
    # copies before it converts block j: codes and RoPE as ever, and the scales by cp.async too,
    # into ``stage_side_bytes`` beside the stage, so no load of the next block shares a SASS
    # scoreboard with this block's conversion (NOTES, session 25).  It pays only where two stages
    # are free of the consumers: 3 stages with a consumer that holds one (``HeadsOnN``'s
    # ``overlap_blocks`` off; session 26: with the consumer holding two it ran 0.99-1.02x).
    stage_ahead = False

    @property
    def stage_side_bytes(self) -> int:
        """(``stage_ahead``) a stage's scales: each producer lane's two tokens' scale slots."""
        return self.producer_threads * 2 * self.fmt.scale_slot_bytes if self.stage_ahead else 0

    def __init__(self, fmt: str, matmul: str = "f16"):
        self.fmt = get_format(fmt)
        # matmul "f16": FP8 codes become f16 pairs in one instruction and take the scale in one
        # more (kernels.common.fp8), a third of what bf16 results cost, on the producer's side
        # of a kernel bound by shared memory and by its two roles' hand-offs; V32 runs 10%
        # faster than in bf16, MODEL1 (which then converts its RoPE) no faster (perf/results/
        # NOTES.md, sessions 7 and 8).  The price is f16's range (+-65504) for q and the
        # dequantised cache.  "bf16": FlashMLA's numerics and bf16's range.
        assert matmul in MATMUL_DTYPES, matmul
        super().__init__(MATMUL_DTYPES[matmul], self.fmt.d_qk)
        f = self.fmt
        if f.d_nope == D_V and self.dtype != cutlass.BFloat16:
            # V32: RoPE is not part of V, so it stays bf16 (Q's and K's), and S takes its last
            # 64 columns with a bf16 MMA: no conversion pass over RoPE
            self.tail_dtype = cutlass.BFloat16
            self.tail_start = f.d_nope
        # MODEL1's V includes RoPE, so in f16 matmuls its stored bf16 RoPE is converted in place
        self.convert_rope = f.d_nope < self.tail_start and self.dtype != cutlass.BFloat16
        # each lane copies 2 of a token's 8 RoPE pieces and converts whole 64-code groups
        assert f.rope_bytes == 8 * PIECE and f.d_nope % 64 == 0 and f.nope_group % 64 == 0
        self.rope_offset = f.rope_offset(0)  # in a token's data record
        self.scale_offset = f.scale_offset(0, 1) if f.placement == "per_token" else 0

    @cute.jit
    def __call__(self, q: cute.Tensor, k_cache: cute.Tensor, indices: cute.Tensor, topk_length: cute.Tensor,
                 extra_k_cache: cute.Tensor, extra_indices: cute.Tensor, extra_topk_length: cute.Tensor, attn_sink: cute.Tensor,
                 sched_meta: cute.Tensor, split_offsets: cute.Tensor, out: cute.Tensor, lse: cute.Tensor,
                 o_accum: cute.Tensor, lse_accum: cute.Tensor, softmax_scale: Float32, page_block_size: Int32,
                 extra_page_block_size: Int32, has_topk_length: Int32, has_extra: Int32,
                 has_extra_topk_length: Int32, has_sink: Int32, stream: cuda.CUstream):
        # q (b, s_q, h_q, d); k_cache / extra_k_cache (num_blocks, block_bytes) u8; indices (b, s_q, topk);
        # out (b, s_q, h_q, 512); lse (b, h_q, s_q)
        sK_layout = kv_smem_layout(self.dtype, self.d, self.stages)
        grid = [sched_meta.shape[0], 1, cute.ceil_div(q.shape[1] * self.token_rows(q), BLOCK_M)]
        self.kernel(q, k_cache, indices, topk_length, extra_k_cache, extra_indices, extra_topk_length, attn_sink, sched_meta, split_offsets,
                    out, lse, o_accum, lse_accum, softmax_scale, page_block_size, extra_page_block_size,
                    has_topk_length, has_extra, has_extra_topk_length, has_sink,
                    self.q_smem_layout(), sK_layout, self.v_smem_layout(), self.p_smem_layout()).launch(
            grid=grid, block=[self.threads, 1, 1], smem=self.smem_bytes, stream=stream, min_blocks_per_mp=1)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mK: cute.Tensor, mIndices: cute.Tensor, mTopkLength: cute.Tensor,
               mXK: cute.Tensor, mXIndices: cute.Tensor, mXTopkLength: cute.Tensor, mSink: cute.Tensor,
               mSchedMeta: cute.Tensor, mSplitOffsets: cute.Tensor, mOut: cute.Tensor, mLse: cute.Tensor,
               mOAccum: cute.Tensor, mLseAccum: cute.Tensor, softmax_scale: Float32, page_block_size: Int32,
               extra_page_block_size: Int32, has_topk_length: Int32, has_extra: Int32,
               has_extra_topk_length: Int32, has_sink: Int32,
               sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout, sV_layout: cute.ComposedLayout,
               sP_layout: cute.ComposedLayout):
        # Parameters in layouts.operands.sparse_decode_args order; static objects last.
        qk_mma, pv_mma, qk_tail_mma = self.make_mmas()
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg = warp // 4

        smem = cutlass.memory.SmemAllocator()
        sQ, sK, sP, sStat = self.allocate_operands(smem, sQ_layout, sK_layout, sP_layout)
        sBias, kv_pipe = self.make_gathered_kv_pipeline(smem, self.producer_threads)
        scale_base = Int32(0)  # (stage_ahead) the staged scales: stage s, producer thread t at (128 s + t) * 2 slots
        if cutlass.const_expr(self.stage_ahead):
            sScale = smem.allocate_tensor(cutlass.Int8, cute.make_layout(self.stages * self.stage_side_bytes),
                                          byte_alignment=16)
            scale_base = sScale.iterator.toint()

        part, _, mblk = cute.arch.block_idx()
        sched = DecodePart(mSchedMeta, mSplitOffsets, part)
        lengths = SlotLengths(mIndices.shape[2], mTopkLength, has_topk_length, mXIndices.shape[2], mXTopkLength,
                              has_extra, has_extra_topk_length)
        if wg == 0:
            cute.arch.setmaxregister_decrease(self.regs_producer)
            self.load(mK, mIndices, mXK, mXIndices, page_block_size, extra_page_block_size, lengths, sched, sK,
                      sK_layout.outer, sBias, kv_pipe, (mblk * BLOCK_M) // self.token_rows(mQ), warp, tidx % 32,
                      scale_base)
        else:
            cute.arch.setmaxregister_increase(self.regs_consumer)
            self.consume(qk_mma, pv_mma, qk_tail_mma, sQ, sK, sP, sStat, sBias, sV_layout, mQ, lengths, mSink, sched,
                         mOut, mLse, mOAccum, mLseAccum, kv_pipe, softmax_scale, has_sink, mblk, wg - 1, tidx - 128)

    @staticmethod
    def token_rows(mQ: cute.Tensor):
        """h_p: the rows a query token takes, its h_q heads rounded up to whole row blocks
        (a row block gathers one token's keys)."""
        return cutlass.max(mQ.shape[2], BLOCK_M)

    # ------------------------------------------------------------------ work of a request
    @cute.jit
    def piece(self, lengths: SlotLengths, sched: DecodePart, r: Int32, begin_req: Int32):
        """The consumers' piece of request r in part ``sched``: (first block, end block, split
        index of the partial row it writes)."""
        _, _, _, seqlen = lengths.of(r)
        lo, hi = sched.block_range(seqlen, r)
        return lo, hi, sched.split_of(r, begin_req)

    # ------------------------------------------------------------------ producer
    @cute.jit
    def load(self, mK: cute.Tensor, mIndices: cute.Tensor, mXK: cute.Tensor, mXIndices: cute.Tensor,
             pbs: Int32, xpbs: Int32, lengths: SlotLengths, sched: DecodePart, sK: cute.Tensor, sK_outer: cute.Layout,
             sBias: cute.Tensor, kv_pipe, iq: Int32, warp: Int32, lane: Int32, scale_base: Int32):
        # Lane l looks after quarter l % 4 of every 64-column group of tokens l // 4 and
        # 8 + l // 4 of the warp's 16: it stages their codes, converts them, stores them.
        # Byte offsets in a stage: its staging piece of group 0 (raw, unswizzled) and,
        # swizzled, its RoPE piece and its first output piece; every other piece it touches
        # differs from these by compile-time constants (``stage_raw``, ``convert_raw``).
        offs = (self.raw_offset(sK_outer, warp, 0) + 64 * (lane // 4) + PIECE * (lane % 4),
                swizzle_128b(cute.crd2idx((warp * 16 + lane // 4, self.fmt.d_nope + 8 * (lane % 4), 0), sK_outer) * 2),
                swizzle_128b(cute.crd2idx((warp * 16 + lane // 4, 16 * (lane % 4), 0), sK_outer) * 2))
        sk_base = sK.iterator.toint()
        caches = (mK, mIndices, pbs, mXK, mXIndices, xpbs)
        slot = warp * 16 + lane % 16  # the slot of each block lane l (and l + 16) resolves
        writer = StageWriter(kv_pipe, sk_base, offs, sK_outer, sBias, scale_base, slot, warp, lane)
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        for r in cutlass.range(sched.begin_req(), sched.end_req() + 1, unroll=1):
            n, nb, nx, seqlen = lengths.of(r)
            lo, hi = sched.block_range(seqlen, r)
            # Two blocks of look-ahead: block j's tokens are gathered while block j + 1's are
            # prefetched into L2 and block j + 2's indices are in flight.
            rec, sc = self.token_record(self.block_source(caches, lo, r, iq, n, nb, nx),
                                        self.fetch_index(self.block_source(caches, lo, r, iq, n, nb, nx), slot))
            idx_next = Int32(-1)
            if lo + 1 < hi:
                idx_next = self.fetch_index(self.block_source(caches, lo + 1, r, iq, n, nb, nx), slot)
            held = None  # (gather_during_convert) the registers the request's blocks pass through
            if cutlass.const_expr(self.gather_during_convert):
                held = self.lane_registers()
                self.gather_registers(rec, sc, lane, *held)
            if cutlass.const_expr(self.stage_ahead):
                if lo < hi:  # the piece's first block: its stage opened, its copies issued
                    self.open_stage(writer, state, rec, sc)
            for blk in cutlass.range(lo, hi, unroll=1):
                scales = None
                raw = None
                if cutlass.const_expr(not self.stage_ahead):
                    scales, raw = self.open_stage(writer, state, rec, sc, held)
                stage = state.index
                stage_base = sk_base + stage * self.kv_bytes
                # While this block's copies fly: the next block's records (its indices were
                # loaded a block ago) to L2 (or, gathering during the conversion, to its
                # registers; or, staging ahead, to its stage), and the indices of the one after.
                rec_next, sc_next = self.token_record(self.block_source(caches, blk + 1, r, iq, n, nb, nx), idx_next)
                if cutlass.const_expr(not self.gather_during_convert and not self.stage_ahead):
                    self.prefetch_record(rec_next, sc_next, lane)
                idx_next = Int32(-1)
                if blk + 2 < hi:
                    idx_next = self.fetch_index(self.block_source(caches, blk + 2, r, iq, n, nb, nx), slot)
                if cutlass.const_expr(self.stage_ahead):
                    if blk + 1 < hi:
                        ahead = state.clone()
                        ahead.advance()
                        self.open_stage(writer, ahead, rec_next, sc_next)
                        cute.arch.cp_async_wait_group(1)  # this block's copies; the next block's fly on
                    else:
                        cute.arch.cp_async_wait_group(0)
                    scales = self.staged_scales(self.scale_slots(writer, stage))
                    self.convert_raw(scales, raw, stage_base, offs, sK_outer, lane)
                elif cutlass.const_expr(self.gather_during_convert):
                    self.convert_raw(scales, raw, stage_base, offs, sK_outer, lane, (rec_next, sc_next))
                else:
                    cute.arch.cp_async_wait_group(0)
                    self.convert_raw(scales, raw, stage_base, offs, sK_outer, lane)
                # Shared stores and cp.async are generic-proxy writes; WGMMA reads through the async proxy.
                cute.arch.fence_proxy("async.shared", space="cta")
                kv_pipe.producer_commit(state)
                state.advance()
                rec = rec_next
                sc = sc_next

    @cute.jit
    def open_stage(self, w: StageWriter, state, rec: Int64, sc: Int32, held=None):
        """Acquire ``state``'s stage for the block whose records are ``rec`` / ``sc``, write its
        logit bias and issue this lane's copies (``stage_raw``; with ``stage_ahead`` the scales go
        to the stage's scale slots).  Returns ``stage_raw``'s (scales, codes)."""
        scale_dst = None
        if cutlass.const_expr(self.stage_ahead):
            scale_dst = self.scale_slots(w, state.index)
        w.kv_pipe.producer_acquire(state)
        stage = state.index
        if w.lane < 16:
            bias = Float32(0.0)
            if rec < 0:
                bias = -Float32.inf
            w.sBias[w.slot, stage] = bias
        return self.stage_raw(rec, sc, w.sk_base + stage * self.kv_bytes, w.offs, w.sK_outer, w.lane, held, scale_dst)

    def scale_slots(self, w: StageWriter, stage: Int32) -> Int32:
        """(``stage_ahead``) The shared address of this producer lane's two scale slots in ``stage``."""
        return w.scale_base + ((stage * self.producer_threads + w.warp * 32 + w.lane) * 2) * self.fmt.scale_slot_bytes

    @cute.jit
    def staged_scales(self, slots: Int32) -> cute.Tensor:
        """(``stage_ahead``) This lane's tokens' scales, from its slots, as ``lane_registers`` holds them."""
        scales, _ = self.lane_registers()
        for k in cutlass.range_constexpr(2):
            if cutlass.const_expr(self.fmt.scale_kind == "float32"):
                load_16B_shared(slots + k * self.fmt.scale_slot_bytes, scales[None, k])
            else:
                load_8B_shared(slots + k * self.fmt.scale_slot_bytes, scales[None, k])
        return scales

    @cute.jit
    def block_source(self, caches, blk: Int32, r: Int32, iq: Int32, n: Int32, nb: Int32, nx: Int32):
        """Where block ``blk`` of request r comes from: (address of its query token's index
        row, cache base address, block stride, num_blocks, page size, counted slots, first
        slot).  Blocks [0, nb) are the main cache's, the rest the extra cache's; plain
        integers, so one code path gathers from either."""
        mK, mIndices, pbs, mXK, mXIndices, xpbs = caches
        idx_row = mIndices[r, iq, None].iterator.toint()
        base = mK.iterator.toint()
        stride = Int64(mK.stride[0])
        num_blocks = mK.shape[0]
        page = pbs
        limit = n
        slot0 = blk * BLOCK_N
        if blk >= nb:
            idx_row = mXIndices[r, iq, None].iterator.toint()
            base = mXK.iterator.toint()
            stride = Int64(mXK.stride[0])
            num_blocks = mXK.shape[0]
            page = xpbs
            limit = nx
            slot0 = (blk - nb) * BLOCK_N
        return idx_row, base, stride, num_blocks, page, limit, slot0

    @cute.jit
    def fetch_index(self, src, slot: Int32) -> Int32:
        """The index in ``slot`` of a block, or -1 past the counted prefix (never read there)."""
        idx_row, _, _, _, _, limit, slot0 = src
        idx = Int32(-1)
        if slot0 + slot < limit:
            idx = load_i32(idx_row + Int64(slot0 + slot) * 4)
        return idx

    @cute.jit
    def token_record(self, src, idx: Int32):
        """Byte address of the token ``idx`` selects (its record; MODEL1: its data part), or
        -1 when idx is outside [0, num_blocks * page size): such a token is never
        dereferenced.  Second: MODEL1's scales are at record + this (a 32-bit delta, as
        the API keeps a block under 2^31 bytes); V32 keeps them in the record (0)."""
        _, base, stride, num_blocks, page, _, _ = src
        f = self.fmt
        rec = Int64(-1)
        sc = Int32(0)
        if idx >= 0:
            b = idx // page
            if b < num_blocks:
                off = idx - b * page
                block = base + Int64(b) * stride
                rec = block + Int64(off * f.data_token_stride)
                if cutlass.const_expr(f.placement == "per_block"):
                    sc = f.scales_region_offset(1) * page + off * (f.scale_slot_bytes - f.data_token_stride)
        return rec, sc

    @cute.jit
    def prefetch_record(self, rec: Int64, sc: Int32, lane: Int32):
        """L2 prefetch of every line of a token record (lanes l and l + 16 share a token)."""
        f = self.fmt
        last = f.data_token_stride - 1 if f.placement == "per_block" else f.bytes_per_token - 1
        if rec >= 0:
            if lane < 16:
                for k in cutlass.range_constexpr(4):
                    prefetch_l2(rec + Int64(128 * k))
            else:
                for o in cutlass.range_constexpr(512, last, 128):
                    prefetch_l2(rec + Int64(o))
                prefetch_l2(rec + Int64(last))
                if cutlass.const_expr(f.placement == "per_block"):
                    prefetch_l2(rec + Int64(sc))

    @cute.jit
    def raw_offset(self, sK_outer: cute.Layout, warp: Int32, g) -> Int32:
        """Where warp ``warp`` stages the raw FP8 codes of NoPE column group ``g`` (64
        columns) of its 16 tokens: 1 KiB, token t at + 64 t, in the second half of the 2 KiB
        its f16 output for those columns will occupy (rows 16 w .. 16 w + 15 of a 64-column
        block are two whole 1 KiB swizzle atoms).  Each group is read back before its output
        is written, and no group's output overlaps another group's staging."""
        return cute.crd2idx((warp * 16, 64 * g, 0), sK_outer) * 2 + 1024

    @cute.jit
    def stage_raw(self, rec: Int64, sc: Int32, stage_base: Int32, offs, sK_outer: cute.Layout, lane: Int32,
                  gathered=None, scale_dst=None):
        """Issue all of this lane's copies at once (their latencies overlap): its FP8 code
        pieces by cp.async into the staging area, its RoPE pieces (bf16, stored as is) by
        cp.async to their final place, zeros for an invalid token; then its tokens' scales
        into registers (V32: the record's 4 float32; MODEL1: the 8 ue8m0 bytes, as 2
        words).  Lanes 4 j .. 4 j + 3 together read 64 contiguous bytes of a token per
        copy.  Returns (scales, codes) with the copies in flight (one cp.async group; the
        caller waits, and each lane then reads only what it staged itself).  With
        ``raw_in_registers`` the codes go to the lane's registers instead (``codes``: (4
        words, groups, 2 tokens); None otherwise), and only RoPE goes by cp.async.  ``gathered``:
        the (scales, codes) the lane already holds (``gather_during_convert``); then only RoPE is
        issued here.  ``scale_dst`` (``stage_ahead``): the scales go by cp.async to this lane's
        slots there instead (zeros for an invalid token), in the same group."""
        raw_lane, rope_sw, _ = offs
        early = gathered is not None
        if cutlass.const_expr(early):
            scales, codes = gathered
        else:
            scales, codes = self.lane_registers()
        for k in cutlass.range_constexpr(2):
            tok_rec, tok_sc = self.lane_token(rec, sc, k, lane)
            raw_dst = stage_base + raw_lane + 512 * k
            rope_dst = stage_base + cute.crd2idx((8 * k, 0, 0), sK_outer) * 2
            if tok_rec < 0:
                if cutlass.const_expr(not early):
                    self.token_codes(None, k, codes, raw_dst, sK_outer)
                self.token_rope(None, rope_dst, rope_sw)
                if cutlass.const_expr(scale_dst is not None):
                    self.stage_scales(None, tok_sc, scale_dst + k * self.fmt.scale_slot_bytes)
            else:
                src = tok_rec + Int64(PIECE * (lane % 4))
                if cutlass.const_expr(not early):
                    self.token_codes(src, k, codes, raw_dst, sK_outer)
                self.token_rope(src, rope_dst, rope_sw)
                if cutlass.const_expr(scale_dst is not None):
                    self.stage_scales(tok_rec, tok_sc, scale_dst + k * self.fmt.scale_slot_bytes)
                elif cutlass.const_expr(not early):
                    self.token_scales(tok_rec, tok_sc, k, scales)
        cute.arch.cp_async_commit_group()
        return scales, codes

    def lane_registers(self):
        """A lane's scale words (zeros) and, with ``raw_in_registers``, its code registers (else None)."""
        f = self.fmt
        n_words = 4 if f.scale_kind == "float32" else 2
        scales = cute.make_rmem_tensor(cute.make_layout((n_words, 2)), Int32)
        scales.fill(0)
        codes = None
        if self.raw_in_registers:
            codes = cute.make_rmem_tensor(cute.make_layout((4, f.d_nope // 64, 2)), Int32)
        return scales, codes

    @cute.jit
    def gather_registers(self, rec: Int64, sc: Int32, lane: Int32, scales: cute.Tensor, codes: cute.Tensor):
        """(``gather_during_convert``) The codes and scales of this lane's tokens of the block whose
        records are ``rec`` / ``sc`` into ``codes`` / ``scales`` (zeros for an invalid token):
        a request's first block, before the loop takes over."""
        for k in cutlass.range_constexpr(2):
            tok_rec, tok_sc = self.lane_token(rec, sc, k, lane)
            if tok_rec < 0:
                self.token_codes(None, k, codes, Int32(0), None)
            else:
                self.token_codes(tok_rec + Int64(PIECE * (lane % 4)), k, codes, Int32(0), None)
                self.token_scales(tok_rec, tok_sc, k, scales)

    @cute.jit
    def lane_token(self, rec: Int64, sc: Int32, k: int, lane: Int32):
        """(record address, scale offset) of this lane's token k (of 2): tokens l // 4 and
        8 + l // 4, whose records lanes l // 4 + 8 k resolved (``token_record``)."""
        src_lane = lane // 4 + 8 * k
        return self.shuffle_i64(rec, src_lane), cute.arch.shuffle_sync(sc, src_lane)

    @cute.jit
    def token_codes(self, src, k: int, codes, raw_dst: Int32, sK_outer: cute.Layout):
        """Quarter l % 4 of each 64-code group of this lane's token k, from ``src`` (its record
        plus the quarter's offset; None: an invalid token, zeros): into ``codes[None, g, k]``
        (registers), or, with ``codes`` None, by cp.async into the staging area at ``raw_dst``."""
        zeros = cute.make_rmem_tensor(cute.make_layout(4), Int32)
        zeros.fill(0)
        for g in cutlass.range_constexpr(self.fmt.d_nope // 64):
            if cutlass.const_expr(codes is not None):
                self.group_codes(src, k, g, codes)
            else:
                staged = raw_dst + cute.crd2idx((0, 64 * g, 0), sK_outer) * 2
                if cutlass.const_expr(src is None):
                    store_16B_shared(zeros, staged)
                else:
                    copy_16B_async(src + Int64(64 * g), staged)

    @cute.jit
    def group_codes(self, src, k: int, g: int, codes: cute.Tensor):
        """Quarter l % 4 of 64-code group g of this lane's token k into ``codes[None, g, k]``,
        from ``src`` as for ``token_codes`` (None: zeros)."""
        if cutlass.const_expr(src is None):
            for w in cutlass.range_constexpr(4):
                codes[w, g, k] = Int32(0)
        else:
            load_16B(src + Int64(64 * g), codes[None, g, k])

    @cute.jit
    def token_rope(self, src, rope_dst: Int32, rope_sw: Int32):
        """RoPE pieces q and q + 4 (q = l % 4) of this lane's token, from ``src`` as for
        ``token_codes`` (None: zeros), by cp.async to their place in its row at ``rope_dst``, as
        stored (bf16).  No group committed."""
        zeros = cute.make_rmem_tensor(cute.make_layout(4), Int32)
        zeros.fill(0)
        for m in cutlass.range_constexpr(2):
            if cutlass.const_expr(src is None):
                store_16B_shared(zeros, rope_dst + (rope_sw ^ (4 * PIECE * m)))
            else:
                copy_16B_async(src + Int64(self.rope_offset + 4 * PIECE * m), rope_dst + (rope_sw ^ (4 * PIECE * m)))

    @cute.jit
    def token_scales(self, tok_rec: Int64, tok_sc: Int32, k: int, scales: cute.Tensor):
        """This lane's (valid) token k's scales into ``scales[None, k]``: V32 the record's 4
        float32, MODEL1 the 8 ue8m0 bytes as 2 words (at record + ``tok_sc``)."""
        if cutlass.const_expr(self.fmt.scale_kind == "float32"):
            load_16B(tok_rec + Int64(self.scale_offset), scales[None, k])
        else:
            load_8B(tok_rec + Int64(tok_sc), scales[None, k])

    @cute.jit
    def stage_scales(self, tok_rec, tok_sc: Int32, dst: Int32):
        """(``stage_ahead``) A token's scales by cp.async to the shared slot at ``dst`` (V32 the
        record's 16 bytes, MODEL1 the 8 at record + ``tok_sc``); ``tok_rec`` None: an invalid
        token, zeros."""
        f = self.fmt
        if cutlass.const_expr(tok_rec is None):
            zeros = cute.make_rmem_tensor(cute.make_layout(f.scale_slot_bytes // 4), Int32)
            zeros.fill(0)
            if cutlass.const_expr(f.scale_kind == "float32"):
                store_16B_shared(zeros, dst)
            else:
                store_8B_shared(zeros, dst)
        elif cutlass.const_expr(f.scale_kind == "float32"):
            copy_16B_async(tok_rec + Int64(self.scale_offset), dst)
        else:
            copy_8B_async(tok_rec + Int64(tok_sc), dst)

    @cute.jit
    def convert_raw(self, scales: cute.Tensor, codes, stage_base: Int32, offs, sK_outer: cute.Layout, lane: Int32,
                    ahead=None):
        """Staged FP8 codes -> f16 in place, one 64-column group at a time: lane l takes the
        16 codes of quarter l % 4 of tokens l // 4 and 8 + l // 4, the pieces it staged
        (each 8-lane phase reads 128 consecutive bytes and writes 8 distinct 16-byte bank
        groups), or (``codes`` not None) the pieces it holds in registers; then, where RoPE
        is part of the f16 matmuls (MODEL1), the bf16 RoPE pieces it copied -> f16 in place.
        ``ahead`` (``gather_during_convert``): the next block's records (``rec``, ``sc``); each
        group's registers take the next block's codes once converted, ``scales`` its scales once
        all groups are, and this block's RoPE copies are waited for here, before RoPE's turn."""
        f = self.fmt
        raw_lane, rope_sw, out_sw = offs
        dequant = dequant_e4m3x4 if self.dtype == cutlass.Float16 else dequant_e4m3x4_bf16
        next_toks = []
        next_scales = None
        if cutlass.const_expr(ahead is not None):
            next_scales, _ = self.lane_registers()
            for k in cutlass.range_constexpr(2):
                next_toks.append(self.lane_token(ahead[0], ahead[1], k, lane))
                if cutlass.const_expr(self.prefetch_rope_ahead):
                    tok_rec, _ = next_toks[k]
                    if tok_rec >= 0 and lane % 4 < 2:  # the first and last byte of its RoPE
                        prefetch_l2(tok_rec + Int64(self.rope_offset + 127 * (lane % 4)))
        for g in cutlass.range_constexpr(f.d_nope // 64):
            if cutlass.const_expr(codes is not None):
                raw = codes[None, g, None]
            else:
                raw = cute.make_rmem_tensor(cute.make_layout((4, 2)), Int32)
                for k in cutlass.range_constexpr(2):
                    load_16B_shared(stage_base + raw_lane + cute.crd2idx((0, 64 * g, 0), sK_outer) * 2 + 512 * k,
                                    raw[None, k])
                # every lane has read this group's staging before any lane overwrites it
                cute.arch.sync_warp()
            for k in cutlass.range_constexpr(2):
                if cutlass.const_expr(f.scale_kind == "float32"):
                    scale = f32_from_bits(scales[g * 64 // f.nope_group, k])
                else:
                    scale = ue8m0_to_f32((scales[g // 4, k] >> (8 * (g % 4))) & 0xFF)
                if cutlass.const_expr(self.dtype == cutlass.Float16):
                    scale = f16x2_scale(scale)
                # 8 rows down and whole 64-column blocks across keep a row's swizzle, and piece
                # j = 1 is the odd neighbour (bit 4) of piece 0: constants around one register.
                dst = stage_base + cute.crd2idx((8 * k, 64 * g, 0), sK_outer) * 2
                for j in cutlass.range_constexpr(2):
                    out = cute.make_rmem_tensor(cute.make_layout(4), Int32)
                    out[0], out[1] = dequant(raw[2 * j, k], scale)
                    out[2], out[3] = dequant(raw[2 * j + 1, k], scale)
                    store_16B_shared(out, dst + (out_sw ^ (PIECE * j)))
            if cutlass.const_expr(ahead is not None):
                for k in cutlass.range_constexpr(2):
                    self.next_group(next_toks[k], k, g, codes, next_scales, lane)
        if cutlass.const_expr(ahead is not None):
            for i in cutlass.range_constexpr(cute.size(scales)):
                scales[i] = next_scales[i]
            cute.arch.cp_async_wait_group(0)  # this block's RoPE
        # RoPE inside the f16 matmuls (MODEL1: V includes it) -> f16; V32 keeps it bf16
        for k in cutlass.range_constexpr(2 if self.convert_rope else 0):
            rope_dst = stage_base + cute.crd2idx((8 * k, 0, 0), sK_outer) * 2
            for m in cutlass.range_constexpr(2):
                piece = cute.make_rmem_tensor(cute.make_layout(4), Int32)
                load_16B_shared(rope_dst + (rope_sw ^ (4 * PIECE * m)), piece)
                for w in cutlass.range_constexpr(4):
                    piece[w] = bf16x2_to_f16x2(piece[w])
                store_16B_shared(piece, rope_dst + (rope_sw ^ (4 * PIECE * m)))

    @cute.jit
    def next_group(self, tok, k: int, g: int, codes: cute.Tensor, scales: cute.Tensor, lane: Int32):
        """(``gather_during_convert``) The next block's codes of group g of this lane's token k
        (``tok``: its record and scale offset) into ``codes[None, g, k]``, zeros if invalid;
        with group 0, the token's scales into ``scales[None, k]``."""
        tok_rec, tok_sc = tok
        if tok_rec < 0:
            self.group_codes(None, k, g, codes)
        else:
            self.group_codes(tok_rec + Int64(PIECE * (lane % 4)), k, g, codes)
            if cutlass.const_expr(g == 0):
                self.token_scales(tok_rec, tok_sc, k, scales)

    @cute.jit
    def shuffle_i64(self, v: Int64, src_lane: Int32) -> Int64:
        lo = cute.arch.shuffle_sync(Int32(v), src_lane)
        hi = cute.arch.shuffle_sync(Int32(v >> 32), src_lane)
        return (Int64(hi) << 32) | (Int64(lo) & 0xFFFFFFFF)

    # ------------------------------------------------------------------ consumers
    @cute.jit
    def consume(self, qk_mma: cute.TiledMma, pv_mma: cute.TiledMma, qk_tail_mma: cute.TiledMma, sQ: cute.Tensor,
                sK: cute.Tensor, sP: cute.Tensor, sStat: cute.Tensor, sBias: cute.Tensor,
                sV_layout: cute.ComposedLayout, mQ: cute.Tensor, lengths: SlotLengths, mSink: cute.Tensor,
                sched: DecodePart, mOut: cute.Tensor, mLse: cute.Tensor, mOAccum: cute.Tensor, mLseAccum: cute.Tensor,
                kv_pipe, softmax_scale: Float32, has_sink: Int32, mblk: Int32, half: Int32, ctid: Int32):
        wtid = ctid % 128
        thr_qk, thr_pv, tSrQ, tSrK, tScS, tOrP, tOcO = self.consumer_fragments(qk_mma, pv_mma, sQ, sK, sP, half, wtid)
        scale_log2 = softmax_scale * LOG2_E
        token_rows = self.token_rows(mQ)
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        begin_req = sched.begin_req()
        end_req = sched.end_req()
        # Q comes by cp.async, the next piece's during this piece's epilogue (a load at a piece's
        # start paid a global latency there; session 20).  A tile is the row block's heads of one
        # query token: (request r, "kv head" 0, h_p rows per token).
        share = self.q_share(sQ, ctid)
        if begin_req <= end_req:
            self.fetch_q(mQ, QTile(begin_req, 0, mblk, token_rows), share, True)
        for r in cutlass.range(begin_req, end_req + 1, unroll=1):
            lo, hi, split = self.piece(lengths, sched, r, begin_req)
            self.finish_q(share, mQ.element_type)
            acc_o, softmax = self.fresh_rows(thr_pv, scale_log2)
            for blk in cutlass.range(lo, hi, unroll=1):
                self.attend_gathered_block(qk_mma, pv_mma, qk_tail_mma, tSrQ, tSrK, tScS, tOrP, acc_o, softmax, sK, sP,
                                           sStat, sBias, sV_layout, kv_pipe, state, half, wtid)
                state.advance()
            # both consumers waited for their last S before its row maxima were exchanged, so
            # once the row sums are exchanged sQ is free
            finished = self.finish_rows(softmax, tOcO, sStat, half, wtid)
            if r < end_req:
                self.fetch_q(mQ, QTile(r + 1, 0, mblk, token_rows), share, False)
            self.epilogue(acc_o, tOcO, softmax, sStat, mOut, mLse, mOAccum, mLseAccum, r, 0, mblk, token_rows, half,
                          sched.splits(r), sched.split_row(r, split), wtid, mSink, has_sink, finished=finished)
