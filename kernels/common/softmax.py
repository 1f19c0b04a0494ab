"""The base-2 softmax bookkeeping shared by the attention and combine kernels.

Kernels keep scores and log-sum-exps in base 2 (exp2 is the fast hardware path) and
convert to natural log only where an lse leaves a kernel.  The online softmax's rescale step
(``rescale``) and the attention sink's formula (``sink_denominator``) live here once.
"""
import math

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
