"""Host-side split-KV plan invariants (CPU)."""
import random

import pytest

from schedules.decode_plan import BLOCK_N, FIXED_OVERHEAD_BLOCKS, num_sm_parts, part_work, plan_host


def _cases():
    rng = random.Random(0)
    yield [0], 1
    yield [1], 132
    yield [0, 0, 0], 7
    yield [64 * 1000], 132
    yield [4096] * 128, 66
    for _ in range(40):
        b = rng.choice([1, 2, 3, 6, 17, 64, 128, 300])
        mean = rng.choice([1, 20, 140, 4096, 32768])
        lens = [max(0, int(rng.gauss(mean, mean / 2))) if rng.random() > 0.1 else 0 for _ in range(b)]
        yield lens, rng.choice([1, 2, 7, 33, 66, 132])


@pytest.mark.parametrize("lens,parts", list(_cases()))
def test_plan_covers_every_block_once_and_balances(lens, parts):
    meta, offsets = plan_host(lens, parts)
    nblocks = [-(-s // BLOCK_N) for s in lens]
    assert len(meta) == parts and len(offsets) == len(lens) + 1 and offsets[0] == 0
    covered = [[0] * n for n in nblocks]
    splits_seen = [set() for _ in lens]
    payload = -(-(sum(nblocks) + FIXED_OVERHEAD_BLOCKS * len(lens)) // parts) + FIXED_OVERHEAD_BLOCKS
    for row in meta:
        cost = 0
        for r, lo, hi, split in part_work(row, nblocks):
            assert 0 <= lo <= hi <= nblocks[r]
            for blk in range(lo, hi):
                covered[r][blk] += 1
            assert split not in splits_seen[r], "two parts write the same split"
            splits_seen[r].add(split)
            cost += hi - lo + FIXED_OVERHEAD_BLOCKS
        assert cost <= payload, "a part got more than its share"
    assert all(c == 1 for row in covered for c in row), "a KV block is missed or computed twice"
    for r in range(len(lens)):
        n = offsets[r + 1] - offsets[r]
        assert n >= 1, "every request (even empty) produces at least one split"
        assert splits_seen[r] == set(range(n)), "split indices must be 0..n-1"


def test_num_sm_parts():
    assert num_sm_parts(132, 1, 128, 1) == 66
    assert num_sm_parts(132, 2, 128, 1) == 33
    assert num_sm_parts(132, 1, 16, 1) == 132
    assert num_sm_parts(132, 1, 64, 8) == 16
    assert num_sm_parts(4, 4, 128, 1) == 1
