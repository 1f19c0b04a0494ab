"""Inputs that must not corrupt a batch, misuse of a scheduling metadata, devices and threads, and
the checks that run before anything is enqueued (issue 16).

CPU tests: the plan's int32 bounds and the softmax-scale rules.  GPU tests (skipped without one):
lengths that would wrap int32 in the scheduler, a reused metadata after the lengths changed, a
failed first call, calls from a new thread, inside ``torch.cuda.device`` and on a second GPU.
"""
import math
import threading

import numpy as np
import pytest
import torch

import cute_mla
from cute_mla import launcher, ops
from cute_mla.layouts.constants import SPLIT_COUNTS
from cute_mla.reference import ref_dense_decode
from cute_mla.testing import assert_close_named, make_paged_kv, randn_clipped
from cute_mla.schedules.decode_plan import (BLOCK_N, FIXED_OVERHEAD_BLOCKS, MAX_PLAN_LEN, check_plan_fits, max_plan_len,
                                            part_work, plan_host)

DEV = "cuda"
D_V = 512
HUGE = (2**31 - 1, 2**31 - 64)
gpu = pytest.mark.gpu


# ------------------------------------------------------------------------------------------------ CPU
def test_host_plan_clamps_lengths_that_would_wrap_int32():
    """Lengths past max_len count as max_len; every request is planned and every offset written."""
    lens = [HUGE[0], 300, HUGE[1], 0, 77]
    for max_len in (448, MAX_PLAN_LEN, max_plan_len(5, 132)):
        meta, offsets = plan_host(lens, 132, max_len=max_len)
        nblocks = [-(-min(max(s, 0), max_len) // BLOCK_N) for s in lens]
        covered = [0] * len(lens)
        for row in meta:
            for r, lo, hi, _ in part_work(row, nblocks):
                covered[r] += hi - lo
        assert covered == nblocks
        assert offsets[0] == 0 and all(b - a >= 1 for a, b in zip(offsets, offsets[1:]))


def test_plan_bounds_refuse_what_would_overflow():
    check_plan_fits(4, MAX_PLAN_LEN, 132)  # four requests of 2^31 tokens: fine
    for b in (1, 64, 9000):
        check_plan_fits(b, max_plan_len(b, 132), 132)
        with pytest.raises(ValueError):
            check_plan_fits(b, max_plan_len(b, 132) + 64 * b, 132)
    with pytest.raises(ValueError, match="at most"):
        check_plan_fits(1, MAX_PLAN_LEN + 1, 132)
    with pytest.raises(ValueError, match="split the batch"):
        check_plan_fits(64, MAX_PLAN_LEN, 132, fixed_overhead=FIXED_OVERHEAD_BLOCKS)


BAD_SCALES = [(float("nan"), ValueError), (math.inf, ValueError), (0.0, ValueError), (-0.1, ValueError),
              (np.float32(-1.0), ValueError), (torch.tensor(float("nan")), ValueError),
              (torch.ones(2), ValueError), ("0.1", TypeError), (True, TypeError), ([0.1], TypeError)]


@pytest.mark.parametrize("value,error", BAD_SCALES, ids=[repr(v)[:24] for v, _ in BAD_SCALES])
def test_bad_softmax_scale_is_refused_before_anything_runs(value, error):
    """On CPU tensors: the scale is checked before the device, so no GPU is needed to see it."""
    q = torch.zeros(1, 1, 64, 576, dtype=torch.bfloat16)
    kv = torch.zeros(2, 64, 1, 576, dtype=torch.bfloat16)
    table, lens = torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(error, match="softmax_scale"):
        cute_mla.flash_mla_with_kvcache(q, kv, table, lens, D_V, cute_mla.get_mla_metadata()[0],
                                        softmax_scale=value)
    with pytest.raises(error, match="sm_scale"):
        cute_mla.flash_mla_sparse_fwd(q[0], kv[0], torch.zeros(1, 1, 64, dtype=torch.int32), value)


@pytest.mark.parametrize("value", [0.07, 1, np.float32(0.07), np.float64(0.07), torch.tensor(0.07)])
def test_scale_value_accepts_python_numpy_and_0d_cpu_tensors(value):
    assert ops.scale_value("softmax_scale", value) == pytest.approx(0.07 if value != 1 else 1.0)


# ------------------------------------------------------------------------------------------------ GPU
def dense(seed=0, lens=(300, 77, 130, 1), h_q=64, s_q=2, device=DEV, poison=True):
    g = torch.Generator(device=device).manual_seed(seed)
    kv = make_paged_kv(list(lens), 64, 1, 576, g, poison=poison)
    return {"q": randn_clipped((len(lens), s_q, h_q, 576), g, scale=1.0), "k_cache": kv.k_cache,
            "block_table": kv.block_table, "cache_seqlens": kv.cache_seqlens}


def dense_call(x, meta=None, **kw):
    meta = cute_mla.get_mla_metadata()[0] if meta is None else meta
    return cute_mla.flash_mla_with_kvcache(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], D_V, meta,
                                           causal=True, **kw)


def check_dense(x, out, lse, rows=slice(None), softmax_scale=None):
    ref_out, ref_lse = ref_dense_decode(x["q"][rows], x["k_cache"], x["block_table"][rows],
                                        x["cache_seqlens"][rows], D_V, softmax_scale=softmax_scale, causal=True)
    assert_close_named("dense_decode_out", out[rows].float(), ref_out)
    assert_close_named("decode_lse", lse[rows], ref_lse)


@gpu
def test_scheduler_lengths_near_int32_max_match_the_host_plan():
    lens = [HUGE[0], 5, HUGE[1], 0, 4096]
    t = torch.tensor(lens, dtype=torch.int32, device=DEV)
    for max_len, parts in ((MAX_PLAN_LEN, 132), (448, 66), (64 * 1000, 7)):
        meta, offsets = ops.plan_decode(t, parts, max_len=max_len)
        ref_meta, ref_offsets = plan_host(lens, parts, max_len=max_len)
        assert meta.cpu().tolist() == ref_meta
        assert offsets.cpu().tolist() == ref_offsets


@gpu
def test_lengths_near_int32_max_leave_the_other_requests_intact():
    """Two requests of 2^31 - 1 and 2^31 - 64 tokens in a batch of normal ones: they are clamped to
    their block-table rows (7 pages) and the normal requests match the reference.  Run under
    compute-sanitizer memcheck on the device (README) to see that nothing reads out of bounds."""
    x = dense(1, lens=(384, 300, 384, 77))
    x["cache_seqlens"][0], x["cache_seqlens"][2] = HUGE
    out, lse = dense_call(x)
    check_dense(x, out, lse, rows=[1, 3])
    torch.cuda.synchronize()


@gpu
def test_reused_metadata_after_the_lengths_changed_raises():
    x = dense(2, poison=False)  # the lengths grow below into rows that must hold real keys
    meta, _ = cute_mla.get_mla_metadata()
    first = dense_call(x, meta)
    again = dense_call(dict(x, cache_seqlens=x["cache_seqlens"][:]), meta)  # a view: same memory, same version
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    x["cache_seqlens"].add_(1)  # the next step's lengths, written in place
    with pytest.raises(ValueError, match="planned from other lengths"):
        dense_call(x, meta)
    with pytest.raises(ValueError, match="planned from other lengths"):
        dense_call(dict(x, cache_seqlens=x["cache_seqlens"].clone()), meta)  # another tensor
    out, lse = dense_call(x)  # a new metadata for the new step
    check_dense(x, out, lse)


@gpu
def test_reused_sparse_metadata_after_topk_length_changed_raises():
    from cute_mla.quant import quantize_kvcache

    g = torch.Generator(device=DEV).manual_seed(3)
    q = randn_clipped((2, 1, 64, 512), g)
    cache = quantize_kvcache(randn_clipped((4, 64, 1, 512), g))
    idx = torch.randint(0, 256, (2, 1, 128), generator=g, device=DEV, dtype=torch.int32)
    lens = torch.tensor([100, 30], dtype=torch.int32, device=DEV)
    meta, _ = cute_mla.get_mla_metadata()

    def call(m, **kw):
        return cute_mla.flash_mla_with_kvcache(q, cache, None, None, D_V, m, is_fp8_kvcache=True, indices=idx, **kw)

    call(meta, topk_length=lens)
    lens[1] = 90
    with pytest.raises(ValueError, match="planned from other lengths"):
        call(meta, topk_length=lens)
    no_lengths, _ = cute_mla.get_mla_metadata()
    for _ in range(3):  # without length tensors every layer plans the same constant lengths
        call(no_lengths)


@gpu
def test_failed_first_call_leaves_the_metadata_unbound(monkeypatch):
    x = dense(4)
    meta, _ = cute_mla.get_mla_metadata()
    with pytest.raises(ValueError, match="block_table"):
        dense_call(dict(x, block_table=x["block_table"].long()), meta)
    assert not meta.have_initialized and meta.config is None
    dense_call(x)  # plans this signature, so the failure below comes from the launch itself

    def fail(self, stream, pointers=None):
        raise RuntimeError("launch failed (test)")

    monkeypatch.setattr(launcher.Launch, "run_current", fail)
    with pytest.raises(RuntimeError, match="launch failed"):
        dense_call(x, meta)
    assert not meta.have_initialized and meta.tile_scheduler_metadata is None
    monkeypatch.undo()
    out, lse = dense_call(x, meta)
    check_dense(x, out, lse)


def _misaligned(t):
    """t's values at an address 2 bytes past a 16-byte boundary (same shape and strides)."""
    buf = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)
    v = buf[1:1 + t.numel()].view(t.shape)
    v.copy_(t)
    return v


@gpu
def test_every_check_runs_before_any_launch(monkeypatch):
    """Inputs whose fault only the launch binding finds (alignment) raise before any kernel of the
    call (scheduler included) is launched, and leave the metadata unbound."""
    x = dense(5)
    launches = []
    run = launcher.Launch.run_current  # every launch goes through it
    monkeypatch.setattr(launcher.Launch, "run_current",
                        lambda self, *a, **k: (launches.append(self), run(self, *a, **k)))
    for bad in ({"q": _misaligned(x["q"])}, {"k_cache": _misaligned(x["k_cache"])}):
        meta, _ = cute_mla.get_mla_metadata()
        with pytest.raises(ValueError):
            dense_call(dict(x, **bad), meta)
        assert launches == [] and not meta.have_initialized
    dense_call(x)
    assert [launch.kernel.key.split("__")[0] for launch in launches] == ["decode_scheduler", "dense_decode_sm90"]


@gpu
def test_layers_sharing_a_metadata_match_the_reference_with_many_splits():
    """Eight dense and four sparse layers of one step, each on one metadata and workspace, with
    requests split many ways: every layer matches the reference (a layer's merge reads the
    workspace before the next layer's split kernel rewrites it, and leaves its counters zero)."""
    from cute_mla.quant import dequantize_kvcache, quantize_kvcache
    from cute_mla.reference import ref_sparse_decode

    x = dense(8, lens=(4000, 2500, 64))
    meta, _ = cute_mla.get_mla_metadata()
    for layer in range(8):
        x["q"] = randn_clipped(x["q"].shape, torch.Generator(device=DEV).manual_seed(100 + layer), scale=1.0)
        out, lse = dense_call(x, meta)
        check_dense(x, out, lse)
        # each launch leaves its ticket and split counters at zero for the next (split_tickets)
        b, s_q, h_q, _ = x["q"].shape
        counters = meta.workspace.tensor[-(SPLIT_COUNTS + b * -(-s_q * h_q // 64)):].view(torch.int32)
        assert int(counters.abs().sum()) == 0, counters
    assert int(meta.num_splits.diff().max()) > 8

    g = torch.Generator(device=DEV).manual_seed(9)
    cache = quantize_kvcache(randn_clipped((40, 64, 1, 512), g))  # MODEL1
    idx = torch.randint(-5, 40 * 64 + 5, (2, 2, 2048), generator=g, device=DEV, dtype=torch.int32)
    sink = torch.randn(64, generator=g, device=DEV)
    meta, _ = cute_mla.get_mla_metadata()
    for layer in range(4):
        q = randn_clipped((2, 2, 64, 512), g, scale=1.0)
        out, lse = cute_mla.flash_mla_with_kvcache(q, cache, None, None, D_V, meta, is_fp8_kvcache=True,
                                                   indices=idx, attn_sink=sink)
        ref_out, ref_lse = ref_sparse_decode(q, dequantize_kvcache(cache), idx, attn_sink=sink)
        assert_close_named("sparse_decode_out", out.float(), ref_out)
        assert_close_named("decode_lse", lse, ref_lse)
    assert int(meta.num_splits.diff().max()) > 8


@gpu
@pytest.mark.parametrize("d_qk", [576, 512])
def test_sparse_requests_of_one_known_length_skip_the_combine(monkeypatch, d_qk):
    """No length tensors: every request's length is topk (+ extra_topk), so the plan can give each
    part whole requests (``decode_plan.whole_request_parts``); then no request is split and the
    split kernel finalises every row itself (the sink too): one launch per call after the first."""
    from cute_mla.quant import dequantize_kvcache, quantize_kvcache
    from cute_mla.reference import ref_sparse_decode

    g = torch.Generator(device=DEV).manual_seed(11)
    cache = quantize_kvcache(randn_clipped((8, 64, 1, d_qk), g))
    idx = torch.randint(-1, 8 * 64, (4, 1, 128), generator=g, device=DEV, dtype=torch.int32)
    sink = torch.randn(64, generator=g, device=DEV)
    q = randn_clipped((4, 1, 64, d_qk), g, scale=1.0)
    launches = []
    run = launcher.Launch.run_current
    monkeypatch.setattr(launcher.Launch, "run_current",
                        lambda self, *a, **k: (launches.append(self.kernel.key), run(self, *a, **k)))
    meta, _ = cute_mla.get_mla_metadata()
    for _ in range(2):
        out, lse = cute_mla.flash_mla_with_kvcache(q, cache, None, None, D_V, meta, is_fp8_kvcache=True, indices=idx,
                                                   attn_sink=sink)
    assert [k.split("__")[0] for k in launches] == ["decode_scheduler", "sparse_decode_sm90", "sparse_decode_sm90"]
    assert meta.num_splits.cpu().tolist() == list(range(5))
    assert meta.workspace is None  # no call needs a workspace: its slots get a stand-in nothing reads
    deq = dequantize_kvcache(cache, out_dtype=torch.float16 if d_qk == 576 else torch.bfloat16).float()
    if d_qk == 576:  # V32's RoPE columns stay bf16 in the f16 matmuls
        deq[..., 512:] = dequantize_kvcache(cache)[..., 512:].float()
    ref_out, ref_lse = ref_sparse_decode(q, deq, idx, attn_sink=sink)
    assert_close_named("sparse_decode_out", out.float(), ref_out)
    assert_close_named("sparse_decode_lse", lse, ref_lse)


@gpu
def test_numpy_and_tensor_scales_give_the_float_result():
    x = dense(6)
    base = dense_call(x, softmax_scale=0.07)
    for s in (np.float32(0.07), np.float64(0.07), torch.tensor(0.07, dtype=torch.float64)):
        got = dense_call(x, softmax_scale=s)
        assert all(torch.equal(a, b) for a, b in zip(base, got)), type(s)
    check_dense(x, *base, softmax_scale=0.07)


@gpu
def test_calls_from_a_new_thread_and_inside_a_device_block():
    """A new thread has no current CUDA context until something makes one; the launch makes the
    tensors' own current."""
    x = dense(7)
    expected = dense_call(x)
    got, errors = [], []

    def worker():
        try:
            got.append(dense_call(x))
            torch.cuda.synchronize()
        except Exception as e:  # reported in the main thread
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert not errors, errors
    with torch.cuda.device(0):
        got.append(dense_call(x))
    for res in got:
        assert all(torch.equal(a, b) for a, b in zip(expected, res))


@gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two GPUs (the two-GPU run is its own issue)")
def test_tensors_on_the_second_gpu_while_the_first_is_current():
    x = dense(8, device="cuda:1")
    with torch.cuda.device(0):
        out, lse = dense_call(x)
        assert out.device == torch.device("cuda", 1)
    torch.cuda.synchronize(1)
    check_dense(x, out, lse)
