"""The prepared launch path (``cute_mla.plans``, ``launcher.Launch``) on the GPU (skipped without one).

Every public call after the first of its signature re-points a prepared launch instead of binding
it afresh.  These tests check what that could break:
- CUDA graphs: each entry point captured (a fresh scheduling metadata inside the graph, as a
  decode step makes one), replayed with new q / cache contents and new lengths, bit-identical
  to a fresh eager call on the same inputs;
- two threads calling at once, each on its own stream, all calls bit-identical to one thread's;
- tensors of one signature at other addresses (TMA maps are never reused across caches), and
  a signature whose strides differ, give their own reference results;
- five reruns of each entry point are bit-identical.
"""

import pytest
import torch

import cute_mla
from cute_mla.quant import quantize_kvcache
from cute_mla.reference import ref_dense_decode
from cute_mla.testing import assert_close_named, make_paged_kv, randn_clipped, run_in_threads, strided_view

pytestmark = pytest.mark.gpu
DEV = "cuda"
D_V = 512


def dense_inputs(seed, lens=(300, 77, 1), poison=True):
    g = torch.Generator(device=DEV).manual_seed(seed)
    kv = make_paged_kv(list(lens), 64, 1, 576, g, poison=poison)
    return {"q": randn_clipped((len(lens), 2, 64, 576), g, scale=1.0), "k_cache": kv.k_cache,
            "block_table": kv.block_table, "cache_seqlens": kv.cache_seqlens}


def dense_call(x):
    meta, _ = cute_mla.get_mla_metadata()
    outs = []
    for _ in range(2):  # two layers: the second reuses the schedule
        outs += cute_mla.flash_mla_with_kvcache(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], D_V,
                                                meta, causal=True)
    return outs


def sparse_inputs(seed, d_qk=512):
    g = torch.Generator(device=DEV).manual_seed(seed)
    b, s_q, h_q, topk, blocks, pbs = 3, 2, 64, 128, 6, 64
    x = {"q": randn_clipped((b, s_q, h_q, d_qk), g, scale=1.0),
         "k_cache": quantize_kvcache(randn_clipped((blocks, pbs, 1, d_qk), g)),
         "indices": torch.randint(-1, blocks * pbs, (b, s_q, topk), generator=g, device=DEV, dtype=torch.int32),
         "attn_sink": torch.randn(h_q, generator=g, device=DEV),
         "topk_length": torch.randint(0, topk + 1, (b,), generator=g, device=DEV, dtype=torch.int32)}
    if d_qk == 512:  # FlashMLA's extra cache comes with MODEL1
        x["extra_k_cache"] = quantize_kvcache(randn_clipped((blocks, 32, 1, d_qk), g))
        x["extra_indices"] = torch.randint(0, blocks * 32, (b, s_q, 64), generator=g, device=DEV, dtype=torch.int32)
    return x


def sparse_call(x):
    meta, _ = cute_mla.get_mla_metadata()
    outs = []
    for _ in range(2):
        outs += cute_mla.flash_mla_with_kvcache(
            x["q"], x["k_cache"], None, None, D_V, meta, is_fp8_kvcache=True, indices=x["indices"],
            attn_sink=x["attn_sink"], topk_length=x["topk_length"], extra_k_cache=x.get("extra_k_cache"),
            extra_indices_in_kvcache=x.get("extra_indices"))
    return outs


def prefill_inputs(seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    s_q, s_kv, topk = 70, 300, 128
    return {"q": randn_clipped((s_q, 64, 576), g, scale=1.0), "kv": randn_clipped((s_kv, 1, 576), g),
            "indices": torch.randint(-1, s_kv, (s_q, 1, topk), generator=g, device=DEV, dtype=torch.int32),
            "attn_sink": torch.randn(64, generator=g, device=DEV),
            "topk_length": torch.randint(0, topk + 1, (s_q,), generator=g, device=DEV, dtype=torch.int32)}


def prefill_call(x):
    return list(cute_mla.flash_mla_sparse_fwd(x["q"], x["kv"], x["indices"], 0.07, attn_sink=x["attn_sink"],
                                              topk_length=x["topk_length"]))


def refresh(x, fresh):
    """New contents for the data tensors of ``x`` from ``fresh`` (same shapes); cache rows that are
    NaN (unused) stay NaN; lengths shrink to 2/3 (to 0 for the shortest), within what the
    block tables and indices hold; tables and indices stay."""
    for name, t in x.items():
        if name in ("cache_seqlens", "topk_length"):
            t.copy_(t * 2 // 3)
        elif name not in ("block_table", "indices", "extra_indices"):
            keep_nan = t.dtype in (torch.bfloat16, torch.float32)
            t.copy_(torch.where(t.isnan(), t, fresh[name]) if keep_nan else fresh[name])


ENTRIES = {"dense": (dense_inputs, dense_call), "sparse_v32": (lambda s: sparse_inputs(s, 576), sparse_call),
           "sparse_model1": (sparse_inputs, sparse_call), "prefill": (prefill_inputs, prefill_call)}


def assert_bitwise(actual, expected):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert torch.equal(a.view(torch.uint8), e.view(torch.uint8)), f"output {i} differs"


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_cuda_graph_replays_match_eager_calls(entry):
    make, call = ENTRIES[entry]
    x = make(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(x)  # loads the modules and plans the signature outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call(x)
    for seed in (1, 2):
        refresh(x, make(seed) if entry != "dense" else dense_inputs(seed, poison=False))
        graph.replay()
        torch.cuda.synchronize()
        assert_bitwise(captured, call(x))


def test_two_threads_on_their_own_streams_match_one_thread():
    xs = [dense_inputs(3), sparse_inputs(4), prefill_inputs(5), sparse_inputs(6, 576)]
    calls = [dense_call, sparse_call, prefill_call, sparse_call]
    expected = [call(x) for call, x in zip(calls, xs)]
    torch.cuda.synchronize()

    def worker(tid, barrier):
        stream = torch.cuda.Stream()
        barrier.wait()
        done = []
        with torch.cuda.stream(stream):
            for i in range(40):
                k = (i + tid) % len(xs)
                done.append((k, calls[k](xs[k])))
        stream.synchronize()
        return done

    results = run_in_threads(worker, 2)
    for tid in (0, 1):
        assert len(results[tid]) == 40
        for k, outs in results[tid]:
            assert_bitwise(outs, expected[k])


def test_same_signature_other_memory_and_other_strides():
    """Two caches of one signature, alternated: each call reads its own (its own TMA map); then a
    strided q (a new signature) against the reference."""
    a, b = dense_inputs(7), dense_inputs(8)
    for x in (a, b, a, b):
        out, lse = dense_call(x)[:2]
        ref_out, ref_lse = ref_dense_decode(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], D_V,
                                            causal=True)
        assert_close_named("dense_decode_out", out, ref_out)
        assert_close_named("decode_lse", lse, ref_lse)
    q = strided_view(a["q"], dim=2, pad=64)
    out = dense_call(dict(a, q=q))[0]
    assert_close_named("dense_decode_out", out, ref_dense_decode(q, a["k_cache"], a["block_table"],
                                                                 a["cache_seqlens"], D_V, causal=True)[0])


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_five_reruns_are_bit_identical(entry):
    """Each entry point (a fresh scheduling metadata per rerun, two layers each) gives the same bits
    five times over: no atomics or scheduling races leak into the results."""
    make, call = ENTRIES[entry]
    x = make(9)
    first = call(x)
    for _ in range(5):
        assert_bitwise(call(x), first)


# ------------------------------------------------------------------------------- out= and torch.compile
def call_with(entry, x, **kw):
    """One call of ``entry`` on inputs ``x`` (a fresh metadata), with extra keyword arguments."""
    if entry == "prefill":
        return list(cute_mla.flash_mla_sparse_fwd(x["q"], x["kv"], x["indices"], 0.07, attn_sink=x["attn_sink"],
                                                  topk_length=x["topk_length"], **kw))
    meta, _ = cute_mla.get_mla_metadata()
    if entry == "dense":
        return list(cute_mla.flash_mla_with_kvcache(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], D_V,
                                                    meta, causal=True, **kw))
    return list(cute_mla.flash_mla_with_kvcache(
        x["q"], x["k_cache"], None, None, D_V, meta, is_fp8_kvcache=True, indices=x["indices"],
        attn_sink=x["attn_sink"], topk_length=x["topk_length"], extra_k_cache=x.get("extra_k_cache"),
        extra_indices_in_kvcache=x.get("extra_indices"), **kw))


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_out_argument_receives_the_output(entry):
    x = ENTRIES[entry][0](10)
    expected = call_with(entry, x)
    for _ in range(2):  # the second call takes the planned path
        buf = torch.full_like(expected[0], float("nan"))
        got = call_with(entry, x, out=buf)
        assert got[0] is buf
        assert_bitwise(got, expected)


@pytest.mark.parametrize("entry", ["dense", "prefill"])
def test_bad_out_is_refused_naming_it(entry):
    x = ENTRIES[entry][0](11)
    good = call_with(entry, x)[0]
    bad = [good.float(), good[..., :256], good.transpose(-1, -2).contiguous().transpose(-1, -2),
           torch.empty(good.numel() + 8, dtype=good.dtype, device=DEV)[1:1 + good.numel()].view(good.shape),
           x["q"][..., :D_V]]  # wrong dtype, shape, strides, alignment; q's own memory
    for out in bad:
        with pytest.raises(ValueError, match=r"\bout\b"):
            call_with(entry, x, out=out)


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_torch_compile_fullgraph_matches_eager(entry):
    """A compiled function that calls the public entry point traces it as one custom op
    (cute_mla.library), with no graph break, and gives the eager bits."""
    torch._dynamo.reset()
    x = ENTRIES[entry][0](12)
    expected = call_with(entry, x)
    compiled = torch.compile(lambda x: call_with(entry, x), fullgraph=True)
    assert_bitwise(compiled(x), expected)
    refresh(x, ENTRIES[entry][0](13) if entry != "dense" else dense_inputs(13, poison=False))  # new contents
    assert_bitwise(compiled(x), call_with(entry, x))


def test_custom_ops_pass_opcheck():
    d, p = dense_inputs(14), prefill_inputs(15)
    torch.library.opcheck(torch.ops.cute_mla.mla_decode.default,
                          (d["q"], d["k_cache"], d["block_table"], d["cache_seqlens"], D_V, None, True, False, None,
                           None, None, None, None, None))
    torch.library.opcheck(torch.ops.cute_mla.sparse_prefill.default,
                          (p["q"], p["kv"], p["indices"], 0.07, D_V, p["attn_sink"], p["topk_length"]))
