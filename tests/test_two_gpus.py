"""Two GPUs in one process (issue 20): every entry point with its tensors on cuda:1 while cuda:0 is
current, both GPUs from two threads at once, a tensor on the wrong GPU, and CUDA-graph capture on
cuda:1.  Every test needs two GPUs and skips, saying so, below that.
"""
import pytest
import torch

from cute_mla.testing import ENTRY_POINTS, entry_case, randn_clipped, run_in_threads

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two GPUs (nvidia-h200-x2)")]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_point_on_the_second_gpu_while_the_first_is_current(entry):
    x, call, check = entry_case(entry, "cuda:1", 1)
    with torch.cuda.device(0):
        res = call(x)
        assert torch.cuda.current_device() == 0
    assert all(t.device == torch.device("cuda", 1) for t in res)
    torch.cuda.synchronize(1)
    check(x, res)


def test_two_threads_one_per_gpu():
    per_gpu = {i: [entry_case(e, f"cuda:{i}", 10 + i) for e in ENTRY_POINTS] for i in (0, 1)}

    def worker(i, barrier):
        torch.cuda.set_device(i)
        stream = torch.cuda.Stream(device=i)
        barrier.wait()
        done = []
        with torch.cuda.stream(stream):
            for k in range(100):
                x, call, check = per_gpu[i][k % len(per_gpu[i])]
                done.append((k % len(per_gpu[i]), call(x)))
        stream.synchronize()
        assert torch.cuda.current_device() == i
        return done

    results = run_in_threads(worker, 2)
    for i in (0, 1):
        assert len(results[i]) == 100
        for k, res in results[i]:
            assert all(t.device == torch.device("cuda", i) for t in res)
            x, _, check = per_gpu[i][k]
            check(x, res)


@pytest.mark.parametrize("name", ["k_cache", "block_table", "cache_seqlens"])
def test_a_tensor_on_the_other_gpu_is_named(name):
    x, call, _ = entry_case("dense", "cuda:1", 2)
    x[name] = x[name].to("cuda:0")
    with pytest.raises(ValueError, match=name):
        call(x)


def test_cuda_graph_capture_on_the_second_gpu():
    x, call, check = entry_case("dense", "cuda:1", 3)
    with torch.cuda.device(1):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call(x)  # plans and loads outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            res = call(x)
        x["q"].copy_(randn_clipped(x["q"].shape, torch.Generator(device="cuda:1").manual_seed(4)))  # SOFT data
        graph.replay()
        torch.cuda.synchronize(1)
    check(x, res)
