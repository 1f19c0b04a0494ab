"""Constants of the base-2 softmax bookkeeping shared by the attention and combine kernels.

Kernels keep scores and log-sum-exps in base 2 (exp2 is the fast hardware path) and
convert to natural log only where an lse leaves a kernel.
"""
import math

LOG2_E = math.log2(math.e)  # natural-log value * LOG2_E = base-2 value
LN_2 = math.log(2.0)  # base-2 value * LN_2 = natural-log value
