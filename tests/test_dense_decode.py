"""SM90 dense MLA decode against the float32 reference (GPU; skipped without one).

Every case uses NaN-poisoned cache rows past each request's length, permuted pages,
garbage block-table entries past each request and NaN-poisoned outputs.  The fast
subset runs by default; ``-m full`` runs the issue's whole grid.
"""
import itertools

import pytest
import torch

import cute_mla
from cute_mla.layouts.constants import DENSE_DECODE_SMALL_HEADS
from cute_mla.reference import ref_dense_decode
from cute_mla.schedules.decode_plan import (DENSE_LIGHT_FIXED_OVERHEAD_BLOCKS, FIXED_OVERHEAD_BLOCKS, piece_overhead,
                                            plan_host)
from cute_mla.testing import (SHARP, SOFT, assert_close_named, data_for, make_paged_kv, randn_clipped, strided_view,
                              varlen_seqlens)

pytestmark = pytest.mark.gpu
DEV = "cuda"


def run_case(b, s_q, s_k, h_q, h_kv, varlen, causal, dtype=torch.bfloat16, seed=0, num_zero=0,
             strided=False, sched_meta=None, data=SOFT):
    g = torch.Generator(device=DEV).manual_seed(seed)
    if varlen:
        lens = varlen_seqlens(b, s_k, g, min_len=1, num_zero=num_zero)
    else:
        lens = torch.full((b,), s_k, dtype=torch.int32)
        lens[:num_zero] = 0
    kv = make_paged_kv(lens, 64, h_kv, 576, g, dtype=dtype, data=data)
    q = data.values((b, s_q, h_q, 576), g, dtype=dtype)
    scale = data.softmax_scale(576)
    block_table = kv.block_table
    if strided:
        q = strided_view(q, dim=2)
        block_table = strided_view(block_table, dim=0)
    meta = sched_meta if sched_meta is not None else cute_mla.get_mla_metadata()[0]
    out, lse = cute_mla.flash_mla_with_kvcache(q, kv.k_cache, block_table, kv.cache_seqlens, 512, meta,
                                               softmax_scale=scale, causal=causal)
    ref_out, ref_lse = ref_dense_decode(q, kv.k_cache, kv.block_table, kv.cache_seqlens, 512, softmax_scale=scale,
                                        causal=causal)
    assert out.dtype == dtype and tuple(out.shape) == (b, s_q, h_q, 512)
    assert_close_named("dense_decode_out", out.float(), ref_out, data=data)
    assert_close_named("decode_lse", lse, ref_lse, data=data)
    return out, lse


def _valid(h_q, h_kv):
    return h_q % h_kv == 0


FULL_GRID = [c for c in itertools.product([1, 2, 6, 64], [1, 2, 4], [20, 140, 4096],
                                          [1, 3, 8, 9, 16, 32, 63, 64, 126, 128], [1, 2, 3, 8], [False, True],
                                          [False, True]) if _valid(c[3], c[4])]
FAST = [
    # b, s_q, s_k, h_q, h_kv, varlen, causal
    (1, 1, 20, 1, 1, False, False),
    (2, 1, 140, 128, 1, True, False),
    (2, 2, 140, 128, 1, True, True),
    (6, 4, 140, 64, 1, True, True),
    (6, 1, 4096, 128, 1, True, False),
    (2, 2, 4096, 126, 2, False, True),
    (6, 2, 140, 9, 3, True, True),
    (2, 4, 20, 63, 3, True, True),  # s_k < s_q rows under causal masking see no key
    (2, 1, 140, 64, 8, True, False),
    (64, 2, 140, 16, 1, True, True),
    (64, 1, 4096, 128, 1, True, False),
    # h_kv 1, h_q 8 / 16 / 32, s_q 1, and s_q 2 / 4 up to 32 columns (a CTA takes every token):
    # the small-head kernel (``kernels.sm90.dense_decode_heads``)
    (6, 1, 4096, 8, 1, True, False),
    (6, 1, 700, 16, 1, True, True),
    (9, 1, 20, 16, 1, True, False),
    (6, 1, 4096, 32, 1, True, True),
    (6, 2, 4096, 16, 1, True, True),
    (5, 4, 777, 8, 1, True, True),
]


def _id(c):
    return "b{}-sq{}-sk{}-h{}-kv{}-{}-{}".format(*c[:5], "var" if c[5] else "fix", "causal" if c[6] else "full")


@pytest.mark.parametrize("data", [SOFT, *SHARP], ids=lambda d: d.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", FAST, ids=_id)
def test_dense_decode_fast(case, dtype, data):
    run_case(*case, dtype=dtype, seed=hash(case) % 1000, data=data)


@pytest.mark.full
@pytest.mark.parametrize("i,case", list(enumerate(FULL_GRID)), ids=[_id(c) for c in FULL_GRID])
def test_dense_decode_full_grid(i, case):
    run_case(*case, dtype=torch.bfloat16 if hash(case) % 2 else torch.float16, seed=hash(case) % 1000,
             data=data_for(i))


def test_zero_length_requests_b128():
    out, lse = run_case(128, 2, 4096, 128, 1, True, False, num_zero=17, seed=5)
    assert torch.isfinite(out).all()


def _dense_kernel_keys(monkeypatch):
    """The variant keys of the dense decode kernels launched from now on (fresh plans)."""
    from cute_mla import api, launcher, plans

    keys = []
    run = launcher.Launch.run_current  # every launch goes through it
    monkeypatch.setattr(launcher.Launch, "run_current",
                        lambda self, *a, **k: (keys.append(self.kernel.key), run(self, *a, **k))[1])
    monkeypatch.setattr(api, "_DECODE_PLANS", plans.PlanCache())
    return keys


@pytest.mark.parametrize("route", ["heads", "64-row"])
@pytest.mark.parametrize("h_q", DENSE_DECODE_SMALL_HEADS)
def test_small_heads_both_kernels(monkeypatch, route, h_q):
    """h_kv 1 with 8, 16 or 32 query heads: the small-head kernel and the combine (forced at every
    s_q by CUTE_MLA_DENSE_HEADS=1: a CTA takes all s_q tokens where it can, else one, so both
    are covered under causal masking), and the 64-row kernel (CUTE_MLA_DENSE_HEADS=0), which
    must stay right there too.  Cases with splits (b 2 of 4096 keys), causal query tokens, keys
    ending mid-page, a page's NaN tail, requests shorter than s_q (early tokens see no key)."""
    from cute_mla import plans

    monkeypatch.setenv(plans.DENSE_HEADS_ENV, "1" if route == "heads" else "0")
    keys = _dense_kernel_keys(monkeypatch)
    shapes = [(2, 1, 4096, False), (2, 2, 4096, True), (9, 3, 333, True), (64, 1, 777, False), (4, 4, 20, True),
              (8, 2, 1, True), (8, 4, 2, True)]
    for seed, (b, s_q, s_k, causal) in enumerate(shapes):
        run_case(b, s_q, s_k, h_q, 1, True, causal, seed=70 + seed, data=SHARP[0] if seed % 2 else SOFT)
        run_case(b, s_q, s_k, h_q, 1, True, causal, dtype=torch.float16, seed=80 + seed)
    kernels = {k.split("__")[0] for k in keys} - {"decode_scheduler", "combine"}
    assert kernels == ({"dense_decode_heads_sm90"} if route == "heads" else {"dense_decode_sm90"}), keys
    if route == "heads":  # every token group the route takes, and no other
        groups = {int(k.rsplit("tokens-", 1)[1]) for k in keys if k.startswith("dense_decode_heads_sm90")}
        assert groups == {plans.dense_heads_tokens(h_q, s_q) for _, s_q, _, _ in shapes}, keys


@pytest.mark.parametrize("cap,expected", [("1", (1, 1, 1)), ("2", (2, 2, 1)), ("4", (4, 2, 1))])
def test_cluster_rows_variant_as_the_plan_picks_it(monkeypatch, cap, expected):
    """A kv head's row blocks run in clusters of the largest size up to the cap that divides
    them, sharing each page by multicast (``cluster_rows``); CUTE_MLA_DENSE_CLUSTER_ROWS sets
    the cap.  Every variant matches the reference on the same cases."""
    monkeypatch.setenv("CUTE_MLA_DENSE_CLUSTER_ROWS", cap)
    keys = _dense_kernel_keys(monkeypatch)
    run_case(6, 2, 4096, 128, 1, True, True, seed=21, data=SHARP[0])  # 4 row blocks
    run_case(6, 2, 4096, 126, 2, True, False, seed=22)  # 2 row blocks of 126 rows a kv head
    run_case(6, 3, 700, 64, 1, True, True, seed=23)  # 3 row blocks
    dense = [k for k in keys if k.startswith("dense_decode_sm90")]
    assert [k.split("__")[1] for k in dense] == [f"cluster_rows-{n}" for n in expected], dense


@pytest.mark.parametrize("cap,n", [("2", 2), ("4", 4)])
def test_cluster_plan_runs_no_more_parts_than_clusters_fit(monkeypatch, cap, n):
    """With clusters the plan takes at most the parts whose clusters the device runs at once
    (``LoadedKernel.max_active_clusters``): a second wave would double the time."""
    from cute_mla import launcher

    monkeypatch.setenv("CUTE_MLA_DENSE_CLUSTER_ROWS", cap)
    _dense_kernel_keys(monkeypatch)
    meta = cute_mla.get_mla_metadata()[0]
    run_case(8, 2, 4096, 128, 1, True, False, seed=60, sched_meta=meta)  # 4 row blocks
    clusters = launcher.kernel("dense_decode_sm90", {"dtype": "bf16", "cluster_rows": n}, 0).max_active_clusters()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert 0 < clusters <= num_sms // n
    parts = meta.tile_scheduler_metadata.shape[0]
    assert parts == min(num_sms // 4, clusters * n // 4), (parts, clusters)


def test_light_call_runs_the_light_plan():
    """A call whose plan is light (b 5, s_q 3, h_q 64, 13 blocks a request: perf's small-batch
    case) is scheduled with the dense light overhead: its metadata is the host plan's with
    (fixed, light) = (12, 2), and the output is right.  On 132 SMs (44 parts) that plan differs
    from the plan of 12 alone (7 splits a request against 5), so the check can fail there."""
    meta = cute_mla.get_mla_metadata()[0]
    run_case(5, 3, 777, 64, 1, False, True, seed=61, sched_meta=meta, data=SHARP[0])
    parts = meta.tile_scheduler_metadata.shape[0]
    lens = [777] * 5
    light = plan_host(lens, parts, fixed_overhead=FIXED_OVERHEAD_BLOCKS,
                      light_overhead=DENSE_LIGHT_FIXED_OVERHEAD_BLOCKS)
    assert piece_overhead(5 * 13, parts, FIXED_OVERHEAD_BLOCKS, DENSE_LIGHT_FIXED_OVERHEAD_BLOCKS) == \
        DENSE_LIGHT_FIXED_OVERHEAD_BLOCKS
    if parts == 44:  # 132 SMs (H100 / H200 SXM): light parts hold one pair, 12's a pair and a lone block
        assert light != plan_host(lens, parts, fixed_overhead=FIXED_OVERHEAD_BLOCKS)
    assert meta.tile_scheduler_metadata.cpu().tolist() == light[0]
    assert meta.num_splits.cpu().tolist() == light[1]


@pytest.mark.parametrize("cap", ["1", "2", "4"])
def test_grid_larger_than_the_gpu(monkeypatch, cap):
    """Eight times the parts (CTAs, clusters) that fit at once: most start after others have
    finished, so tickets, split counts and merges span waves of CTAs.  A merge that waited for
    a CTA not yet started would hang here; a chunk drawn but not merged would leave rows wrong."""
    from cute_mla import launcher, plans

    monkeypatch.setenv("CUTE_MLA_DENSE_CLUSTER_ROWS", cap)
    default = plans.default_parts
    monkeypatch.setattr(plans, "default_parts", lambda *a, **k: 8 * default(*a, **k))
    monkeypatch.setattr(launcher.LoadedKernel, "max_active_clusters", lambda self: 1 << 20)
    _dense_kernel_keys(monkeypatch)
    for seed in range(3):
        run_case(24, 2, 4096, 128, 1, True, seed % 2 == 1, seed=40 + seed)  # 4 row blocks: clusters
        run_case(24, 3, 4096, 64, 1, True, seed % 2 == 1, seed=50 + seed)  # 3 row blocks: no clusters


def test_strided_q_and_block_table():
    run_case(6, 2, 140, 64, 1, True, True, strided=True, seed=7)


def test_deterministic_over_five_runs_and_meta_reuse():
    g = torch.Generator(device=DEV).manual_seed(11)
    lens = varlen_seqlens(16, 1500, g, min_len=1, num_zero=2)
    kv = make_paged_kv(lens, 64, 1, 576, g)
    q = randn_clipped((16, 2, 128, 576), g)
    meta, _ = cute_mla.get_mla_metadata()
    first = None
    for _ in range(5):  # the same sched_meta serves every "layer"
        out, lse = cute_mla.flash_mla_with_kvcache(q, kv.k_cache, kv.block_table, kv.cache_seqlens, 512, meta)
        if first is None:
            first = (out.clone(), lse.clone())
        else:
            assert torch.equal(out.view(torch.int16), first[0].view(torch.int16))
            assert torch.equal(lse.view(torch.int32), first[1].view(torch.int32))
    # another layer's cache and queries, same shapes and the same lengths tensor: reuse is valid
    kv2 = make_paged_kv(lens, 64, 1, 576, g)
    q2 = randn_clipped((16, 2, 128, 576), g)
    out2, lse2 = cute_mla.flash_mla_with_kvcache(q2, kv2.k_cache, kv2.block_table, kv.cache_seqlens, 512, meta)
    ref_out, ref_lse = ref_dense_decode(q2, kv2.k_cache, kv2.block_table, kv.cache_seqlens, 512)
    assert_close_named("dense_decode_out", out2.float(), ref_out)
    with pytest.raises(ValueError, match="s_q"):
        cute_mla.flash_mla_with_kvcache(q2[:, :1], kv2.k_cache, kv2.block_table, kv.cache_seqlens, 512, meta)


def test_cuda_graph_capture():
    g = torch.Generator(device=DEV).manual_seed(3)
    lens = varlen_seqlens(8, 700, g, min_len=1)
    kv = make_paged_kv(lens, 64, 1, 576, g)
    q = randn_clipped((8, 1, 64, 576), g)
    meta, _ = cute_mla.get_mla_metadata()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cute_mla.flash_mla_with_kvcache(q, kv.k_cache, kv.block_table, kv.cache_seqlens, 512, meta)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = cute_mla.flash_mla_with_kvcache(q, kv.k_cache, kv.block_table, kv.cache_seqlens, 512, meta)
    q.copy_(randn_clipped(q.shape, g))
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_lse = ref_dense_decode(q, kv.k_cache, kv.block_table, kv.cache_seqlens, 512)
    assert_close_named("dense_decode_out", out.float(), ref_out)
    assert_close_named("decode_lse", lse, ref_lse)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(q=a["q"].float()), "q must be bfloat16 or float16"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), "k_cache must have q's dtype"),
    (lambda a: a.update(q=a["q"][..., :512]), "head dim must be 576"),
    (lambda a: a.update(block_table=a["block_table"].long()), "block_table must be int32"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), "cache_seqlens must be int32"),
    (lambda a: a.update(k_cache=a["k_cache"].view(-1, 32, 1, 576)), "page_block_size must be 64"),
    (lambda a: a.update(q=a["q"][:, :, :3]), r"h_q \(3\) must be a multiple"),
    (lambda a: a.update(head_dim_v=256), "head_dim_v must be 512"),
    (lambda a: a.update(attn_sink=torch.zeros(4, device=DEV)), "attn_sink is only supported"),
])
def test_bad_input_names_the_argument(mutate, match):
    g = torch.Generator(device=DEV).manual_seed(0)
    kv = make_paged_kv([70, 10], 64, 2, 576, g)
    args = dict(q=randn_clipped((2, 1, 4, 576), g), k_cache=kv.k_cache, block_table=kv.block_table,
                cache_seqlens=kv.cache_seqlens, head_dim_v=512)
    mutate(args)
    meta, _ = cute_mla.get_mla_metadata()
    with pytest.raises(ValueError, match=match):
        cute_mla.flash_mla_with_kvcache(tile_scheduler_metadata=meta, **args)
