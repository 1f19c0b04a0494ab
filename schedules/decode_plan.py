"""Split-KV planning for the decode kernels (host side, runtime code: no DSL).

The decode kernels run on a persistent grid of ``num_sm_parts`` CTAs per
(kv head, query-row block).  The plan cuts the concatenation of all requests'
KV blocks (``block_n`` tokens each) into ``num_sm_parts`` contiguous pieces of
about equal cost, where a request costs its block count plus a fixed overhead
(``FIXED_OVERHEAD_BLOCKS``: the prologue/epilogue of a split in units of main-loop
blocks; 12 was measured on the SM90 dense kernel, H200, b=128, h_q=128: against
FlashMLA's 5 it took s_k=4096 from 0.476 to 0.495 of the GEMM rate at s_q=1 and from
0.513 to 0.548 at s_q=2, longer lengths unchanged; with 5, ncu showed the busiest SM
11% above the average, the parts with the most pieces finishing last).

A piece may start or end inside a request; such a request is then computed as
several splits whose partial results the combine kernel merges.

``sched_meta[part]`` (int32, ``SCHED_META_FIELDS`` wide; the field indices are named in
``layouts.constants``):
  META_BEGIN_REQ    first request of the part
  META_BEGIN_BLOCK  first KV block (of ``block_n`` tokens) in it
  META_END_REQ      last request of the part (inclusive; < META_BEGIN_REQ: empty part)
  META_END_BLOCK    one past the last KV block in it
  META_BEGIN_SPLIT  split index the part writes for its first request
  (fields 5..7 are zero, reserved)
``split_offsets[i]`` (b + 1 entries): request i owns partial rows
``split_offsets[i] .. split_offsets[i + 1]``; a request with one split needs no combine.

The same arithmetic runs on the GPU in ``schedules.decode_scheduler`` (the path
used at inference, with no host sync); ``plan_host`` is its reference.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

from cute_mla.layouts.constants import (BLOCK_M, BLOCK_N, META_BEGIN_BLOCK, META_BEGIN_REQ, META_BEGIN_SPLIT,
                                        META_END_BLOCK, META_END_REQ, SCHED_META_FIELDS)

FIXED_OVERHEAD_BLOCKS = 12
# A light plan, whose parts average at most LIGHT_LOAD_BLOCKS KV blocks, counts a piece's fixed
# cost as ``light_overhead`` instead (``piece_overhead``).  There a part holds one or two pairs
# of blocks, and 12 rounded every part of dense b 5 s_q 3 (about 1.5 blocks a part) up to 3
# blocks, a pair and a lone block, where 2 makes it 2, one pair: 29.6 us against 32.1, 3 rounds
# each, FlashMLA 26.4-26.6 beside them (perf/results/NOTES.md, session 31, H100); 5 gave the
# same parts as 12 there.  The 64-row dense kernel plans light loads with
# DENSE_LIGHT_FIXED_OVERHEAD_BLOCKS; every other plan counts the same cost either way.
LIGHT_LOAD_BLOCKS = 4
DENSE_LIGHT_FIXED_OVERHEAD_BLOCKS = 2
# The sparse decode path plans with its own value, measured: a sweep of 12 / 2 / 5 / 8 on an
# H100 (perf/results/NOTES.md, session 4) left the V32 cases unchanged and took 3.5-4% off
# MODEL1 h_q 128 at b 128 and 256 with 2.
SPARSE_FIXED_OVERHEAD_BLOCKS = 2
# Fewer heads than a row block (h_q 8 / 16 / 32) split with none: a piece's fixed cost is its
# query load and its partial rows, h_q of them against 64 or 128, and with a few blocks a part
# the overhead mostly moves the plan's rounding (MODEL1 b 32 topk 512 at 132 parts: 96 parts of
# 3 blocks and 36 idle with 2, 128 parts of 2 with 0).  Measured (perf/results/NOTES.md,
# session 27, H100, against 2): b 32 +2.8-7.8% at h_q 8 / 16 (c16, 3 rounds) and +2.4-7.7% at
# h_q 32 (c13, 2 rounds: the same plans), b 128 unchanged (one request a part either way);
# 0 at h_q 64 / 128 too (c13) lost up to 12% (MODEL1 b 2, extra cache), where a piece's 128-256
# partial rows and the combine outweigh the shorter parts; and 26% where 0 in the whole-request
# check split V32 b 74 topk 512 (so ``sparse_split`` checks whole plans with 2 at any h_q).
SPARSE_FEW_HEADS_FIXED_OVERHEAD_BLOCKS = 0
# The longest length a plan counts: its block count (rounded up) still fits int32.  Callers
# clamp lengths to their requests' capacity, which must not exceed it.
MAX_PLAN_LEN = 2**31 - BLOCK_N


def num_sm_parts(num_sms: int, s_q: int, h_q: int, h_kv: int, block_m: int = BLOCK_M) -> int:
    """How many persistent CTAs share the KV of one (kv head, row block).

    Every (kv head, row block) pair gets its own set of parts, so all of them
    together fill the GPU once.
    """
    rows = s_q * (h_q // h_kv)
    return max(num_sms // h_kv // cdiv(rows, block_m), 1)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers (b > 0)."""
    return -(-a // b)


def piece_overhead(blocks: int, parts: int, fixed_overhead: int, light_overhead: int) -> int:
    """The fixed cost a piece that a plan of ``blocks`` KV blocks in all over ``parts`` parts
    counts: ``light_overhead`` when they average at most LIGHT_LOAD_BLOCKS a part, else
    ``fixed_overhead`` (the GPU scheduler decides the same way)."""
    return light_overhead if blocks <= LIGHT_LOAD_BLOCKS * parts else fixed_overhead


def check_plan_fits(b: int, max_len: int, parts: int, block_n: int = BLOCK_N,
                    fixed_overhead: int = FIXED_OVERHEAD_BLOCKS) -> None:
    """Raise ValueError unless every quantity the GPU scheduler computes for ``b`` requests of
    at most ``max_len`` tokens fits int32 (lengths past ``max_len`` are clamped to it)."""
    if not 0 <= max_len <= MAX_PLAN_LEN:
        raise ValueError(f"a request may hold at most {MAX_PLAN_LEN} tokens, got a capacity of {max_len}")
    worst = b * (cdiv(max_len, block_n) + fixed_overhead) + parts * fixed_overhead + b + parts
    if worst >= 2**31:
        raise ValueError(f"{b} requests of up to {max_len} tokens are too many KV blocks to plan "
                         f"({worst} >= 2^31); split the batch")


def max_plan_len(b: int, parts: int, block_n: int = BLOCK_N, fixed_overhead: int = FIXED_OVERHEAD_BLOCKS) -> int:
    """The largest ``max_len`` that ``check_plan_fits`` accepts for ``b`` requests."""
    room = (2**31 - 1 - parts * fixed_overhead - b - parts) // max(b, 1) - fixed_overhead
    return max(0, min(MAX_PLAN_LEN, room * block_n))


def plan_host(cache_seqlens: Sequence[int], parts: int, block_n: int = BLOCK_N,
              fixed_overhead: int = FIXED_OVERHEAD_BLOCKS,
              max_len: int = MAX_PLAN_LEN, light_overhead: "int | None" = None) -> tuple[list[list[int]], list[int]]:
    """Plan on the host: returns (sched_meta rows, split_offsets); lengths are clamped to
    [0, max_len], as the GPU scheduler does.  A light plan counts ``light_overhead`` a piece
    (``piece_overhead``; default: ``fixed_overhead``, as every plan does but dense decode's)."""
    b = len(cache_seqlens)
    nblocks = [cdiv(min(max(int(s), 0), max_len), block_n) for s in cache_seqlens]  # negative = empty
    light = fixed_overhead if light_overhead is None else light_overhead
    fixed_overhead = piece_overhead(sum(nblocks), parts, fixed_overhead, light)
    total = sum(nblocks) + fixed_overhead * b
    payload = cdiv(total, parts) + fixed_overhead
    meta = []
    offsets = [0] * (b + 1)
    req, blk, split, cum = 0, 0, 0, 0
    for _ in range(parts):
        begin = [req, blk, split]
        remain = payload
        done = False
        while req < b and not done:
            left = nblocks[req] - blk
            if remain >= left + fixed_overhead:
                cum += split + 1
                offsets[req + 1] = cum
                remain -= left + fixed_overhead
                req, blk, split = req + 1, 0, 0
            else:
                if remain - fixed_overhead > 0:
                    blk += remain - fixed_overhead
                    split += 1
                done = True
        if blk > 0:
            end_req, end_blk = req, blk
        else:
            end_req, end_blk = req - 1, nblocks[req - 1] if req > 0 else 0
        row = [0] * SCHED_META_FIELDS
        row[META_BEGIN_REQ], row[META_BEGIN_BLOCK], row[META_BEGIN_SPLIT] = begin
        row[META_END_REQ], row[META_END_BLOCK] = end_req, end_blk
        meta.append(row)
    for r in range(req, b):  # never taken (the parts cover the batch); the GPU has the same guard
        offsets[r + 1] = cum
    return meta, offsets


# What the combine launch costs, in main-loop blocks of the sparse decode kernel: 6-12.6 us
# (H100, perf/results/NOTES.md session 8: 6.1 us with nothing to merge, 12.6 at V32 b 128)
# against about 3 us a block (the V32 b 128 split kernel: 377 us for about 124 blocks a part).
COMBINE_COST_BLOCKS = 3


def whole_request_parts(b: int, length: int, parts: int, block_n: int = BLOCK_N,
                        fixed_overhead: int = SPARSE_FIXED_OVERHEAD_BLOCKS) -> "int | None":
    """For ``b`` requests of one known ``length``: the part count at most ``parts`` whose plan
    gives every request one split, so no combine is needed, when that is no slower than
    ``parts`` parts with split requests plus the combine (cost in blocks, COMBINE_COST_BLOCKS);
    else None.  The plan is checked with ``plan_host``, which the GPU scheduler matches."""
    if b < 1 or length <= 0:
        return None
    cost = cdiv(length, block_n) + fixed_overhead  # one request
    per = cdiv(b, parts)  # requests a part takes when none is split
    whole = cdiv(b, per)
    split = cdiv(b * cost, parts) + fixed_overhead + COMBINE_COST_BLOCKS
    if per * cost >= split:  # a tie keeps every SM busy
        return None
    _, offsets = plan_host([length] * b, whole, block_n, fixed_overhead)
    if any(hi - lo != 1 for lo, hi in zip(offsets, offsets[1:])):
        return None
    return whole


class SparseSplit(NamedTuple):
    """How a sparse decode call is planned (``sparse_split``)."""
    parts: int  # persistent CTAs per row block
    fixed_overhead: int  # the scheduler's overhead per piece, in blocks
    splits: bool  # whether a request may be split (so a combine follows)


def sparse_split(b: int, length: int, parts: int, h_q: int, lengths_known: bool) -> SparseSplit:
    """The plan of ``b`` sparse decode requests of ``h_q`` heads and at most ``length`` slots over
    at most ``parts`` parts: whole requests a part when their lengths are known (no length
    tensor) and ``whole_request_parts`` finds that no slower; else split, with
    ``SPARSE_FEW_HEADS_FIXED_OVERHEAD_BLOCKS`` a piece when h_q is under a row block.  A
    whole-request plan keeps ``SPARSE_FIXED_OVERHEAD_BLOCKS``, the overhead its
    one-split-a-request check ran with."""
    whole = whole_request_parts(b, length, parts) if lengths_known else None
    if whole is not None:
        return SparseSplit(whole, SPARSE_FIXED_OVERHEAD_BLOCKS, False)
    overhead = SPARSE_FEW_HEADS_FIXED_OVERHEAD_BLOCKS if h_q < BLOCK_M else SPARSE_FIXED_OVERHEAD_BLOCKS
    return SparseSplit(parts, overhead, True)


def part_work(meta_row: Sequence[int], nblocks: Sequence[int]):
    """Expand one part into (request, first block, end block, split index) pieces,
    exactly as a decode kernel walks it."""
    begin_req, begin_blk = meta_row[META_BEGIN_REQ], meta_row[META_BEGIN_BLOCK]
    end_req, end_blk = meta_row[META_END_REQ], meta_row[META_END_BLOCK]
    begin_split = meta_row[META_BEGIN_SPLIT]
    out = []
    for r in range(begin_req, end_req + 1):
        lo = begin_blk if r == begin_req else 0
        hi = end_blk if r == end_req else nblocks[r]
        out.append((r, lo, hi, begin_split if r == begin_req else 0))
    return out
