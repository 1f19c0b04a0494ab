"""GPU tests of the foundation kernels (scheduler, combine) through the launcher.

Skipped without a GPU (with the reason); run on an H100/H200 as the README says.
"""
import math
import random

import pytest
import torch

from cute_mla import api, ops
from cute_mla.schedules.decode_plan import (DENSE_LIGHT_FIXED_OVERHEAD_BLOCKS, FIXED_OVERHEAD_BLOCKS,
                                            SPARSE_FIXED_OVERHEAD_BLOCKS,
                                            SPARSE_FEW_HEADS_FIXED_OVERHEAD_BLOCKS, plan_host)

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _lens(b, mean, seed, zero_frac=0.1):
    rng = random.Random(seed)
    return [0 if rng.random() < zero_frac else max(0, int(rng.gauss(mean, mean / 2))) for _ in range(b)]


SCHED_CASES = [(lens, parts) for lens, parts in [
    ([0], 1), ([1], 132), ([0, 0, 0], 7), ([64 * 1000], 132), ([4096] * 128, 66),
    (_lens(128, 4096, 1), 66), (_lens(64, 140, 2), 132), (_lens(6, 20, 3), 33), (_lens(300, 32768, 4), 132),
    (_lens(1, 5, 5, 0.0), 2), (_lens(1000, 100, 6), 128),
    (_lens(9000, 300, 7), 132),  # more requests than the scheduler stages in shared memory
]]


# the split overheads (fixed, light) of dense decode (12, 2) and of sparse decode at 64 / 128 heads
# (2) and under 64 (0); the cases below 4 blocks a part take the light one
@pytest.mark.parametrize("overhead,light", [(FIXED_OVERHEAD_BLOCKS, DENSE_LIGHT_FIXED_OVERHEAD_BLOCKS),
                                            (FIXED_OVERHEAD_BLOCKS, FIXED_OVERHEAD_BLOCKS),
                                            (SPARSE_FIXED_OVERHEAD_BLOCKS, SPARSE_FIXED_OVERHEAD_BLOCKS),
                                            (SPARSE_FEW_HEADS_FIXED_OVERHEAD_BLOCKS,
                                             SPARSE_FEW_HEADS_FIXED_OVERHEAD_BLOCKS)])
@pytest.mark.parametrize("lens,parts", SCHED_CASES, ids=[f"b{len(c[0])}-p{c[1]}" for c in SCHED_CASES])
def test_scheduler_matches_host_plan(lens, parts, overhead, light):
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    meta, offsets = ops.plan_decode(seqlens, parts, fixed_overhead=overhead, light_overhead=light)
    ref_meta, ref_offsets = plan_host(lens, parts, fixed_overhead=overhead, light_overhead=light)
    assert meta.cpu().tolist() == ref_meta
    assert offsets.cpu().tolist() == ref_offsets


def ref_combine(o_accum, lse_accum, offsets, b, sink=None):
    """float64 reference of the combine: returns (out [b, s_q, h_q, 512], lse [b, h_q, s_q])."""
    o, l2 = o_accum.double(), lse_accum.double()
    s_q, h_q = o.shape[1], o.shape[2]
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64, device=o.device)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64, device=o.device)
    for i in range(b):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        li = l2[lo:hi] * math.log(2.0)  # (n, s_q, h_q), natural log
        valid = torch.isfinite(li)
        tot = torch.logsumexp(li, dim=0)  # -inf where no split is valid
        w = torch.where(valid, torch.exp(li - tot), torch.zeros_like(li))
        oi = torch.where(valid[..., None], o[lo:hi], torch.zeros_like(o[lo:hi]))
        res = (w[..., None] * oi).sum(0)
        has = torch.isfinite(tot)
        if sink is not None:
            res = res * torch.sigmoid(tot - sink.double())[..., None]
        out[i] = torch.where(has[..., None], res, torch.zeros_like(res))
        lse[i] = torch.where(has, tot, torch.full_like(tot, math.inf)).T
    return out, lse


def _partials(b, s_q, h_q, nsplits, seed, empty_frac=0.2):
    """Random partials; splits marked empty (lse = -inf) hold NaN that must never be read."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    offsets = torch.tensor([0] + list(torch.tensor(nsplits).cumsum(0)), dtype=torch.int32, device=DEV)
    n = int(offsets[-1])
    o = torch.randn(n, s_q, h_q, 512, generator=g, device=DEV)
    lse = torch.randn(n, s_q, h_q, generator=g, device=DEV) * 4
    empty = torch.rand(n, s_q, h_q, generator=g, device=DEV) < empty_frac
    lse[empty] = -math.inf
    o[empty] = math.nan
    return o, lse, offsets


COMBINE_CASES = [
    # b, s_q, h_q, splits per request
    (1, 1, 1, [1]), (2, 1, 3, [1, 4]), (4, 2, 16, [2, 1, 3, 7]), (6, 4, 63, [1, 2, 3, 40, 1, 5]),
    (3, 1, 128, [33, 1, 70]), (64, 2, 128, None),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("case", COMBINE_CASES, ids=lambda c: f"b{c[0]}-sq{c[1]}-h{c[2]}")
def test_combine_matches_reference(case, sink, dtype):
    from cute_mla.testing import assert_close_named

    b, s_q, h_q, nsplits = case
    nsplits = nsplits or [random.Random(b).randint(1, 4) for _ in range(b)]
    o, lse2, offsets = _partials(b, s_q, h_q, nsplits, seed=b * 7 + h_q)
    attn_sink = None
    if sink:
        attn_sink = torch.randn(h_q, device=DEV)
        attn_sink[::5] = math.inf
        attn_sink[1::5] = -math.inf
    # Non-contiguous outputs: a strided view into a larger buffer, poisoned.
    out_buf = torch.full((b, s_q, h_q + 3, 512), math.nan, dtype=dtype, device=DEV)
    out = out_buf[:, :, 1:h_q + 1]
    lse = torch.full((b, h_q, s_q), math.nan, device=DEV)
    ops.combine(o, lse2, offsets, out, lse, attn_sink=attn_sink, pdl=False)
    ref_out, ref_lse = ref_combine(o, lse2, offsets.cpu(), b, attn_sink)
    assert_close_named("dense_decode_out", out.float(), ref_out.float())
    assert_close_named("decode_lse", lse, ref_lse.float())
    assert torch.isnan(out_buf[:, :, 0]).all() and torch.isnan(out_buf[:, :, h_q + 1:]).all(), "wrote out of bounds"


@pytest.mark.parametrize("columns", [0, 1])
@pytest.mark.parametrize("case", [COMBINE_CASES[2], COMBINE_CASES[4]], ids=lambda c: f"b{c[0]}-sq{c[1]}-h{c[2]}")
def test_combine_variants_match_reference(case, columns, monkeypatch):
    """Each work split of the combine (``grids.combine_columns``, forced here) on the same
    partials: splits in one batch of loads and in several, empty ones NaN-poisoned."""
    from cute_mla.schedules import grids
    from cute_mla.testing import assert_close_named

    monkeypatch.setattr(grids, "COMBINE_COLUMNS_MAX_ROWS", 10**9 if columns else 0)
    b, s_q, h_q, nsplits = case
    o, lse2, offsets = _partials(b, s_q, h_q, nsplits, seed=5 + h_q)
    attn_sink = torch.randn(h_q, device=DEV)
    out = torch.full((b, s_q, h_q, 512), math.nan, dtype=torch.bfloat16, device=DEV)
    lse = torch.full((b, h_q, s_q), math.nan, device=DEV)
    ops.combine(o, lse2, offsets, out, lse, attn_sink=attn_sink, pdl=False)
    ref_out, ref_lse = ref_combine(o, lse2, offsets.cpu(), b, attn_sink)
    assert_close_named("dense_decode_out", out.float(), ref_out.float())
    assert_close_named("decode_lse", lse, ref_lse.float())


def test_combine_all_invalid_gives_zero_and_inf():
    b, s_q, h_q = 3, 2, 8
    o, lse2, offsets = _partials(b, s_q, h_q, [1, 3, 2], seed=1, empty_frac=1.0)
    out = torch.full((b, s_q, h_q, 512), math.nan, dtype=torch.bfloat16, device=DEV)
    lse = torch.full((b, h_q, s_q), math.nan, device=DEV)
    ops.combine(o, lse2, offsets, out, lse, attn_sink=torch.zeros(h_q, device=DEV))
    assert (out == 0).all() and torch.isposinf(lse).all()


def test_combine_skip_single_split_leaves_rows():
    b, s_q, h_q = 3, 1, 4
    o, lse2, offsets = _partials(b, s_q, h_q, [1, 2, 1], seed=2, empty_frac=0.0)
    out = torch.full((b, s_q, h_q, 512), 7.0, dtype=torch.bfloat16, device=DEV)
    lse = torch.full((b, h_q, s_q), 7.0, device=DEV)
    ops.combine(o, lse2, offsets, out, lse, skip_single_split=True)
    assert (out[0] == 7).all() and (out[2] == 7).all() and (lse[0] == 7).all()
    ref_out, _ = ref_combine(o, lse2, offsets.cpu(), b)
    assert not (out[1] == 7).all()
    torch.testing.assert_close(out[1].float(), ref_out[1].float(), atol=8e-3, rtol=2e-2)


def test_scheduler_then_combine_under_graph_capture_and_deterministic():
    lens = _lens(32, 2000, 9)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    b, s_q, h_q = len(lens), 2, 16
    _, ref_offsets = plan_host(lens, 20)
    o, lse2, _ = _partials(b, s_q, h_q, [ref_offsets[i + 1] - ref_offsets[i] for i in range(b)], seed=3)
    out = torch.empty(b, s_q, h_q, 512, dtype=torch.bfloat16, device=DEV)
    lse = torch.empty(b, h_q, s_q, device=DEV)
    state = {}

    def step():
        meta, offsets = ops.plan_decode(seqlens, 20)
        ops.combine(o, lse2, offsets, out, lse, pdl=True)  # PDL dependent of the scheduler
        state["meta"], state["offsets"] = meta, offsets

    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up: module loads happen outside the capture
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    results = []
    for _ in range(5):
        out.fill_(math.nan)
        lse.fill_(math.nan)
        g.replay()
        torch.cuda.synchronize()
        results.append((out.clone(), lse.clone()))
    assert state["offsets"].cpu().tolist() == ref_offsets
    ref_out, ref_lse = ref_combine(o, lse2, state["offsets"].cpu(), b)
    torch.testing.assert_close(results[0][0].float(), ref_out.float(), atol=8e-3, rtol=2e-2)
    for r_out, r_lse in results[1:]:
        assert torch.equal(r_out.view(torch.int16), results[0][0].view(torch.int16)), "non-deterministic out"
        assert torch.equal(r_lse.view(torch.int32), results[0][1].view(torch.int32)), "non-deterministic lse"


def test_sched_meta_reuse_mismatch_raises():
    meta, none = api.get_mla_metadata()
    assert none is None
    q = torch.zeros(2, 1, 16, 576, dtype=torch.bfloat16, device=DEV)
    kc = torch.zeros(4, 64, 1, 576, dtype=torch.bfloat16, device=DEV)
    table = torch.arange(4, dtype=torch.int32, device=DEV).view(2, 2)
    lens = torch.tensor([100, 20], dtype=torch.int32, device=DEV)
    api.flash_mla_with_kvcache(q, kc, table, lens, 512, meta)
    assert meta.have_initialized and meta.config.h_q == 16
    bound = meta.tile_scheduler_metadata
    api.flash_mla_with_kvcache(q, kc, table, lens, 512, meta)
    assert meta.tile_scheduler_metadata is bound  # reused, not recomputed
    with pytest.raises(ValueError, match="h_q"):
        api.flash_mla_with_kvcache(q[:, :, :8], kc, table, lens, 512, meta)


def test_launcher_rejects_bad_inputs():
    seqlens = torch.zeros(4, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="cache_seqlens must be int32"):
        ops.plan_decode(seqlens, 4)
    with pytest.raises(ValueError, match="cache_seqlens must be a CUDA tensor|CUDA"):
        ops.plan_decode(torch.zeros(4, dtype=torch.int32), 4)


@pytest.mark.parametrize("rows,cols,pad", [(64, 64, 0), (200, 136, 0), (1000, 520, 24), (7, 8, 8)])
def test_tma_descriptor_round_trip_is_bit_exact(rows, cols, pad):
    """The launcher's own CUtensorMap (from layouts.operands) against the kernel's TMA atom:
    partial tiles, a padded row stride and > 48 KiB of dynamic shared memory."""
    from cute_mla import launcher

    base = torch.randn(rows, cols + pad, device=DEV).to(torch.bfloat16)
    src = base[:, :cols]
    dst = torch.full((rows, cols), math.nan, dtype=torch.bfloat16, device=DEV)
    launcher.launch("tma_probe", {}, (-(-cols // 64), -(-rows // 64)), src=src, dst=dst)
    torch.cuda.synchronize()
    assert torch.equal(dst.view(torch.int16), src.contiguous().view(torch.int16))


def test_launcher_refuses_tensor_that_breaks_the_abi():
    from cute_mla import launcher
    from cute_mla.layouts import abi

    src = torch.zeros(64, 64, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(abi.AbiError, match="dst: expected dtype"):
        launcher.launch("tma_probe", {}, (1, 1), src=src, dst=src.float())
    strided = torch.zeros(64, 128, dtype=torch.bfloat16, device=DEV)[:, ::2]  # inner stride 2
    with pytest.raises(abi.AbiError, match="src: stride 1 must be 1"):
        launcher.launch("tma_probe", {}, (1, 1), src=strided, dst=src)
    with pytest.raises(abi.AbiError, match="missing \\['dst'\\], unknown \\['out'\\]"):
        launcher.launch("tma_probe", {}, (1, 1), src=src, out=src)


def test_missing_cubins_name_the_build_command(tmp_path, monkeypatch):
    from cute_mla import launcher

    monkeypatch.setenv(launcher.CUBIN_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(launcher, "_DEVICES", {})
    with pytest.raises(launcher.CubinsNotBuilt, match="python -m cute_mla.compile"):
        ops.plan_decode(torch.zeros(4, dtype=torch.int32, device=DEV), 4)


@pytest.mark.parametrize("h_kv,padded", [(1, False), (2, True), (3, False)])
def test_paged_kv_tma_gathers_pages_bit_exact(h_kv, padded):
    """The decode kernels' page view: block-table-driven TMA of (64 x 576) pages into the
    WGMMA smem layout, against torch indexing, with a padded (non-contiguous) block stride."""
    from cute_mla import launcher

    num_blocks, b, max_blocks = 37, 3, 5
    g = torch.Generator(device=DEV).manual_seed(h_kv)
    base = torch.randn(num_blocks, 64 + (8 if padded else 0), h_kv, 576, generator=g, device=DEV).to(torch.bfloat16)
    k_cache = base[:, :64]
    block_table = torch.randperm(num_blocks, generator=g, device=DEV)[: b * max_blocks].view(b, max_blocks).int()
    out = torch.full((b, max_blocks * 64, h_kv, 576), math.nan, dtype=torch.bfloat16, device=DEV)
    launcher.launch("paged_kv_probe", {"dtype": "bf16", "d": 576}, (max_blocks, b, h_kv), k_cache=k_cache,
                    block_table=block_table, out=out)
    torch.cuda.synchronize()
    ref = k_cache[block_table.long()].reshape(b, max_blocks * 64, h_kv, 576)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))
