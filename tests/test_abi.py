"""ABI packing (CPU): struct layouts as the DSL lays them out, validation of runtime tensors."""
import struct
from types import SimpleNamespace

import pytest
import torch

from layouts import abi
from layouts.abi import ScalarArg, TensorArg


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
    packed = abi.pack(spec, [fake((3, 8), (16, 1)), 7, 0.5])
    assert len(packed.offsets) == 3 and all(o % 64 == 0 for o in packed.offsets)
    o = packed.offsets[0]
    ptr, m, k, s = struct.unpack_from("<Qiiq", packed.buffer, o)
    assert (ptr, m, k, s) == (0x7F0000001000, 3, 8, 16)
    assert struct.unpack_from("<i", packed.buffer, packed.offsets[1])[0] == 7
    assert struct.unpack_from("<f", packed.buffer, packed.offsets[2])[0] == 0.5


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
        abi.pack((spec,), [tensor])


def test_size_one_mode_stride_is_free_and_scalar_range_checked():
    spec = TensorArg("v", "f32", (1, "n"), (512, 1))
    abi.pack((spec,), [fake((1, 5), (5, 1), dtype=torch.float32)])
    with pytest.raises(abi.AbiError, match="does not fit i32"):
        abi.pack((ScalarArg("n"),), [2**31])
    with pytest.raises(abi.AbiError, match="expected 1 kernel arguments"):
        abi.pack((ScalarArg("n"),), [])


def test_tma_arg_params_and_checks():
    t = TensorArg("src", "bf16", ("rows", "cols"), ("s", 1))
    tma = abi.TmaArg(t, dims=(1, 0), box=(64, 64))
    assert [(p.size, p.align) for p in tma.params()] == [(128, 64), (8, 4)]
    with pytest.raises(ValueError, match="innermost"):
        abi.TmaArg(t, dims=(0, 1), box=(64, 64))
    with pytest.raises(ValueError, match="permutation"):
        abi.TmaArg(t, dims=(1,), box=(64,))


def test_tma_coordinate_extents_follow_the_kernels_view():
    from layouts import operands

    spec = operands.paged_kv_tma("bf16", 576)
    # the kernel views (num_blocks, 64, h_kv, 576) as (64, 576, h_kv, num_blocks)
    assert spec.coord_modes == [2, 0]
    assert [(p.size, p.align) for p in spec.params()] == [(128, 64), (8, 4)]
