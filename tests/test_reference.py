"""The float32 references (cute_mla.reference) against naive float64 per-(batch, query, head) loops,
and the comparison / test-data helpers (cute_mla.testing). CPU only, small cases, fast."""

import math

import pytest
import torch

from cute_mla import reference as R
from cute_mla import testing as T

INF = math.inf
F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def close(actual, expected, atol=2e-5, rtol=2e-5):
    """References (float32) vs naive float64 loops: agree to float32 rounding; inf/NaN must match."""
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=False)


def no_nan(*ts):
    for t in ts:
        assert not torch.isnan(t).any(), "NaN leaked into a reference output"


def naive_attend(q, keys, d_v, scale, sink=None):
    """One query vector against a Python list of key rows (V = key[:d_v]), float64, SPEC edge rules."""
    if not keys:
        return torch.zeros(d_v, dtype=F64), INF, -INF
    k = torch.stack([x.double() for x in keys])
    s = (k @ q.double()) * scale
    lse = torch.logsumexp(s, 0)
    out = torch.softmax(s, 0) @ k[:, :d_v]
    if sink is not None:
        out = out * torch.sigmoid(lse - torch.tensor(float(sink), dtype=F64))
    return out, float(lse), float(s.max())


# ------------------------------------------------------------------------------------------------
# dense decode
# ------------------------------------------------------------------------------------------------
def naive_dense_decode(q, k_cache, block_table, seqlens, d_v, scale, causal):
    b, s_q, h_q, _ = q.shape
    page, h_kv = k_cache.shape[1], k_cache.shape[2]
    g = h_q // h_kv
    out = torch.zeros(b, s_q, h_q, d_v, dtype=F64)
    lse = torch.zeros(b, h_q, s_q, dtype=F64)
    for bi in range(b):
        s_k = int(seqlens[bi])
        for si in range(s_q):
            visible = s_k - (s_q - 1 - si) if causal and s_q > 1 else s_k
            for h in range(h_q):
                keys = [k_cache[int(block_table[bi, t // page]), t % page, h // g] for t in range(max(visible, 0))]
                out[bi, si, h], lse[bi, h, si], _ = naive_attend(q[bi, si, h], keys, d_v, scale)
    return out, lse


@pytest.mark.parametrize("h_kv", [1, 2])
@pytest.mark.parametrize("s_q,causal", [(1, False), (1, True), (3, False), (3, True)])
def test_dense_decode_matches_naive(h_kv, s_q, causal):
    g = gen(1)
    h_q, d, d_v, page = 4, 40, 32, 16
    seqlens = [37, 0, 2, 16]  # zero-length; s_k < s_q (causal rows with no key); exactly one page
    kv = T.make_paged_kv(seqlens, page, h_kv, d, g, dtype=torch.bfloat16)
    assert torch.isnan(kv.k_cache.float()).any()  # poisoning is really there
    q = T.randn_clipped((len(seqlens), s_q, h_q, d), g)
    out, lse = R.ref_dense_decode(q, kv.k_cache, kv.block_table, kv.cache_seqlens, head_dim_v=d_v, causal=causal)
    assert out.dtype == lse.dtype == torch.float32
    assert out.shape == (4, s_q, h_q, d_v) and lse.shape == (4, h_q, s_q)
    no_nan(out, lse)
    n_out, n_lse = naive_dense_decode(q, kv.k_cache, kv.block_table, seqlens, d_v, d ** -0.5, causal)
    close(out, n_out)
    close(lse, n_lse)
    assert (out[1] == 0).all() and torch.isposinf(lse[1]).all()
    if causal and s_q == 3:  # request 2 has s_k = 2: its first query sees no key
        assert (out[2, 0] == 0).all() and torch.isposinf(lse[2, :, 0]).all()


def test_dense_decode_scale_float64_strided():
    g = gen(2)
    seqlens = [5, 70]
    kv = T.make_paged_kv(seqlens, 64, 1, 24, g, dtype=torch.float16)
    q = T.randn_clipped((2, 2, 8, 24), g, dtype=torch.float16)
    out, lse = R.ref_dense_decode(q, kv.k_cache, kv.block_table, kv.cache_seqlens, 16, softmax_scale=0.3)
    n_out, n_lse = naive_dense_decode(q, kv.k_cache, kv.block_table, seqlens, 16, 0.3, False)
    close(out, n_out)
    close(lse, n_lse)
    out64, lse64 = R.ref_dense_decode(T.strided_view(q, 1), kv.k_cache, T.strided_view(kv.block_table, 0),
                                      kv.cache_seqlens, 16, softmax_scale=0.3, compute_dtype=F64)
    assert out64.dtype == torch.float32
    close(out64, n_out, atol=1e-6, rtol=1e-6)
    close(lse64, n_lse, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# sparse decode
# ------------------------------------------------------------------------------------------------
def naive_sparse_decode(q, sources, d_v, scale, sink):
    """sources: list of (kv cache, indices [b, s_q, k], topk_length [b] or None)."""
    b, s_q, h_q, _ = q.shape
    out = torch.zeros(b, s_q, h_q, d_v, dtype=F64)
    lse = torch.zeros(b, h_q, s_q, dtype=F64)
    for bi in range(b):
        for si in range(s_q):
            keys = []
            for cache, idx, tl in sources:
                flat = cache.reshape(-1, cache.shape[-1])
                for pos, ix in enumerate(idx[bi, si].tolist()):
                    if (tl is None or pos < int(tl[bi])) and 0 <= ix < flat.shape[0]:
                        keys.append(flat[ix])
            for h in range(h_q):
                sk = None if sink is None else sink[h]
                out[bi, si, h], lse[bi, h, si], _ = naive_attend(q[bi, si, h], keys, d_v, scale, sk)
    return out, lse


def sparse_cache(g, num_blocks, page, d, poison_frac=0.3):
    """Float cache [nb, page, 1, d] with some NaN rows; returns (cache, clean row ids)."""
    kv = T.randn_clipped((num_blocks, page, 1, d), g, dtype=torch.bfloat16)
    n = num_blocks * page
    bad = torch.rand(n, generator=g) < poison_frac
    kv.view(n, d)[bad] = float("nan")
    return kv, (~bad).nonzero().flatten()


def sparse_indices(g, shape, clean_rows, n_rows):
    """Indices mostly drawn from clean rows, with -1, out-of-range and huge values mixed in."""
    pick = clean_rows[torch.randint(0, clean_rows.numel(), shape, generator=g)]
    junk = torch.tensor([-1, n_rows, n_rows + 7, 2**31 - 1, -(2**31)])
    kind = torch.randint(0, 6, shape, generator=g)
    out = torch.where(kind == 0, junk[torch.randint(0, junk.numel(), shape, generator=g)], pick)
    return out.to(torch.int32)


@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("d_qk,d_v", [(40, 32), (32, 32)])
def test_sparse_decode_matches_naive(with_extra, d_qk, d_v):
    g = gen(3)
    b, s_q, h_q, topk, page = 4, 2, 4, 12, 8
    kv, clean = sparse_cache(g, 6, page, d_qk)
    idx = sparse_indices(g, (b, s_q, topk), clean, kv.shape[0] * page)
    idx[0, 0, 1] = idx[0, 0, 0] = clean[0]  # a duplicate: counts twice
    idx[1, :, :] = -1  # request 1: all invalid
    tl = torch.tensor([topk, topk, 0, 5], dtype=torch.int32)  # request 2: topk_length 0
    # Past topk_length: the NaN rows themselves (must be ignored, not just masked in the logits).
    bad_rows = torch.isnan(kv.view(-1, d_qk).float()).any(-1).nonzero().flatten()
    idx[3, :, 5:] = bad_rows[0].to(torch.int32)
    sink = torch.tensor([0.3, INF, -INF, -1.0])
    sources = [(kv, idx, tl)]
    kwargs = {}
    if with_extra:
        ekv, eclean = sparse_cache(g, 3, 16, d_qk)
        eidx = sparse_indices(g, (b, s_q, 7), eclean, ekv.shape[0] * 16)
        etl = torch.tensor([7, 3, 7, 0], dtype=torch.int32)
        sources.append((ekv, eidx, etl))
        kwargs = dict(extra_kv=ekv, extra_indices=eidx, extra_topk_length=etl)
    q = T.randn_clipped((b, s_q, h_q, d_qk), g)
    for s in (None, sink):
        out, lse = R.ref_sparse_decode(q, kv, idx, topk_length=tl, attn_sink=s, d_v=d_v, **kwargs)
        assert out.shape == (b, s_q, h_q, d_v) and lse.shape == (b, h_q, s_q)
        no_nan(out, lse)
        n_out, n_lse = naive_sparse_decode(q, sources, d_v, d_qk ** -0.5, s)
        close(out, n_out)
        close(lse, n_lse)
    # Sink semantics: lse excludes it; +inf -> 0 output; -inf -> unchanged.
    plain, plain_lse = R.ref_sparse_decode(q, kv, idx, tl, d_v=d_v, **kwargs)
    close(lse, plain_lse, atol=0, rtol=0)
    assert (out[..., 1, :] == 0).all()
    close(out[..., 2, :], plain[..., 2, :], atol=0, rtol=0)
    if not with_extra:  # requests without any key
        for r in (1, 2):
            assert (out[r] == 0).all() and torch.isposinf(lse[r]).all()


def test_sparse_decode_no_topk_length_scale_strided():
    g = gen(4)
    kv, clean = sparse_cache(g, 4, 16, 24)
    idx = sparse_indices(g, (2, 3, 9), clean, 64)
    q = T.randn_clipped((2, 3, 2, 24), g)
    out, lse = R.ref_sparse_decode(T.strided_view(q, 2), kv, T.strided_view(idx, 1), d_v=24, softmax_scale=0.7)
    n_out, n_lse = naive_sparse_decode(q, [(kv, idx, None)], 24, 0.7, None)
    close(out, n_out)
    close(lse, n_lse)


# ------------------------------------------------------------------------------------------------
# sparse prefill
# ------------------------------------------------------------------------------------------------
def naive_sparse_prefill(q, kv, indices, scale, d_v, sink, topk_length):
    s_q, h_q, _ = q.shape
    out = torch.zeros(s_q, h_q, d_v, dtype=F64)
    mx = torch.zeros(s_q, h_q, dtype=F64)
    lse = torch.zeros(s_q, h_q, dtype=F64)
    for t in range(s_q):
        keys = [kv[ix, 0] for pos, ix in enumerate(indices[t, 0].tolist())
                if (topk_length is None or pos < int(topk_length[t])) and 0 <= ix < kv.shape[0]]
        for h in range(h_q):
            sk = None if sink is None else sink[h]
            out[t, h], lse[t, h], mx[t, h] = naive_attend(q[t, h], keys, d_v, scale, sk)
    return out, mx, lse


@pytest.mark.parametrize("use_tl", [False, True])
@pytest.mark.parametrize("use_sink", [False, True])
def test_sparse_prefill_matches_naive(use_tl, use_sink, monkeypatch):
    g = gen(5)
    s_q, h_q, d, d_v, s_kv, topk = 9, 4, 40, 32, 50, 10
    kv, clean = sparse_cache(g, s_kv, 1, d)
    kv = kv.view(s_kv, 1, d)
    idx = sparse_indices(g, (s_q, 1, topk), clean, s_kv)
    idx[2] = -1
    idx[3, 0, :] = torch.tensor([2**31 - 1, -(2**31), s_kv, s_kv + 1, -5] * 2, dtype=torch.int32)
    tl = torch.randint(0, topk + 1, (s_q,), generator=g, dtype=torch.int32) if use_tl else None
    if use_tl:
        tl[4] = 0
        tl[5] = topk
        idx[6, 0, int(tl[6]):] = torch.isnan(kv[:, 0].float()).any(-1).nonzero()[0, 0].to(torch.int32)
    sink = torch.tensor([0.5, -INF, INF, -2.0]) if use_sink else None
    q = T.randn_clipped((s_q, h_q, d), g)
    out, mx, lse = R.ref_sparse_prefill(q, kv, idx, 0.2, d_v=d_v, attn_sink=sink, topk_length=tl)
    assert out.shape == (s_q, h_q, d_v) and mx.shape == lse.shape == (s_q, h_q)
    no_nan(out, mx, lse)
    n_out, n_mx, n_lse = naive_sparse_prefill(q, kv, idx, 0.2, d_v, sink, tl)
    close(out, n_out)
    close(mx, n_mx)
    close(lse, n_lse)
    for t in [2, 3] + ([4] if use_tl else []):
        assert (out[t] == 0).all() and torch.isposinf(lse[t]).all() and torch.isneginf(mx[t]).all()
    # Chunking (forced tiny) must not change anything.
    monkeypatch.setattr(R, "_CHUNK_ELEMS", 1)
    c_out, c_mx, c_lse = R.ref_sparse_prefill(q, kv, idx, 0.2, d_v=d_v, attn_sink=sink, topk_length=tl)
    close(c_out, out, atol=1e-7, rtol=1e-6)
    close(c_lse, lse, atol=0, rtol=1e-6)
    close(c_mx, mx, atol=0, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# dense MHA varlen
# ------------------------------------------------------------------------------------------------
def naive_mha(q, k, v, cu_q, cu_k, scale, causal):
    """float64 per-(query, head) loop; differentiable w.r.t. q, k, v (float64 leaves)."""
    h_q, h_kv = q.shape[1], k.shape[1]
    g = h_q // h_kv
    outs = [torch.zeros(v.shape[-1], dtype=F64)] * (q.shape[0] * h_q)
    lse = torch.full((h_q, q.shape[0]), INF, dtype=F64)
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        s_q, s_k = q1 - q0, k1 - k0
        for t in range(s_q):
            visible = s_k - (s_q - 1 - t) if causal else s_k
            for h in range(h_q):
                if visible <= 0:
                    continue
                s = k[k0:k0 + visible, h // g] @ q[q0 + t, h] * scale
                outs[(q0 + t) * h_q + h] = torch.softmax(s, 0) @ v[k0:k0 + visible, h // g]
                lse[h, q0 + t] = torch.logsumexp(s, 0).detach()
    return torch.stack(outs).view(q.shape[0], h_q, v.shape[-1]), lse


@pytest.mark.parametrize("h_kv", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_mha_varlen_fwd_bwd_matches_naive(h_kv, causal, monkeypatch):
    g = gen(6)
    h_q, d, d_v = 4, 24, 16
    lens_q, lens_k = [5, 0, 7, 4, 2], [3, 4, 7, 9, 0]  # s_q > s_k (causal rows w/o key), empty q, empty k
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = T.randn_clipped((sum(lens_q), h_q, d), g, scale=1.0)
    k = T.randn_clipped((sum(lens_k), h_kv, d), g, scale=1.0)
    v = T.randn_clipped((sum(lens_k), h_kv, d_v), g, scale=1.0)
    dout = T.randn_clipped((sum(lens_q), h_q, d_v), g, scale=1.0)
    out, lse = R.ref_mha_varlen_fwd(q, k, v, cu_q, cu_k, causal=causal)
    assert out.shape == (q.shape[0], h_q, d_v) and lse.shape == (h_q, q.shape[0])
    no_nan(out, lse)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    n_out, n_lse = naive_mha(*leaves, cu_q, cu_k, d ** -0.5, causal)
    close(out, n_out.detach())
    close(lse, n_lse)
    n_out.backward(dout.double())
    dq, dk, dv = R.ref_mha_varlen_bwd(dout, q, k, v, cu_q, cu_k, causal=causal)
    no_nan(dq, dk, dv)
    for got, leaf in zip((dq, dk, dv), leaves):
        assert got.dtype == torch.float32 and got.shape == leaf.shape
        close(got, leaf.grad)
    if causal:  # sequence 0: s_q=5, s_k=3 -> its first two queries see nothing
        assert (out[:2] == 0).all() and torch.isposinf(lse[:, :2]).all() and (dq[:2] == 0).all()
    assert (out[-2:] == 0).all() and torch.isposinf(lse[:, -2:]).all() and (dq[-2:] == 0).all()
    # Chunked query rows (forced tiny) and inference mode give the same answers.
    monkeypatch.setattr(R, "_CHUNK_ELEMS", 1)
    with torch.inference_mode():
        c_out, c_lse = R.ref_mha_varlen_fwd(q, k, v, cu_q, cu_k, causal=causal)
        c_grads = R.ref_mha_varlen_bwd(dout, q, k, v, cu_q, cu_k, causal=causal)
    close(c_out, out, atol=1e-6, rtol=1e-6)
    close(c_lse, lse, atol=1e-6, rtol=1e-6)
    for c, r in zip(c_grads, (dq, dk, dv)):
        close(c, r, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# check_close
# ------------------------------------------------------------------------------------------------
def test_check_close_rules():
    ref = torch.tensor([1e-5, 1000.0, 1.0, -2.0])
    # err 5e-4 < abs on a tiny value; err 1.0 < rel * 1000 on a large one.
    assert T.check_close("x", ref + torch.tensor([5e-4, 1.0, 0, 0]), ref, 1e-3, 2.01 / 128).ok
    res = T.check_close("x", ref + torch.tensor([0, 0, 0.5, 0]), ref, 1e-3, 2.01 / 128)
    assert not res.ok and res.num_violations == 1 and res.worst_index == (2,)
    assert res.max_abs_err == pytest.approx(0.5) and res.max_abs_index == (2,)
    with pytest.raises(AssertionError, match=r"(?s)violations: 1/4.*max abs err 5\.000e-01 at \(2,\)"):
        T.assert_close("x", ref + torch.tensor([0, 0, 0.5, 0]), ref, 1e-3, 2.01 / 128)
    # Exact match passes even with zero tolerances; shape mismatch fails.
    assert T.check_close("x", ref.clone(), ref, 0.0, 0.0).ok
    assert not T.check_close("x", ref[:3], ref, 1.0, 1.0).ok


def test_check_close_nonfinite_positions():
    ref = torch.tensor([[INF, -INF], [float("nan"), 1.0]])
    assert T.check_close("x", ref.clone(), ref, 1e-3, 1e-3).ok
    for bad in ([[-INF, -INF], [float("nan"), 1.0]],  # wrong sign of inf
                [[INF, -INF], [0.0, 1.0]],  # NaN expected, finite given
                [[INF, -INF], [float("nan"), INF]],  # inf where finite expected
                [[1e30, -INF], [float("nan"), 1.0]]):  # huge finite is not inf
        res = T.check_close("x", torch.tensor(bad), ref, 1e30, 1e30)
        assert not res.ok and res.num_nonfinite_mismatch == 1
    with pytest.raises(AssertionError, match="inf/NaN position mismatches: 1; first at \\(1, 0\\)"):
        T.assert_close("x", torch.tensor([[INF, -INF], [0.0, 1.0]]), ref, 1.0, 1.0)


def test_check_close_cosine(monkeypatch):
    g = gen(7)
    ref = torch.randn(1000, generator=g) * 1e-4
    # Every element is within abs (err 2e-4 < 1e-3), but the sign flip is caught by the cosine.
    assert T.check_close("x", -ref, ref, 1e-3, 0.0).ok
    res = T.check_close("x", -ref, ref, 1e-3, 0.0, cos_tol=5e-6)
    assert not res.ok and res.num_violations == 0 and res.cos_diff == pytest.approx(2.0)
    with pytest.raises(AssertionError, match="cos diff 2.000e\\+00"):
        T.assert_close_named("sparse_decode_out", -ref, ref)
    noisy = ref * (1 + 1e-4 * torch.randn(1000, generator=g))
    assert T.assert_close_named("sparse_decode_out", noisy, ref).cos_diff < 5e-6
    # Float64 accumulation, chunked: same result at any chunk size; ignores inf/NaN positions.
    ref2 = torch.cat([ref, torch.tensor([INF, float("nan")])])
    full = T.check_close("x", ref2 * 1.001, ref2, 1e-3, 0.01, 1e-5)
    monkeypatch.setattr(T, "_CHECK_CHUNK", 7)
    chunked = T.check_close("x", ref2 * 1.001, ref2, 1e-3, 0.01, 1e-5)
    assert full.ok and chunked.ok and chunked.cos_diff == pytest.approx(full.cos_diff, rel=1e-9)


def test_tolerances_table():
    tol = T.TOLERANCES
    assert tol["dense_decode_out"] == (8e-4, 2.01 / 128, 5e-6)
    assert tol["sparse_decode_out"] == (1e-3, 2.01 / 128, 5e-6)
    assert tol["decode_lse"] == (1e-6, 8.01 / 65536, None)
    assert tol["sparse_prefill_out"] == (8e-4, 3.01 / 128, 7e-6)
    assert tol["sparse_prefill_lse"] == (1e-6, 2.01 / 65536, None)
    assert tol["mha"] == tol["mha_dq"] == (1e-3, 8.01 / 128, 7e-6)


# ------------------------------------------------------------------------------------------------
# test-data helpers
# ------------------------------------------------------------------------------------------------
def test_make_paged_kv_layout_and_poison():
    lens = [0, 1, 33, 64, 100]
    kv = T.make_paged_kv(lens, 32, 2, 8, gen(8))
    nb = kv.k_cache.shape[0]
    assert nb == sum(-(-x // 32) for x in lens) + 2
    nan_rows = torch.isnan(kv.k_cache.float()).all(dim=(2, 3))
    assert torch.equal(nan_rows, ~kv.used)
    assert not torch.isnan(kv.k_cache.float()[kv.used]).any()
    seen = []
    for i, n in enumerate(kv.num_pages.tolist()):
        row = kv.block_table[i]
        seen += row[:n].tolist()
        for t in range(lens[i]):  # every token's row is used
            assert kv.used[int(row[t // 32]), t % 32]
    assert len(set(seen)) == len(seen) and all(0 <= x < nb for x in seen)
    garbage = torch.cat([kv.block_table[i, n:] for i, n in enumerate(kv.num_pages.tolist())])
    assert ((garbage < 0) | (garbage >= nb)).any()
    assert kv.block_table.dtype == kv.cache_seqlens.dtype == torch.int32
    again = T.make_paged_kv(lens, 32, 2, 8, gen(8))
    assert torch.equal(again.block_table, kv.block_table)


def test_small_helpers():
    g = gen(9)
    lens = T.varlen_seqlens(64, 100, g, num_zero=3)
    assert lens.dtype == torch.int32 and (lens == 0).sum() >= 3 and (lens >= 0).all()
    assert 60 < lens.float().mean() < 140
    assert (T.varlen_seqlens(64, 10, g) >= 1).all()
    x = T.randn_clipped((1000,), gen(1), dtype=torch.float32, scale=1.0)
    assert x.abs().max() <= 1.0 and torch.equal(x, T.randn_clipped((1000,), gen(1), torch.float32, scale=1.0))
    assert torch.isnan(T.poison_(torch.zeros(3, dtype=torch.bfloat16)).float()).all()
    assert (T.poison_(torch.zeros(3, dtype=torch.int32)) == 2**31 - 1).all()
    t = torch.arange(24.0).view(2, 3, 4)
    for dim in (0, 1, -1):
        s = T.strided_view(t, dim)
        assert torch.equal(s, t) and not s.is_contiguous()
    assert T.strided_view(t, 1).stride(-1) == 1


def _uniform_decode(k_cache, block_table, lens, s_q, h_q):
    """out of an 'attention' that ignores q: the mean of each request's V rows."""
    outs = []
    for i, n in enumerate(lens.tolist()):
        pages = block_table[i, :-(-n // 64)].long()
        v = k_cache[pages].reshape(-1, k_cache.shape[-1])[:n, :512].float()
        outs.append(v.mean(0).expand(s_q, h_q, 512))
    return torch.stack(outs)


@pytest.mark.parametrize("data", T.SHARP, ids=lambda d: d.name)
def test_comparator_fails_wrong_scale_and_uniform_attention_on_sharp_data(data):
    """On the sharp test data (logit std 3 and 6) the GPU tests' comparator rejects a reference whose
    softmax scale is 5% off, and an output that averages V uniformly; on SPEC's soft data (logit std
    ~0.01) the 5%-off out passes (and only the cosine bound tells a uniform one), which is why every
    GPU grid also runs sharp cases."""
    def outcome(d):
        g = gen(21)
        kv = T.make_paged_kv([300, 130, 64], 64, 1, 576, g, data=d)
        q = d.values((3, 1, 16, 576), g)
        scale = d.softmax_scale(576)
        out, lse = R.ref_dense_decode(q, kv.k_cache, kv.block_table, kv.cache_seqlens, softmax_scale=scale)
        off_out, off_lse = R.ref_dense_decode(q, kv.k_cache, kv.block_table, kv.cache_seqlens,
                                              softmax_scale=scale * 1.05)
        uniform = _uniform_decode(kv.k_cache, kv.block_table, kv.cache_seqlens, 1, 16)
        tol = d.tolerance("dense_decode_out")  # the bar the GPU tests hold this data to
        return (T.check_close("off", off_out, out, *tol).ok, T.check_close("uniform", uniform, out, *tol).ok,
                T.check_close("off_lse", off_lse, lse, *d.tolerance("decode_lse")).ok)

    assert outcome(data) == (False, False, False)
    assert outcome(T.SOFT)[0]


def test_run_in_threads_meets_at_the_barrier_and_reports_errors():
    seen = []

    def worker(i, barrier):
        seen.append(i)
        barrier.wait()
        assert len(seen) == 3  # nobody passes the barrier before all have set up
        return i * 10

    assert T.run_in_threads(worker, 3) == [0, 10, 20]

    def failing(i, barrier):
        if i == 1:
            raise KeyError("worker 1")
        barrier.wait()  # aborted by the failing worker: raises instead of hanging

    with pytest.raises(KeyError, match="worker 1"):
        T.run_in_threads(failing, 2)
