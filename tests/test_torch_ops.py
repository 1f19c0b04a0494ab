"""CPU tests of the torch.library ops (no kernel runs): the public API registers both ops with a
CUDA implementation, and their fakes give the entry points' output shapes and dtypes."""
import torch

import cute_mla

OPS = ("mla_decode", "sparse_prefill")


def test_public_api_registers_cuda_and_fake_implementations():
    cute_mla.flash_mla_with_kvcache  # the first public name imports cute_mla.api, which registers the ops
    for op in OPS:
        for key in ("CUDA", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cute_mla::{op}", key), (op, key)


def test_fakes_give_the_output_shapes():
    cute_mla.flash_mla_sparse_fwd
    meta = dict(device="meta")
    q = torch.empty(3, 2, 16, 576, dtype=torch.float16, **meta)
    k_cache = torch.empty(10, 64, 1, 576, dtype=torch.float16, **meta)
    out, lse = torch.ops.cute_mla.mla_decode(q, k_cache, None, None, 512, None, False, False, None, None, None,
                                             None, None, None)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((3, 2, 16, 512), torch.float16, (3, 16, 2), torch.float32)
    indices = torch.empty(3, 2, 128, dtype=torch.int32, **meta)
    out, _ = torch.ops.cute_mla.mla_decode(q, k_cache, None, None, 512, None, False, True, indices, None, None,
                                           None, None, None)
    assert out.dtype == torch.bfloat16  # sparse decode writes bf16
    q = torch.empty(7, 64, 576, dtype=torch.bfloat16, **meta)
    kv = torch.empty(100, 1, 576, dtype=torch.bfloat16, **meta)
    out, max_logits, lse = torch.ops.cute_mla.sparse_prefill(q, kv, torch.empty(7, 1, 128, dtype=torch.int32, **meta),
                                                             0.07, 512, None, None)
    assert (out.shape, max_logits.shape, lse.shape) == ((7, 64, 512), (7, 64), (7, 64))
