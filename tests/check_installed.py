"""Run each entry point of an *installed* cute-mla once against its float32 reference (GPU).

    python -m venv --system-site-packages /tmp/v && /tmp/v/bin/pip install --no-deps cute_mla-*.whl
    cd /tmp && /tmp/v/bin/python /path/to/check_installed.py

Run it from outside the repository, so that ``import cute_mla`` finds the wheel: it prints where
the package and its cubins were loaded from, and fails if that is a source checkout.  Not a
pytest module (pytest collects ``test_*.py`` only): the GPU test suite covers the same paths
from the checkout.
"""
import sys
from pathlib import Path

import torch

import cute_mla
from cute_mla import launcher
from cute_mla.quant import quantize_kvcache
from cute_mla.reference import ref_dense_decode, ref_sparse_decode, ref_sparse_prefill
from cute_mla.testing import SHARP, assert_close_named, make_paged_kv

DEV = "cuda"


def dense(g, data):
    kv = make_paged_kv([300, 77, 1], 64, 1, 576, g, data=data)
    q = data.values((3, 2, 64, 576), g)
    scale = data.softmax_scale(576)
    meta, _ = cute_mla.get_mla_metadata()
    out, lse = cute_mla.flash_mla_with_kvcache(q, kv.k_cache, kv.block_table, kv.cache_seqlens, 512, meta,
                                               softmax_scale=scale, causal=True)
    ref = ref_dense_decode(q, kv.k_cache, kv.block_table, kv.cache_seqlens, 512, softmax_scale=scale, causal=True)
    return (out, lse), ref, ("dense_decode_out", "decode_lse")


def sparse(g, data, d_qk):
    cache = quantize_kvcache(data.values((6, 64, 1, d_qk), g))
    idx = torch.randint(-1, 6 * 64, (2, 1, 128), generator=g, device=DEV, dtype=torch.int32)
    q = data.values((2, 1, 64, d_qk), g)
    sink = torch.randn(64, generator=g, device=DEV)
    scale = data.softmax_scale(d_qk)
    meta, _ = cute_mla.get_mla_metadata()
    out, lse = cute_mla.flash_mla_with_kvcache(q, cache, None, None, 512, meta, softmax_scale=scale,
                                               is_fp8_kvcache=True, indices=idx, attn_sink=sink)
    deq = cute_mla.dequantize_kvcache(cache, out_dtype=torch.float16 if d_qk == 576 else torch.bfloat16).float()
    if d_qk == 576:  # V32's RoPE stays bf16 in its matmul (tests/test_sparse_decode.py)
        deq[..., 512:] = cute_mla.dequantize_kvcache(cache, out_dtype=torch.bfloat16)[..., 512:].float()
    ref = ref_sparse_decode(q, deq, idx, attn_sink=sink, softmax_scale=scale)
    return (out, lse), ref, ("sparse_decode_out", "sparse_decode_lse")


def prefill(g, data):
    q = data.values((70, 64, 576), g)
    kv = data.values((300, 1, 576), g)
    idx = torch.randint(-1, 300, (70, 1, 128), generator=g, device=DEV, dtype=torch.int32)
    scale = data.softmax_scale(576)
    out, mx, lse = cute_mla.flash_mla_sparse_fwd(q, kv, idx, scale)
    ref = ref_sparse_prefill(q, kv, idx, scale)
    return (out, mx, lse), ref, ("sparse_prefill_out", "sparse_prefill_max_logits", "sparse_prefill_lse")


def main() -> int:
    where = Path(cute_mla.__file__).resolve().parent
    print(f"cute_mla from {where}; cubins from {launcher.cubin_dir()}")
    if (where.parent / "kernels").is_dir() or "site-packages" not in str(where):
        print("error: this is a source checkout, not an installed wheel; run from outside the repository")
        return 1
    g = torch.Generator(device=DEV).manual_seed(0)
    data = SHARP[0]
    checks = {"dense decode": lambda: dense(g, data), "sparse decode V32": lambda: sparse(g, data, 576),
              "sparse decode MODEL1": lambda: sparse(g, data, 512), "sparse prefill": lambda: prefill(g, data)}
    for name, run in checks.items():
        got, ref, kinds = run()
        for kind, a, r in zip(kinds, got, ref):
            assert_close_named(kind, a.float(), r, data=data)
        print(f"ok: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
