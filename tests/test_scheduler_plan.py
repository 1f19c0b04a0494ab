"""Host-side split-KV plan invariants (CPU)."""
import random

import pytest

from cute_mla.layouts.constants import BLOCK_M, COMBINE_COLUMNS_MAX_ROWS, COMBINE_HEADS_PER_CTA
from cute_mla.schedules import decode_plan, grids
from cute_mla.schedules.decode_plan import BLOCK_N, FIXED_OVERHEAD_BLOCKS, num_sm_parts, part_work, plan_host


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


@pytest.mark.parametrize("overhead", [FIXED_OVERHEAD_BLOCKS, decode_plan.SPARSE_FIXED_OVERHEAD_BLOCKS, 0])
@pytest.mark.parametrize("lens,parts", list(_cases()))
def test_plan_covers_every_block_once_and_balances(lens, parts, overhead):
    meta, offsets = plan_host(lens, parts, fixed_overhead=overhead)
    nblocks = [-(-s // BLOCK_N) for s in lens]
    assert len(meta) == parts and len(offsets) == len(lens) + 1 and offsets[0] == 0
    covered = [[0] * n for n in nblocks]
    splits_seen = [set() for _ in lens]
    payload = -(-(sum(nblocks) + overhead * len(lens)) // parts) + overhead
    for row in meta:
        cost = 0
        for r, lo, hi, split in part_work(row, nblocks):
            assert 0 <= lo <= hi <= nblocks[r]
            for blk in range(lo, hi):
                covered[r][blk] += 1
            assert split not in splits_seen[r], "two parts write the same split"
            splits_seen[r].add(split)
            cost += hi - lo + overhead
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


def test_sparse_decode_lengths_pad_main_slots_to_blocks():
    """The plan length of a sparse decode request: counted main slots padded to whole
    64-slot blocks (the kernel starts the extra cache on a block boundary), then the
    counted extra slots; lengths outside [0, topk] are clamped as the kernel does."""
    torch = pytest.importorskip("torch")
    from cute_mla.plans import sparse_decode_lengths

    dev = torch.device("cpu")
    tl = torch.tensor([0, 1, 64, 65, 128, -5, 999], dtype=torch.int32)
    xtl = torch.tensor([0, 7, 512, -1, 300, 1000, 64], dtype=torch.int32)
    got = sparse_decode_lengths(7, 128, tl, 512, xtl, dev).tolist()
    assert got == [0, 64 + 7, 64 + 512, 128 + 0, 128 + 300, 0 + 512, 128 + 64]
    assert sparse_decode_lengths(3, 2048, None, 0, None, dev).tolist() == [2048] * 3
    assert sparse_decode_lengths(2, 128, None, 1024, None, dev).tolist() == [128 + 1024] * 2
    assert sparse_decode_lengths(1, 64, torch.tensor([5], dtype=torch.int32), 64, None, dev).dtype == torch.int32


@pytest.mark.parametrize("b,length,parts,expected", [
    (2, 128, 132, 2),  # two tiny requests: one part each beats splitting them and a combine
    (128, 2048, 33, 32),  # V32 topk 2048 at b 128: 4 whole requests a part
    (74, 2048, 33, None),  # 3 a part would leave parts idle: split
    (2, 2048, 33, None),  # two long requests need every SM: split
    (64, 512, 132, None),  # a tie keeps every SM busy
])
def test_whole_request_parts(b, length, parts, expected):
    got = decode_plan.whole_request_parts(b, length, parts)
    assert got == expected
    if got is not None:  # every request in one split, as the GPU scheduler plans it too
        _, offsets = decode_plan.plan_host([length] * b, got, fixed_overhead=decode_plan.SPARSE_FIXED_OVERHEAD_BLOCKS)
        assert offsets == list(range(b + 1))


@pytest.mark.parametrize("b,length,h_q,known,expected", [
    (32, 512, 16, True, (132, decode_plan.SPARSE_FEW_HEADS_FIXED_OVERHEAD_BLOCKS, True)),
    (32, 512, 32, True, (132, decode_plan.SPARSE_FEW_HEADS_FIXED_OVERHEAD_BLOCKS, True)),
    (32, 512, 64, True, (132, decode_plan.SPARSE_FIXED_OVERHEAD_BLOCKS, True)),
    (128, 2048, 8, True, (128, decode_plan.SPARSE_FIXED_OVERHEAD_BLOCKS, False)),  # one request a part
    (128, 2048, 8, False, (132, decode_plan.SPARSE_FEW_HEADS_FIXED_OVERHEAD_BLOCKS, True)),  # lengths unknown
    (74, 512, 64, True, (74, decode_plan.SPARSE_FIXED_OVERHEAD_BLOCKS, False)),
])
def test_sparse_split(b, length, h_q, known, expected):
    """Whole requests a part when the lengths are known and that is no slower; else split, under
    64 heads with its own overhead per piece."""
    got = decode_plan.sparse_split(b, length, 132, h_q, known)
    assert tuple(got) == expected
    if not got.splits:  # the checked one-split-a-request plan is the one the scheduler makes
        _, offsets = decode_plan.plan_host([length] * b, got.parts, fixed_overhead=got.fixed_overhead)
        assert offsets == list(range(b + 1))


def test_few_heads_overhead_rounding():
    """Why fewer than 64 heads split with no overhead (decode_plan): MODEL1 b 32 topk 512 over
    132 parts leaves 36 parts idle and the rest 3 blocks long with 2, and gives 128 parts of 2
    blocks with 0."""
    nblocks = [512 // BLOCK_N] * 32

    def part_blocks(overhead):
        meta, _ = plan_host([512] * 32, 132, fixed_overhead=overhead)
        return sorted(sum(hi - lo for _, lo, hi, _ in part_work(row, nblocks)) for row in meta)

    assert part_blocks(decode_plan.SPARSE_FIXED_OVERHEAD_BLOCKS) == [0] * 36 + [2] * 32 + [3] * 64
    assert part_blocks(decode_plan.SPARSE_FEW_HEADS_FIXED_OVERHEAD_BLOCKS) == [0] * 4 + [2] * 128


def test_light_plan_overhead():
    """A plan whose parts average at most LIGHT_LOAD_BLOCKS blocks counts ``light_overhead`` a
    piece: dense b 5 s_q 3 (five requests of 56 blocks in all, 44 parts) gets parts of at most one
    pair of blocks with the dense light overhead, where 12 rounds them up to 3; one block more
    than the light bound and the plan is the fixed overhead's, as is any plan without a light
    overhead."""
    lens = [1375, 663, 1, 998, 356]  # 22 + 11 + 1 + 16 + 6 = 56 blocks
    nblocks = [-(-s // BLOCK_N) for s in lens]

    def longest(meta):
        return max(sum(hi - lo for _, lo, hi, _ in part_work(row, nblocks)) for row in meta)

    light = decode_plan.DENSE_LIGHT_FIXED_OVERHEAD_BLOCKS
    assert decode_plan.piece_overhead(56, 44, FIXED_OVERHEAD_BLOCKS, light) == light
    assert decode_plan.piece_overhead(4 * 14 + 1, 14, FIXED_OVERHEAD_BLOCKS, light) == FIXED_OVERHEAD_BLOCKS
    assert decode_plan.piece_overhead(4 * 14, 14, FIXED_OVERHEAD_BLOCKS, light) == light
    fixed = plan_host(lens, 44, fixed_overhead=FIXED_OVERHEAD_BLOCKS)
    assert longest(fixed[0]) == 3
    assert plan_host(lens, 44, fixed_overhead=FIXED_OVERHEAD_BLOCKS, light_overhead=light) == \
        plan_host(lens, 44, fixed_overhead=light)
    assert longest(plan_host(lens, 44, fixed_overhead=FIXED_OVERHEAD_BLOCKS, light_overhead=light)[0]) == 2
    assert plan_host(lens, 44, fixed_overhead=FIXED_OVERHEAD_BLOCKS, light_overhead=FIXED_OVERHEAD_BLOCKS) == fixed
    heavy = [4096] * 128  # 64 blocks a request over 66 parts: not light
    assert plan_host(heavy, 66, light_overhead=light) == plan_host(heavy, 66)


@pytest.mark.parametrize("rows", [1, 63, 64, 65, 128, 1000])
def test_split_kv_grid_covers_every_row_once(rows):
    parts, heads, blocks = grids.split_kv(7, 3, rows)
    assert (parts, heads) == (7, 3)
    assert (blocks - 1) * BLOCK_M < rows <= blocks * BLOCK_M


def test_sparse_prefill_grid_is_persistent():
    assert grids.sparse_prefill(s_q=3, h_q=128, num_sms=132) == (6, 1, 1)  # fewer tiles than SMs
    assert grids.sparse_prefill(s_q=4096, h_q=64, num_sms=132) == (132, 1, 1)


@pytest.mark.parametrize("b, h_q", [(9, 1), (9, 4), (9, 5), (9, 16), (9, 128), (300, 5), (2, 128)])
def test_combine_grid_covers_every_head(b, h_q):
    x, s_q, b_grid = grids.combine(b=b, s_q=2, h_q=h_q)
    per_cta = 1 if grids.combine_columns(b, 2, h_q) else COMBINE_HEADS_PER_CTA
    assert (s_q, b_grid) == (2, b) and (x - 1) * per_cta < h_q <= x * per_cta


def test_combine_columns_up_to_the_row_limit():
    """The ``columns`` combine runs calls of at most COMBINE_COLUMNS_MAX_ROWS rows (b * s_q * h_q)."""
    assert grids.combine_columns(2, 2, 128) == 1 and COMBINE_COLUMNS_MAX_ROWS == 512
    assert grids.combine_columns(32, 1, 16) == 1 and grids.combine_columns(32, 2, 16) == 0
    assert grids.combine_columns(1, 1, COMBINE_COLUMNS_MAX_ROWS + 1) == 0


def test_dense_cluster_rows(monkeypatch):
    """Dense decode runs a kv head's row blocks in clusters of the largest size up to the cap
    that divides them; CUTE_MLA_DENSE_CLUSTER_ROWS sets the cap (1: no clusters)."""
    from cute_mla import plans

    monkeypatch.delenv(plans.DENSE_CLUSTER_ROWS_ENV, raising=False)
    assert plans.DENSE_CLUSTER_ROWS_DEFAULT == 2
    assert [plans.dense_cluster_rows(n) for n in (1, 2, 3, 4, 6)] == [1, 2, 1, 2, 2]
    for cap, expected in (("1", [1, 1, 1, 1, 1]), ("4", [1, 2, 1, 4, 2]), ("junk", [1, 2, 1, 2, 2])):
        monkeypatch.setenv(plans.DENSE_CLUSTER_ROWS_ENV, cap)
        assert [plans.dense_cluster_rows(n) for n in (1, 2, 3, 4, 6)] == expected


def test_dense_heads_route(monkeypatch):
    """Dense decode of one kv head and 8, 16 or 32 query heads runs the small-head kernel where a
    CTA can take every query token (at most 32 columns of tokens x heads, s_q 1, 2 or 4);
    CUTE_MLA_DENSE_HEADS=1 takes it at any s_q (a token a CTA where it cannot take all), 0
    never; anything else stays on the 64-row kernel."""
    from cute_mla import plans

    # (h_kv, h_q, s_q): the first five take every token, the next four one a CTA when forced
    cases = [(1, 8, 1), (1, 16, 1), (1, 32, 1), (1, 8, 2), (1, 16, 2), (1, 8, 4), (1, 8, 3), (1, 16, 4),
             (1, 32, 2), (1, 4, 1), (1, 64, 1), (2, 16, 1), (8, 8, 1)]
    tokens = [1, 1, 1, 2, 2, 4, 1, 1, 1]
    assert [plans.dense_heads_tokens(h, s) for _, h, s in cases[:9]] == tokens
    for env, expected in ((None, [True] * 6 + [False] * 7), ("1", [True] * 9 + [False] * 4),
                          ("0", [False] * 13), ("junk", [True] * 6 + [False] * 7)):
        if env is None:
            monkeypatch.delenv(plans.DENSE_HEADS_ENV, raising=False)
        else:
            monkeypatch.setenv(plans.DENSE_HEADS_ENV, env)
        assert [plans.dense_heads(*c) for c in cases] == expected, env


def test_dense_fixed_overhead_env(monkeypatch):
    """Dense plans take ``FIXED_OVERHEAD_BLOCKS`` (light ones of the 64-row kernel
    ``DENSE_LIGHT_FIXED_OVERHEAD_BLOCKS``) unless CUTE_MLA_DENSE_FIXED_OVERHEAD gives an integer
    0-64 (a sweep's knob, then for every plan); anything else is ignored."""
    from cute_mla import plans

    for env, expected in ((None, decode_plan.FIXED_OVERHEAD_BLOCKS), ("0", 0), ("5", 5), ("64", 64),
                          ("65", decode_plan.FIXED_OVERHEAD_BLOCKS), ("-1", decode_plan.FIXED_OVERHEAD_BLOCKS),
                          ("x", decode_plan.FIXED_OVERHEAD_BLOCKS)):
        if env is None:
            monkeypatch.delenv(plans.DENSE_FIXED_OVERHEAD_ENV, raising=False)
        else:
            monkeypatch.setenv(plans.DENSE_FIXED_OVERHEAD_ENV, env)
        assert plans.dense_fixed_overhead() == expected, env
        # a valid value is every plan's; else a light plan takes the dense light overhead
        light = expected if env in ("0", "5", "64") else decode_plan.DENSE_LIGHT_FIXED_OVERHEAD_BLOCKS
        assert plans.dense_fixed_overhead(light=True) == light, env
