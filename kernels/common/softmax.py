"""The base-2 softmax bookkeeping shared by the attention and combine kernels.

Kernels keep scores and log-sum-exps in base 2 (exp2 is the fast hardware path) and
convert to natural log only where an lse leaves a kernel.  The attention sink's formula
lives here once (``sink_denominator``).
"""
import math

import cutlass.cute as cute

LOG2_E = math.log2(math.e)  # natural-log value * LOG2_E = base-2 value
LN_2 = math.log(2.0)  # base-2 value * LN_2 = natural-log value


def sink_denominator(sink, lse2, fastmath: bool):
    """1 + 2^(sink * log2(e) - lse2) for a row of base-2 log-sum-exp ``lse2`` and the head's
    sink logit ``sink``: dividing the row's O by it scales O by exp(lse) / (exp(lse) + exp(sink)).
    A +inf sink gives an infinite denominator (O = 0), a -inf sink gives 1; callers skip rows
    without keys (lse2 = -inf).  Traced inline: it adds no call to the kernel."""
    return 1.0 + cute.math.exp2(sink * LOG2_E - lse2, fastmath=fastmath)
