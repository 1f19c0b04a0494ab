"""The base-2 softmax bookkeeping shared by the attention and combine kernels.

Kernels keep scores and log-sum-exps in base 2 (exp2 is the fast hardware path) and
convert to natural log only where an lse leaves a kernel.  The online softmax (``Softmax``,
its rescale step ``rescale``) and the attention sink's formula (``sink_denominator``) live
here once.
"""
import math
from dataclasses import dataclass
from typing import Any

import cutlass
import cutlass.cute as cute
from cutlass import Float32

LOG2_E = math.log2(math.e)  # natural-log value * LOG2_E = base-2 value
LN_2 = math.log(2.0)  # base-2 value * LN_2 = natural-log value


def sink_denominator(sink, lse2, fastmath: bool):
    """1 + 2^(sink * log2(e) - lse2) for a row of base-2 log-sum-exp ``lse2`` and the head's
    sink logit ``sink``: dividing the row's O by it scales O by exp(lse) / (exp(lse) + exp(sink)).
    A +inf sink gives an infinite denominator (O = 0), a -inf sink gives 1; callers skip rows
    without keys (lse2 = -inf).  Traced inline: it adds no call to the kernel."""
    return 1.0 + cute.math.exp2(sink * LOG2_E - lse2, fastmath=fastmath)


@cute.jit
def output_lse(lse2):
    """The lse a kernel writes for a finalised row of base-2 log-sum-exp ``lse2``: natural log,
    and +inf for a row without a valid key (lse2 = -inf), as FlashMLA writes it."""
    out = Float32.inf
    if lse2 != -Float32.inf:
        out = lse2 * LN_2
    return out


@cute.jit
def rescale(m_old, m_new, scale_log2):
    """(base, factor) of a row (or head) whose running maximum moves from ``m_old`` to ``m_new``
    (raw logits): base = m_new in scaled log2 units, 0 while m_new is -inf (no key yet), so
    exp2(s * scale - base) sees -inf, not NaN; factor = exp2 of the move that rescales the
    running sum and O, 1 while m_old is -inf (they are still 0, and a huge factor would turn 0
    into NaN)."""
    b = m_new * scale_log2
    if m_new == -Float32.inf:
        b = Float32(0.0)
    prev = m_old * scale_log2
    if m_old == -Float32.inf:
        prev = b
    return b, cute.math.exp2(prev - b, fastmath=True)


@dataclass(frozen=True)  # frozen: the DSL passes it through loops and branches as a constant
class Softmax:
    """One thread's online softmax in base 2 over the rows it keeps statistics for: each row's
    running raw (unscaled) maximum ``row_max`` and running sum ``row_sum`` of
    exp2(s * scale_log2 - base), base the scaled maximum.  Made once per tile by ``create``, then
    updated in place by the steps below: passed down, never reassigned.

    A kernel folds a block in with ``online_softmax`` (the seesaw, whose block maxima arrive in
    two stages, with its parts: ``rescale_to``, then ``exponentiate`` or ``scale_sums``),
    rescales its O with ``rescale_o`` and ends with ``finalize``.  Which row element k of a
    thread's accumulator fragment belongs to is ``slot(k)``: row (k // 2) % 2 of the SM90
    64 x N accumulator, whose fragment lists (2 columns, 2 rows, N/8 column groups).  A
    subclass may map them otherwise (``kernels.sm90.heads_consumer.HeadSoftmax``: one per
    column of S^T)."""

    row_max: Any  # (slots,) Float32
    row_sum: Any  # (slots,) Float32
    scale_log2: Any  # softmax scale * log2(e)

    @staticmethod
    def slot(k: int) -> int:
        """The statistic of fragment element k."""
        return (k // 2) % 2

    @classmethod
    def create(cls, slots: int, scale_log2) -> "Softmax":
        """A tile's state before its first block: every maximum -inf, every sum 0."""
        row_max = cute.make_rmem_tensor(cute.make_layout(slots), Float32)
        row_sum = cute.make_rmem_tensor(cute.make_layout(slots), Float32)
        row_max.fill(-Float32.inf)
        row_sum.fill(0.0)
        return cls(row_max, row_sum, scale_log2)

    @cute.jit
    def block_max(self, acc_s: cute.Tensor, m: cute.Tensor):
        """m[slot] = max(m[slot], this thread's logits of that slot in ``acc_s``); no exchange
        between lanes."""
        for k in cutlass.range_constexpr(cute.size(acc_s)):
            m[self.slot(k)] = cute.arch.fmax(m[self.slot(k)], acc_s[k])

    @cute.jit
    def rescale_to(self, m_new: cute.Tensor, base: cute.Tensor, factor: cute.Tensor,
                   fold: cutlass.Constexpr[bool] = False):
        """Move each running maximum to ``m_new`` (with ``fold``, to the larger of the two):
        ``base`` and ``factor`` get each row's ``rescale``.  The sums still want the factor:
        ``exponentiate`` or ``scale_sums``."""
        for h in cutlass.range_constexpr(cute.size(self.row_max)):
            m = m_new[h]
            if cutlass.const_expr(fold):
                m = cute.arch.fmax(m_new[h], self.row_max[h])
            base[h], factor[h] = rescale(self.row_max[h], m, self.scale_log2)
            self.row_max[h] = m

    @cute.jit
    def scale_sums(self, factor: cute.Tensor):
        """Running sums *= factor (a rescale without a block to add)."""
        for h in cutlass.range_constexpr(cute.size(self.row_sum)):
            self.row_sum[h] = self.row_sum[h] * factor[h]

    @cute.jit
    def exponentiate(self, acc_s: cute.Tensor, base: cute.Tensor, factor: cute.Tensor):
        """S -> P = exp2(S * scale_log2 - base) in place; running sums = sums * factor + P's."""
        self.scale_sums(factor)
        for k in cutlass.range_constexpr(cute.size(acc_s)):
            h = self.slot(k)
            p = cute.math.exp2(acc_s[k] * self.scale_log2 - base[h], fastmath=True)
            acc_s[k] = p
            self.row_sum[h] += p

    @cute.jit
    def online_softmax(self, acc_s: cute.Tensor, m_block: cute.Tensor) -> cute.Tensor:
        """Fold a block of (already masked) logits in: ``m_block`` holds the block's maxima over
        whole rows (exchanged between the row's lanes and warpgroups by the caller).  On return
        ``acc_s`` holds P and the result is each row's factor for ``rescale_o``."""
        n = cute.size(self.row_max)
        base = cute.make_rmem_tensor(cute.make_layout(n), Float32)
        factor = cute.make_rmem_tensor(cute.make_layout(n), Float32)
        self.rescale_to(m_block, base, factor, fold=True)
        self.exponentiate(acc_s, base, factor)
        return factor

    @cute.jit
    def rescale_o(self, acc_o: cute.Tensor, factor: cute.Tensor, skip_settled: cutlass.Constexpr[bool] = True):
        """O *= factor, row by row.  With ``skip_settled`` (two rows) nothing is done when both
        factors are exactly 1, as they are once the rows' maxima have settled."""
        if cutlass.const_expr(skip_settled):
            assert cute.size(self.row_max) == 2
            if factor[0] != 1.0 or factor[1] != 1.0:
                self.scale_rows(acc_o, factor)
        else:
            self.scale_rows(acc_o, factor)

    @cute.jit
    def scale_rows(self, acc: cute.Tensor, factor: cute.Tensor):
        """acc *= factor, row by row (an accumulator of the rows' statistics' layout: element k
        in slot ``slot(k % n)``, n its first mode's size)."""
        n = cute.size(acc, mode=[0])
        for k in cutlass.range_constexpr(cute.size(acc)):
            acc[k] = acc[k] * factor[self.slot(k % n)]

    @cute.jit
    def finalize(self, sink_of=None, use_sink=None):
        """(lse2, inv) of each row, once ``row_sum`` holds the whole row's sum: its base-2
        log-sum-exp and O's factor 1 / sum; a row without a valid key gets -inf and 0 (so
        O = 0, never NaN).  With ``sink_of`` (row -> its head's sink logit), a row with keys
        is also scaled by the sink (``sink_denominator``) where ``use_sink()`` holds: a
        callable, traced inside each row's branch (the sink is read only there; the condition
        computed once before the loop gave the heads kernel other SASS, session 17)."""
        n = cute.size(self.row_max)
        lse2 = cute.make_rmem_tensor(cute.make_layout(n), Float32)
        inv = cute.make_rmem_tensor(cute.make_layout(n), Float32)
        for h in cutlass.range_constexpr(n):
            s = self.row_sum[h]
            lse2[h] = -Float32.inf
            inv[h] = Float32(0.0)
            if s > 0.0:
                lse2[h] = self.row_max[h] * self.scale_log2 + cute.math.log2(s, fastmath=False)
                inv[h] = 1.0 / s
                if cutlass.const_expr(sink_of is not None):
                    if use_sink():
                        inv[h] = inv[h] / sink_denominator(sink_of(h), lse2[h], fastmath=False)
        return lse2, inv
