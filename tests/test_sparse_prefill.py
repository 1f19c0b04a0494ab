"""SM90 sparse prefill (``flash_mla_sparse_fwd``) against the float32 reference (GPU; skipped without one).

Every case poisons the kv rows that no valid index selects with NaN, puts NaN rows right
after the last kv row (an index of s_kv or a little more would read them), mixes invalid
indices of every magnitude the issue lists into the selection, and NaN-poisons nothing
the kernel should write (outputs are fresh).  The fast subset runs by default; ``-m full``
runs the issue's whole grid.
"""
import itertools

import pytest
import torch

import cute_mla
from cute_mla.reference import ref_sparse_prefill
from cute_mla.testing import SOFT, assert_close_named, data_for, randn_clipped, strided_view

pytestmark = pytest.mark.gpu
DEV = "cuda"


def invalid_values(s_kv):
    return torch.tensor([-2**31, -123456, -1, s_kv, 114514, 1919810, 2147480000, 2**31 - 1],
                        dtype=torch.int64, device=DEV)


def make_inputs(s_q, s_kv, topk, h_q, d_qk, g, invalid_frac=0.1, all_invalid=False, sink=False,
                topk_length=False, strided=False, data=SOFT):
    q = data.values((s_q, h_q, d_qk), g)
    # kv rows [0, s_kv) are the tensor; 64 NaN rows follow it in memory
    pad = 16 if strided else 0
    buf = torch.full((s_kv + 64, 1, d_qk + pad), float("nan"), dtype=torch.bfloat16, device=DEV)
    kv = buf[:s_kv, :, :d_qk]
    kv.copy_(data.values((s_kv, 1, d_qk), g))
    # distinct valid rows per token (a random permutation prefix), -1 where topk > s_kv
    n_sel = min(topk, s_kv)
    perm = torch.rand(s_q, s_kv, generator=g, device=DEV).argsort(dim=1)[:, :n_sel]
    idx = torch.full((s_q, topk), -1, dtype=torch.int64, device=DEV)
    idx[:, :n_sel] = perm
    idx = idx[:, torch.randperm(topk, generator=g, device=DEV)]
    bad = invalid_values(s_kv)
    replace = torch.rand(s_q, topk, generator=g, device=DEV) < (1.0 if all_invalid else invalid_frac)
    pick = bad[torch.randint(0, len(bad), (s_q, topk), generator=g, device=DEV)]
    idx = torch.where(replace | (idx < 0), pick, idx)
    lengths = None
    if topk_length:
        lengths = torch.randint(0, topk + 1, (s_q,), generator=g, device=DEV, dtype=torch.int32)
        lengths[0] = topk
        if s_q > 2:
            lengths[1] = 0
    # NaN every kv row that no counted valid index selects
    counted = (idx >= 0) & (idx < s_kv)
    if lengths is not None:
        counted &= torch.arange(topk, device=DEV)[None, :] < lengths[:, None].long()
    used = torch.zeros(s_kv, dtype=torch.bool, device=DEV)
    used[idx[counted]] = True
    kv[~used] = float("nan")
    indices = idx.to(torch.int32).view(s_q, 1, topk)
    if strided:
        q = strided_view(q, dim=1)
        indices = strided_view(indices, dim=0)
    attn_sink = None
    if sink:
        attn_sink = torch.randn(h_q, generator=g, device=DEV) * 2
        attn_sink[0], attn_sink[1] = float("inf"), float("-inf")
    return q, kv, indices, attn_sink, lengths


def run_case(s_q, s_kv, topk, h_q, d_qk, seed=0, data=SOFT, **kw):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q, kv, indices, sink, lengths = make_inputs(s_q, s_kv, topk, h_q, d_qk, g, data=data, **kw)
    scale = data.softmax_scale(d_qk)
    out, mx, lse = cute_mla.flash_mla_sparse_fwd(q, kv, indices, scale, attn_sink=sink, topk_length=lengths)
    ref_out, ref_mx, ref_lse = ref_sparse_prefill(q, kv, indices, scale, attn_sink=sink, topk_length=lengths)
    assert out.dtype == torch.bfloat16 and tuple(out.shape) == (s_q, h_q, 512)
    assert_close_named("sparse_prefill_out", out.float(), ref_out, data=data)
    assert_close_named("sparse_prefill_lse", lse, ref_lse, data=data)
    assert_close_named("sparse_prefill_max_logits", mx, ref_mx, data=data)
    return out, mx, lse


PAIRS = [(128, 128), (256, 256), (512, 512), (592, 128), (1840, 256), (1592, 384), (1521, 512),
         (95, 128), (153, 256), (114, 384)]
IRREGULAR = PAIRS[3:]
FULL_GRID = [(s_q, s_kv, topk, h_q, d_qk, extras)
             for d_qk, h_q, (s_kv, topk), s_q in itertools.product([512, 576], [128, 64], PAIRS, [1, 62, 213])
             for extras in ([False, True] if (s_kv, topk) in IRREGULAR else [False])]
FAST = [
    # s_q, s_kv, topk, h_q, d_qk, sink + topk_length
    (1, 128, 128, 64, 576, False),
    (62, 592, 128, 128, 576, True),
    (213, 1521, 512, 64, 512, True),
    (62, 95, 128, 128, 512, False),
    (213, 114, 384, 128, 576, True),
]


def _id(c):
    return "sq{}-skv{}-topk{}-h{}-d{}".format(*c[:5]) + ("-sink-len" if c[5] else "")


def _grid(cases):
    """(case, data) pairs: every third case on sharp logits (cute_mla.testing.data_for)."""
    return [pytest.param(c, data_for(i), id=f"{_id(c)}-{data_for(i).name}") for i, c in enumerate(cases)]


@pytest.mark.parametrize("case,data", _grid(FAST))
def test_sparse_prefill_fast(case, data):
    *shape, extras = case
    run_case(*shape, seed=hash(case) % 1000, sink=extras, topk_length=extras, data=data)


@pytest.mark.full
@pytest.mark.parametrize("case,data", _grid(FULL_GRID))
def test_sparse_prefill_full_grid(case, data):
    *shape, extras = case
    run_case(*shape, seed=hash(case) % 1000, sink=extras, topk_length=extras, data=data)


@pytest.mark.parametrize("d_qk", [576, 512])
@pytest.mark.parametrize("s_kv,topk", [(200, 64), (300, 192)])
def test_odd_block_count(s_kv, topk, d_qk):
    """topk of 1 or 3 blocks: the kernel pads a tile to whole pairs of blocks, the pad
    gathering nothing (the grid's topk are all whole pairs; only topk_length made odd ones)."""
    run_case(62, s_kv, topk, 128, d_qk, seed=topk + d_qk, sink=True)
    run_case(3, s_kv, topk, 64, d_qk, seed=topk + d_qk + 1, topk_length=True)


@pytest.mark.parametrize("s_q,s_kv,topk", [(1, 128, 128), (1, 256, 256), (1234, 4321, 4096), (4096, 2048, 2048)])
def test_all_indices_invalid(s_q, s_kv, topk):
    out, mx, lse = run_case(s_q, s_kv, topk, 64, 576, seed=2, all_invalid=True, sink=True)
    assert (out == 0).all() and torch.isposinf(lse).all() and torch.isneginf(mx).all()


@pytest.mark.parametrize("s_kv,topk", [(32, 2048), (64, 8192)])
@pytest.mark.parametrize("s_q", [1, 1024])
def test_s_kv_smaller_than_topk(s_q, s_kv, topk):
    run_case(s_q, s_kv, topk, 128, 512, seed=3, sink=True, topk_length=True)


def test_s_q_beyond_grid_y_limit():
    run_case(70000, 256, 64, 64, 512, seed=4, topk_length=True)


def test_strided_inputs():
    run_case(62, 592, 128, 128, 576, seed=5, strided=True, sink=True, topk_length=True)


def test_deterministic_over_five_runs():
    g = torch.Generator(device=DEV).manual_seed(6)
    q, kv, indices, sink, lengths = make_inputs(213, 1840, 256, 128, 576, g, sink=True, topk_length=True)
    first = None
    for _ in range(5):
        res = cute_mla.flash_mla_sparse_fwd(q, kv, indices, 0.05, attn_sink=sink, topk_length=lengths)
        bits = [t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32) for t in res]
        if first is None:
            first = [b.clone() for b in bits]
        else:
            assert all(torch.equal(a, b) for a, b in zip(first, bits))


def test_flatten_batch_helper():
    g = torch.Generator(device=DEV).manual_seed(7)
    reqs = [make_inputs(s_q, s_kv, 128, 64, 512, g) for s_q, s_kv in ((30, 200), (17, 95), (40, 300))]
    q, kv, idx, _ = cute_mla.flatten_sparse_prefill_batch([r[0] for r in reqs], [r[1] for r in reqs],
                                                           [r[2] for r in reqs])
    out, mx, lse = cute_mla.flash_mla_sparse_fwd(q, kv, idx, 0.07)
    outs = torch.split(out, [r[0].shape[0] for r in reqs])
    for r, o in zip(reqs, outs):
        ref_out, _, _ = ref_sparse_prefill(r[0], r[1], r[2], 0.07)
        assert_close_named("sparse_prefill_out", o.float(), ref_out)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(q=a["q"].half()), "q must be bfloat16"),
    (lambda a: a.update(q=a["q"][:, :32]), "h_q must be 64 or 128"),
    (lambda a: a.update(q=a["q"][..., :448], kv=a["kv"][..., :448]), "head dim must be 576 or 512"),
    (lambda a: a.update(kv=a["kv"][..., :512]), r"kv must be \[s_kv, 1, 576\]"),
    (lambda a: a.update(indices=a["indices"].long()), "indices must be int32"),
    (lambda a: a.update(indices=a["indices"][..., :100]), "multiple of 64"),
    (lambda a: a.update(d_v=448), "d_v must be 512"),
    (lambda a: a.update(attn_sink=torch.zeros(3, device=DEV)), "attn_sink must be"),
    (lambda a: a.update(topk_length=torch.zeros(4, dtype=torch.int64, device=DEV)), "topk_length must be"),
])
def test_bad_input_names_the_argument(mutate, match):
    g = torch.Generator(device=DEV).manual_seed(0)
    q, kv, indices, _, _ = make_inputs(4, 128, 128, 64, 576, g)
    args = dict(q=q, kv=kv, indices=indices, sm_scale=0.04)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        cute_mla.flash_mla_sparse_fwd(**args)


def test_cuda_graph_capture():
    g = torch.Generator(device=DEV).manual_seed(8)
    q, kv, indices, sink, lengths = make_inputs(62, 592, 128, 128, 576, g, sink=True, topk_length=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: loads the module outside the capture
        cute_mla.flash_mla_sparse_fwd(q, kv, indices, 0.04, attn_sink=sink, topk_length=lengths)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, mx, lse = cute_mla.flash_mla_sparse_fwd(q, kv, indices, 0.04, attn_sink=sink, topk_length=lengths)
    q.copy_(randn_clipped(q.shape, g))
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_mx, ref_lse = ref_sparse_prefill(q, kv, indices, 0.04, attn_sink=sink, topk_length=lengths)
    assert_close_named("sparse_prefill_out", out.float(), ref_out)
    assert_close_named("sparse_prefill_lse", lse, ref_lse)
