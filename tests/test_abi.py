"""ABI packing (CPU): struct layouts as the DSL lays them out, validation of runtime tensors."""
import struct
from types import SimpleNamespace

import pytest
import torch

from cute_mla.layouts import abi
from cute_mla.layouts.abi import ScalarArg, TensorArg


class FakeCudaTensor(SimpleNamespace):
    """Enough of a CUDA tensor for packing without a GPU."""

    def dim(self):
        return len(self.shape)

    def stride(self):
        return self._stride

    def data_ptr(self):
        return self.ptr

    def numel(self):
        n = 1
        for s in self.shape:
            n *= s
        return n


def fake(shape, stride, dtype=torch.bfloat16, ptr=0x7F0000001000):
    return FakeCudaTensor(shape=tuple(shape), _stride=tuple(stride), dtype=dtype, is_cuda=True, ptr=ptr)


def test_struct_layout_matches_dsl_convention():
    # ptr, then dynamic extents (i32), then dynamic strides (i64): {Q, i, i, q, i} -> 32 bytes as seen in PTX
    t = TensorArg("a", "bf16", ("m", 64, "k"), ("s0", "s1", 1))
    assert [c for _, c in t.fields()] == ["Q", "i", "i", "q", "q"]
    assert t.layout() == (32, 8)
    assert TensorArg("b", "i32", ("n",), (1,)).layout() == (16, 8)
    assert ScalarArg("x").layout() == (4, 4)


def test_pack_values_and_offsets():
    spec = (TensorArg("a", "bf16", ("m", "k"), ("s", 1)), ScalarArg("n"), ScalarArg("f", "f32"))
    layout = abi.ParamLayout(spec)
    buf = layout.pack({"f": 0.5, "a": fake((3, 8), (16, 1)), "n": 7})  # by name, in any order
    assert layout.offsets == [0, 24, 28] and layout.size == 32
    ptr, m, k, s = struct.unpack_from("<Qiiq", buf, layout.offsets[0])
    assert (ptr, m, k, s) == (0x7F0000001000, 3, 8, 16)
    assert struct.unpack_from("<i", buf, layout.offsets[1])[0] == 7
    assert struct.unpack_from("<f", buf, layout.offsets[2])[0] == 0.5
    assert layout.pointer_words == {"a": 0}


def test_every_parameter_sits_at_its_alignment_and_matches_param_layout():
    from cute_mla import registry

    for kd in registry.KERNELS:
        for cfg in kd.variants:
            spec = kd.abi(cfg)
            layout = abi.ParamLayout(spec)
            params = abi.param_layout(spec)
            assert len(layout.offsets) == len(params)
            for off, p in zip(layout.offsets, params):
                assert off % p["align"] == 0, (kd.key(cfg), p)
            ends = [o + p["size"] for o, p in zip(layout.offsets, params)]
            assert all(e <= o for e, o in zip(ends, layout.offsets[1:])), "parameters overlap"
            assert layout.size >= ends[-1]
            assert all(w * 8 in layout.offsets for w in layout.pointer_words.values())


def test_arguments_bind_by_name_exactly():
    """Two neighbours of the same shape can never be swapped silently: every ABI name exactly once."""
    spec = (TensorArg("topk_length", "i32", ("n",), (1,), align=4),
            TensorArg("extra_topk_length", "i32", ("n",), (1,), align=4), ScalarArg("has_sink"))
    layout = abi.ParamLayout(spec)
    a, b = fake((4,), (1,), dtype=torch.int32, ptr=0x1000), fake((4,), (1,), dtype=torch.int32, ptr=0x2000)
    buf = layout.pack({"extra_topk_length": b, "topk_length": a, "has_sink": 1})
    assert struct.unpack_from("<Q", buf, layout.offsets[0])[0] == 0x1000
    assert struct.unpack_from("<Q", buf, layout.offsets[1])[0] == 0x2000
    with pytest.raises(abi.AbiError, match=r"missing \['has_sink'\], unknown none"):
        layout.pack({"extra_topk_length": b, "topk_length": a})
    with pytest.raises(abi.AbiError, match=r"missing \['has_sink'\], unknown \['has_snk'\]"):
        layout.pack({"extra_topk_length": b, "topk_length": a, "has_snk": 1})
    with pytest.raises(ValueError, match="unique"):
        abi.ParamLayout(spec + (ScalarArg("has_sink"),))


@pytest.mark.parametrize("tensor,match", [
    (fake((3, 8), (16, 1), dtype=torch.float16), "expected dtype"),
    (fake((3, 8, 1), (16, 1, 1)), "expected rank"),
    (fake((3, 8), (16, 2)), "stride 1 must be 1"),
    (fake((3, 8), (12, 1)), "multiple of 8"),
    (fake((3, 8), (16, 1), ptr=0x7F0000001002), "aligned"),
    (FakeCudaTensor(shape=(3, 8), _stride=(16, 1), dtype=torch.bfloat16, is_cuda=False, ptr=0, device="cpu"), "CUDA tensor"),
])
def test_tensor_that_breaks_the_abi_is_refused(tensor, match):
    spec = TensorArg("q", "bf16", ("m", "k"), ("s", 1), divisibility=(("s", 8),))
    with pytest.raises(abi.AbiError, match=f"q: .*{match}|{match}"):
        abi.ParamLayout((spec,)).pack({"q": tensor})


def test_size_one_mode_stride_is_free_and_scalar_range_checked():
    spec = TensorArg("v", "f32", (1, "n"), (512, 1))
    abi.ParamLayout((spec,)).pack({"v": fake((1, 5), (5, 1), dtype=torch.float32)})
    with pytest.raises(abi.AbiError, match="does not fit i32"):
        abi.ParamLayout((ScalarArg("n"),)).pack({"n": 2**31})


def test_tma_arg_params_and_checks():
    t = TensorArg("src", "bf16", ("rows", "cols"), ("s", 1))
    tma = abi.TmaArg(t, dims=(1, 0), box=(64, 64))
    assert [(p.size, p.align) for p in tma.params()] == [(128, 64), (8, 4)]
    with pytest.raises(ValueError, match="innermost"):
        abi.TmaArg(t, dims=(0, 1), box=(64, 64))
    with pytest.raises(ValueError, match="permutation"):
        abi.TmaArg(t, dims=(1,), box=(64,))


def test_tma_coordinate_extents_follow_the_kernels_view():
    from cute_mla.layouts import operands

    spec = operands.paged_kv_tma("bf16", 576)
    # the kernel views (num_blocks, 64, h_kv, 576) as (64, 576, h_kv, num_blocks)
    assert spec.coord_modes == [2, 0]
    assert [(p.size, p.align) for p in spec.params()] == [(128, 64), (8, 4)]


def test_runtime_never_imports_build_code():
    import subprocess
    import sys

    code = ("import sys, cute_mla, cute_mla.launcher, cute_mla.plans, cute_mla.driver; "
            "bad = [m for m in ('cute_mla.compile', 'cutlass', 'kernels') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compile_refuses_a_kernel_whose_arguments_are_named_otherwise():
    from cute_mla.compile import CompileError, check_arg_names

    class Kernel:
        def __call__(self, topk_length, extra_topk_length, stream):
            pass

    spec = (TensorArg("topk_length", "i32", ("n",), (1,), align=4),
            TensorArg("extra_topk_length", "i32", ("n",), (1,), align=4))
    check_arg_names("k", Kernel, spec)
    with pytest.raises(CompileError, match="takes"):
        check_arg_names("k", Kernel, spec[::-1])


def _fake_launch(spec, args, static=()):
    """A ``launcher.Launch`` of a kernel that was never loaded (no GPU): its ABI is ``spec``."""
    from cute_mla import launcher

    kernel = SimpleNamespace(key="fake", layout=abi.ParamLayout(spec), pdl_wait=False, device_index=0, context=7,
                             function=None, cluster=(1, 1, 1), block=(128, 1, 1), smem_bytes=0)
    return launcher.Launch(kernel, (1,), False, args, static)


def test_a_launch_group_writes_every_pointer_into_its_own_argument(monkeypatch):
    """The pointer list of a call feeds each launch of its group by slot name: each tensor argument
    gets its slot's pointer, static ones and scalars keep what they were bound to."""
    from cute_mla import launcher

    i32 = dict(dtype=torch.int32)
    one = _fake_launch((TensorArg("a", "i32", ("n",), (1,)), ScalarArg("n"), TensorArg("b", "i32", ("n",), (1,))),
                       {"a": fake((4,), (1,), ptr=0x100, **i32), "n": 3, "b": fake((4,), (1,), ptr=0x200, **i32)})
    two = _fake_launch((TensorArg("c", "i32", ("n",), (1,)), TensorArg("b", "i32", ("n",), (1,))),
                       {"c": fake((4,), (1,), ptr=0x300, **i32), "b": fake((4,), (1,), ptr=0x200, **i32)},
                       static=("c",))
    group = launcher.LaunchGroup((one, two), ("x", "b", "a", "c"))
    assert one.lock is two.lock is group.lock
    launched = []
    for launch in (one, two):
        monkeypatch.setattr(launch, "_launch_plain",
                            lambda stream, params, extra, launch=launch: launched.append(
                                (launch, stream, bytes(launch._buffer))) or (0,))
    monkeypatch.setattr(launcher, "_DRV", SimpleNamespace(cuCtxGetCurrent=lambda: (0, 7)))  # context 7 is current
    group.run(5, [0x1110, 0x2220, 0x3330, 0x4440])
    assert [(launch, stream) for launch, stream, _ in launched] == [(one, 5), (two, 5)]
    words = [struct.unpack_from("<Q", buf, 0)[0] for _, _, buf in launched]
    assert words == [0x3330, 0x300]  # one's a <- slot "a"; two's c is static: what it was bound to
    b_one = struct.unpack_from("<Q", launched[0][2], one.kernel.layout.offsets[2])[0]
    b_two = struct.unpack_from("<Q", launched[1][2], two.kernel.layout.offsets[1])[0]
    assert b_one == b_two == 0x2220
    assert struct.unpack_from("<i", launched[0][2], one.kernel.layout.offsets[1])[0] == 3  # the scalar n
    with pytest.raises(abi.AbiError, match=r"no pointer slot for the tensor arguments \['b'\]"):
        one.bind_slots(("a", "x"))
