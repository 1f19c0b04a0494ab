"""CPU tests of the sparse-prefill batching helper (no kernel runs)."""
import torch

import cute_mla


def test_flatten_offsets_valid_indices_and_drops_invalid_ones():
    qs = [torch.zeros(2, 64, 512), torch.ones(3, 64, 512)]
    kvs = [torch.zeros(5, 1, 512), torch.ones(7, 1, 512)]
    idx = [torch.tensor([[[0, 4, 5, -1]], [[2, -7, 3, 1]]], dtype=torch.int32),
           torch.tensor([[[0, 6, 7, 2**31 - 1]], [[1, 1, -1, 5]], [[6, 0, 3, 8]]], dtype=torch.int32)]
    lens = [torch.tensor([4, 2], dtype=torch.int32), torch.tensor([1, 2, 3], dtype=torch.int32)]
    q, kv, flat, topk_length = cute_mla.flatten_sparse_prefill_batch(qs, kvs, idx, lens)
    assert q.shape == (5, 64, 512) and kv.shape == (12, 1, 512)
    assert flat.dtype == torch.int32 and flat.shape == (5, 1, 4)
    assert flat[:2].tolist() == [[[0, 4, -1, -1]], [[2, -1, 3, 1]]]
    # request 1's rows start at 5; its out-of-range entries (7, 2^31-1, 8) become -1
    assert flat[2:].tolist() == [[[5, 11, -1, -1]], [[6, 6, -1, 10]], [[11, 5, 8, -1]]]
    assert topk_length.tolist() == [4, 2, 1, 2, 3]
