"""The numbers every side of cute-mla shares: the kernels, their ABIs, the plans, the decode
schedulers and the tests read each one here (a leaf module: it imports nothing, so runtime
code and DSL code both can).
"""

D_V = 512  # every MLA kernel here writes 512-wide V rows
PAGE_BLOCK_SIZE = 64  # tokens per page of the dense (bf16/fp16) KV cache

BLOCK_M = 64  # query rows an SM90 attention CTA works on at once (a row block)
BLOCK_N = 64  # KV tokens per block: a kernel's main-loop step and the decode schedule's unit
# the shared memory an SM90 CTA's kernel may allocate: the 227 KiB opt-in less the 1 KiB the
# DSL's allocator reserves
SM90_SMEM_BYTES = 231424
SPARSE_PREFILL_HEAD_BLOCK = BLOCK_M  # query heads per CTA of the sparse prefill kernel
# h_q the small-head sparse decode kernel is built for (its MMAs' N).  h_q 32 runs the 64-row
# kernel: on the one-warpgroup heads kernel it built without spilling, but ran 0.70-0.80x the
# 64-row kernel's speed at b 32 and on MODEL1, 1.05x only at V32 b 128 (session 19).
SPARSE_DECODE_SMALL_HEADS = (8, 16)
# h_q the small-head dense decode kernel is built for (h_kv 1; the same consumer): also 32, where
# the 64-row kernel pads half its rows (b 32 s_q 1 h_q 32 1.086x it, b 128 1.018x; H100, session 29)
DENSE_DECODE_SMALL_HEADS = SPARSE_DECODE_SMALL_HEADS + (32,)
# query tokens one of its CTAs may take (s_q of a call), so that each page streams once for all
# of them, and the most columns (tokens x heads: the MMAs' N) it is built for.  Against the
# 64-row kernel at s_q 2: b 32 h_q 8 / 16 1.145x / 1.089x, b 128 1.031x / 1.023x (H100, session 29)
DENSE_DECODE_TOKENS = (1, 2, 4)
DENSE_DECODE_MAX_COLUMNS = 32
COMBINE_HEADS_PER_CTA = 4  # the combine kernel runs one warp per head row, 4 a CTA
# Calls of at most this many rows (b * s_q * h_q) run the combine's ``columns`` variant: a CTA a
# row, a warp its 128 columns, so a few rows still spread over every SM.  Against the warp-a-row
# kernel (H100, session 28, 3 rounds, perf/results/NOTES.md): 256-512 rows +2-14% (sparse b 2,
# b 32 s_q 1 h_q 8 / 16), 1024 rows and more 0.79-0.96 (b 32 s_q 2 h_q 16 / 32, b 64-148), the
# combine's own cases of 2048-32768 rows 0.53-0.88.
COMBINE_COLUMNS_MAX_ROWS = 512

# ``sched_meta[part]``: SCHED_META_FIELDS int32 fields, named below (``schedules.decode_plan``
# describes the plan); fields 5..7 are zero.
SCHED_META_FIELDS = 8
META_BEGIN_REQ = 0  # first request of the part
META_BEGIN_BLOCK = 1  # first KV block in it
META_END_REQ = 2  # last request of the part (inclusive; < META_BEGIN_REQ: an empty part)
META_END_BLOCK = 3  # one past the last KV block in it
META_BEGIN_SPLIT = 4  # the split index the part writes for its first request

# The slots of ``split_counters`` (``layouts.operands.split_counters``): the ticket, the
# finished CTAs, and the first split count.
SPLIT_TICKET, SPLIT_FINISHED, SPLIT_COUNTS = 0, 1, 2
