"""SM90 FP8 sparse decode for 8 or 16 query heads, with the heads on the MMA's N side.

The consumer is ``kernels.sm90.heads_consumer.HeadsOnN`` (S^T = K Q^T, O^T = V^T P^T, one
warpgroup: no padding rows); the producer, KV ring, split-KV schedule and outputs are the 64-row
kernel's (``kernels.sm90.sparse_decode``).  With this kernel's 256 threads the producer can keep
its FP8 codes in registers (``__init__``), and the ring holds as many stages as fit (MODEL1 3,
V32 2).  One warpgroup with the codes in registers ran V32 at 1.07-1.17x the two-warpgroup
kernel's speed (0.96x at b 32 s_q 1 h_q 16) and MODEL1 at 0.97-1.02x (perf/results/NOTES.md,
session 19).
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Int32

from cute_mla.kernels.sm90.heads_consumer import HeadsOnN
from cute_mla.kernels.sm90.sparse_decode import SparseDecodeSm90
from cute_mla.layouts.constants import SPARSE_DECODE_SMALL_HEADS


class SparseDecodeHeadsSm90(HeadsOnN, SparseDecodeSm90):
    """``SparseDecodeSm90`` with the heads on N; ``heads`` = h_q
    (``layouts.constants.SPARSE_DECODE_SMALL_HEADS``)."""

    def __init__(self, fmt: str, matmul: str = "f16", heads: int = 16):
        assert heads in SPARSE_DECODE_SMALL_HEADS
        # 256 threads launch with the consumers' 240 registers each (ptxas takes the kernel's
        # count from the largest setmaxnreg), so the producer can hold its lane's 256 FP8 codes
        # (64 registers) from the gather to the conversion: no staging round trip through
        # shared memory.  That ran 1.04-1.12x faster on V32 and at h_q 8 (MODEL1 h_q 16
        # 0.97-0.99x; perf/results/NOTES.md, session 19).  Producer 192 with consumer 240 leaves
        # every variant, both matmul types, without local memory: at 216 / 216 the non-default
        # types spilled at every producer count, and beside 240 consumer registers only producer
        # counts 192 and 216 of 184-240 were clean everywhere (session 20; ptxas is not monotonic
        # here).  (Set before the base class checks the split.)
        self.raw_in_registers = True
        self.regs_producer = 192
        self.regs_consumer = 240
        # f16 matmuls (V32's default; MODEL1's on request): the next block's codes are gathered
        # during this block's conversion, which needs 224 producer registers (no local memory
        # there; 192 spilled 4-18 instructions, 216 with the RoPE prefetch 8).  Measured against
        # the plain gather (session 25, H100, 2 rounds beside FlashMLA): V32 b 128 +1.7-2.6%,
        # b 32 s_q 2 +1.2-1.4%, b 32 s_q 1 +0.3-1.6%; without the RoPE prefetch (the plain
        # gather's record prefetch had covered those lines) V32 lost 1-2%.  bf16 keeps the plain
        # gather: MODEL1's ran 0.96-0.99x with it (c8, clean at 224), V32's spills at every count.
        self.gather_during_convert = matmul == "f16"
        if self.gather_during_convert:
            self.regs_producer = 224
            self.prefetch_rope_ahead = True
        # MODEL1 (3 stages): the codes staged in the ring, block j + 1's copies issued before
        # block j's conversion (``stage_ahead``)
        if fmt == "MODEL1":
            self.raw_in_registers = False
            self.gather_during_convert = False
            self.prefetch_rope_ahead = False
            self.regs_producer = 192
            self.stage_ahead = True
            # c11's profile (H100, MODEL1 b 128 h_q 16): the producer waited for an empty stage
            # (7% of samples) while the consumers, holding two, waited for a full one (17%)
            self.overlap_blocks = False
        super().__init__(fmt, matmul)
        self.size_ring(heads)

    @cute.jit
    def mask_logits(self, acc_s: cute.Tensor, tScS: cute.Tensor, sBias: cute.Tensor, stage: Int32):
        """S^T plus each gathered slot's logit bias (0, or -inf for a slot that gathered nothing,
        whose zero row gives a finite logit)."""
        for k in cutlass.range_constexpr(cute.size(acc_s)):
            t, _ = tScS[k]
            acc_s[k] = acc_s[k] + sBias[t, stage]
