"""Two GPUs in one process (issue 20): every entry point with its tensors on cuda:1 while cuda:0 is
current, both GPUs from two threads at once, a tensor on the wrong GPU, and CUDA-graph capture on
cuda:1.  Every test needs two GPUs and skips, saying so, below that.
"""
import threading

import pytest
import torch

import cute_mla
from cute_mla.quant import quantize_kvcache
from cute_mla.reference import ref_dense_decode, ref_sparse_decode, ref_sparse_prefill
from cute_mla.testing import assert_close_named, make_paged_kv, randn_clipped

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two GPUs (nvidia-h200-x2)")]
D_V = 512


def dense_case(dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    kv = make_paged_kv([300, 77, 129], 64, 1, 576, g)
    x = dict(q=randn_clipped((3, 2, 64, 576), g, scale=1.0), k_cache=kv.k_cache, block_table=kv.block_table,
             cache_seqlens=kv.cache_seqlens)

    def call(x, meta=None):
        meta = cute_mla.get_mla_metadata()[0] if meta is None else meta
        return cute_mla.flash_mla_with_kvcache(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], D_V, meta,
                                               causal=True)

    def check(x, res):
        ref = ref_dense_decode(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], D_V, causal=True)
        assert_close_named("dense_decode_out", res[0].float(), ref[0])
        assert_close_named("decode_lse", res[1], ref[1])

    return x, call, check


def sparse_case(dev, seed, d_qk):
    g = torch.Generator(device=dev).manual_seed(seed)
    cache = quantize_kvcache(randn_clipped((6, 64, 1, d_qk), g))
    x = dict(q=randn_clipped((2, 2, 64, d_qk), g), k_cache=cache, attn_sink=torch.randn(64, generator=g, device=dev),
             indices=torch.randint(-1, 6 * 64, (2, 2, 128), generator=g, device=dev, dtype=torch.int32))
    matmul_dtype = torch.float16 if d_qk == 576 else torch.bfloat16

    def call(x, meta=None):
        meta = cute_mla.get_mla_metadata()[0] if meta is None else meta
        return cute_mla.flash_mla_with_kvcache(x["q"], x["k_cache"], None, None, D_V, meta, is_fp8_kvcache=True,
                                               indices=x["indices"], attn_sink=x["attn_sink"])

    def check(x, res):
        deq = cute_mla.dequantize_kvcache(x["k_cache"], out_dtype=matmul_dtype).float()
        if d_qk == 576:  # V32's RoPE columns stay bf16 in the kernels' matmul
            deq[..., 512:] = cute_mla.dequantize_kvcache(x["k_cache"])[..., 512:].float()
        ref = ref_sparse_decode(x["q"], deq, x["indices"], attn_sink=x["attn_sink"])
        assert_close_named("sparse_decode_out", res[0].float(), ref[0])
        assert_close_named("sparse_decode_lse", res[1], ref[1])

    return x, call, check


def prefill_case(dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    x = dict(q=randn_clipped((70, 64, 576), g), kv=randn_clipped((300, 1, 576), g),
             indices=torch.randint(-1, 300, (70, 1, 128), generator=g, device=dev, dtype=torch.int32))

    def call(x, meta=None):
        return cute_mla.flash_mla_sparse_fwd(x["q"], x["kv"], x["indices"], 0.07)

    def check(x, res):
        ref = ref_sparse_prefill(x["q"], x["kv"], x["indices"], 0.07)
        for kind, a, r in zip(("sparse_prefill_out", "sparse_prefill_max_logits", "sparse_prefill_lse"), res, ref):
            assert_close_named(kind, a.float(), r)

    return x, call, check


CASES = {"dense": dense_case, "sparse_v32": lambda d, s: sparse_case(d, s, 576),
         "sparse_model1": lambda d, s: sparse_case(d, s, 512), "prefill": prefill_case}


@pytest.mark.parametrize("entry", list(CASES))
def test_entry_point_on_the_second_gpu_while_the_first_is_current(entry):
    x, call, check = CASES[entry]("cuda:1", 1)
    with torch.cuda.device(0):
        res = call(x)
        assert torch.cuda.current_device() == 0
    assert all(t.device == torch.device("cuda", 1) for t in res)
    torch.cuda.synchronize(1)
    check(x, res)


def test_two_threads_one_per_gpu():
    per_gpu = {i: [CASES[e](f"cuda:{i}", 10 + i) for e in CASES] for i in (0, 1)}
    errors, results = [], {0: [], 1: []}
    barrier = threading.Barrier(2)

    def worker(i):
        try:
            torch.cuda.set_device(i)
            stream = torch.cuda.Stream(device=i)
            barrier.wait()
            with torch.cuda.stream(stream):
                for k in range(100):
                    x, call, check = per_gpu[i][k % len(per_gpu[i])]
                    results[i].append((k % len(per_gpu[i]), call(x)))
            stream.synchronize()
            assert torch.cuda.current_device() == i
        except Exception as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in (0, 1):
        assert len(results[i]) == 100
        for k, res in results[i]:
            assert all(t.device == torch.device("cuda", i) for t in res)
            x, _, check = per_gpu[i][k]
            check(x, res)


@pytest.mark.parametrize("name", ["k_cache", "block_table", "cache_seqlens"])
def test_a_tensor_on_the_other_gpu_is_named(name):
    x, call, _ = dense_case("cuda:1", 2)
    x[name] = x[name].to("cuda:0")
    with pytest.raises(ValueError, match=name):
        call(x)


def test_cuda_graph_capture_on_the_second_gpu():
    x, call, check = dense_case("cuda:1", 3)
    with torch.cuda.device(1):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call(x)  # plans and loads outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            res = call(x)
        x["q"].copy_(randn_clipped(x["q"].shape, torch.Generator(device="cuda:1").manual_seed(4), scale=1.0))
        graph.replay()
        torch.cuda.synchronize(1)
    check(x, res)
