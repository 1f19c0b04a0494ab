"""SM90 FP8 sparse decode for 8 or 16 query heads, with the heads on the MMA's N side.

The consumer is ``kernels.sm90.heads_consumer.HeadsOnN`` (S^T = K Q^T, O^T = V^T P^T, one
warpgroup: no padding rows); the producer, KV ring, split-KV schedule and outputs are the 64-row
kernel's (``kernels.sm90.sparse_decode``).  The ring holds as many stages as fit (MODEL1 3, V32
2).  With this kernel's 256 threads V32's producer keeps its FP8 codes in registers; one warpgroup
so ran V32 at 1.07-1.17x the two-warpgroup kernel's speed (0.96x at b 32 s_q 1 h_q 16;
perf/results/NOTES.md, session 19).  MODEL1's producer instead stages its codes in the ring one
block ahead of its conversion, beside a consumer that holds one stage (``__init__``; session 26).
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
        # count from the largest setmaxnreg).  Producer 192 with consumer 240 leaves every
        # variant, both matmul types, without local memory: at 216 / 216 the non-default types
        # spilled at every producer count, and beside 240 consumer registers only producer
        # counts 192 and 216 of 184-240 were clean everywhere (session 20; ptxas is not monotonic
        # here).  (Set before the base class checks the split.)
        self.regs_producer = 192
        self.regs_consumer = 240
        if fmt == "MODEL1":
            # MODEL1 (3 stages): the codes are staged in the ring, and block j + 1's copies, its
            # scales included, are issued before block j's conversion (``stage_ahead``: no load
            # of the next block then shares a scoreboard with this block's conversion), while
            # the consumer holds one stage at a time (no ``overlap_blocks``), so the producer has
            # two.  Staging ahead alone was 0.99-1.02x (c11: its profile, H100 b 128 h_q 16, had
            # the producer waiting for an empty stage, 7% of samples, and the consumer, holding
            # two, for a full one, 17%); with one stage held, against the codes in registers
            # (session 26, H100, 2 rounds beside FlashMLA, bf16 matmuls): b 128 +7.2-10.4%,
            # b 32 s_q 2 +5.0-6.9%, b 32 s_q 1 -0.2-+0.6%.  (f16 MODEL1 stages ahead too; untimed.)
            self.stage_ahead = True
            self.overlap_blocks = False
        else:
            # V32 (2 stages): the producer holds its lane's 256 FP8 codes (64 registers) from the
            # gather to the conversion, with no staging round trip through shared memory; that
            # ran 1.04-1.12x faster (perf/results/NOTES.md, session 19).
            self.raw_in_registers = True
            if matmul == "f16":
                # V32's f16 (default) matmuls: the next block's codes are gathered during this
                # block's conversion, which needs 224 producer registers (no local memory there; 192
                # spilled 4-18 instructions, 216 with the RoPE prefetch 8).  Measured against the
                # plain gather (session 25, H100, 2 rounds beside FlashMLA): b 128 +1.7-2.6%, b 32
                # s_q 2 +1.2-1.4%, b 32 s_q 1 +0.3-1.6%; without the RoPE prefetch (the plain gather's
                # record prefetch had covered those lines) it lost 1-2%.  MODEL1's bf16 kernels ran
                # 0.96-0.99x with it (c8); V32's bf16 spill at every count, and keep the plain gather.
                self.gather_during_convert = True
                self.regs_producer = 224
                self.prefetch_rope_ahead = True
        super().__init__(fmt, matmul)
        self.size_ring(heads)

    @cute.jit
    def mask_logits(self, acc_s: cute.Tensor, tScS: cute.Tensor, sBias: cute.Tensor, stage: Int32):
        """S^T plus each gathered slot's logit bias (0, or -inf for a slot that gathered nothing,
        whose zero row gives a finite logit)."""
        for k in cutlass.range_constexpr(cute.size(acc_s)):
            t, _ = tScS[k]
            acc_s[k] = acc_s[k] + sBias[t, stage]
