"""The few CUDA driver services the launcher needs, through cuda-python (runtime code).

- ``check``: turn a cuda-python result tuple into a value or a RuntimeError naming the call.
- ``primary_context`` / ``DeviceContext``: launches run in the primary context of the tensors'
  device, made current for the launch when the calling thread has another one (or none).
- ``memset_d32``: 32-bit words set on a stream (a memset node under graph capture), in the
  device's primary context.
- ``current_stream``: torch's current stream of a device as a raw handle, in about 0.15 us
  where ``torch.cuda.current_stream(i).cuda_stream`` takes 1.7 (H200 host, 2026-12-04).
- ``tensor_maps`` / ``tensor_map``: the 128-byte ``CUtensorMap`` of a TMA argument, cached by
  everything it encodes (spec, device, shape, strides, data pointer), so a map is never reused
  for memory it was not made for.
"""
from __future__ import annotations

import struct
import threading
from typing import Any

from cute_mla.layouts.abi import DTYPES, AbiError, TmaArg


_driver = None


def _drv():
    """cuda.bindings.driver, imported on first use (an import statement per call costs ~0.3 us)."""
    global _driver
    if _driver is None:
        from cuda.bindings import driver

        _driver = driver
    return _driver


def check(result, what: str):
    """Unpack a cuda-python return tuple, raising on any CUresult other than success."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err:
        drv = _drv()
        _, name = drv.cuGetErrorName(err)
        _, msg = drv.cuGetErrorString(err)
        raise RuntimeError(f"{what} failed: {name.decode() if name else err}: {msg.decode() if msg else ''}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


_PRIMARY: dict[int, Any] = {}
_PRIMARY_LOCK = threading.Lock()


def primary_context(device_index: int):
    """The primary context of ``device_index`` (the one torch uses), retained once per process."""
    ctx = _PRIMARY.get(device_index)
    if ctx is None:
        import torch

        drv = _drv()
        torch.cuda.init()
        with _PRIMARY_LOCK:
            if device_index not in _PRIMARY:
                dev = check(drv.cuDeviceGet(device_index), "cuDeviceGet")
                _PRIMARY[device_index] = check(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            ctx = _PRIMARY[device_index]
    return ctx


class DeviceContext:
    """``with DeviceContext(ctx):`` makes ``ctx`` current on this thread for the block, and leaves
    the thread's own context (torch's current device, or none) as it was afterwards.  When ``ctx``
    is already current it costs one ``cuCtxGetCurrent``."""

    __slots__ = ("ctx", "handle", "pushed")

    def __init__(self, ctx):
        self.ctx = ctx
        self.handle = int(ctx)
        self.pushed = False

    def __enter__(self):
        self.pushed = not is_current(self.handle)
        if self.pushed:
            check(_drv().cuCtxPushCurrent(self.ctx), "cuCtxPushCurrent")
        return self

    def __exit__(self, *exc):
        if self.pushed:
            check(_drv().cuCtxPopCurrent(), "cuCtxPopCurrent")
        return False


def is_current(handle: int) -> bool:
    """Whether the context with this handle (``int(ctx)``) is the calling thread's current one."""
    err, cur = _drv().cuCtxGetCurrent()
    return not err and cur is not None and int(cur) == handle


def memset_d32(ptr: int, value: int, count: int, stream: int, device_index: int) -> None:
    """Enqueue ``count`` 32-bit words of ``value`` at ``ptr`` on the raw ``stream`` of device
    ``device_index`` (``cuMemsetD32Async``; under graph capture a memset node, not a kernel), in
    that device's primary context: a thread torch has not used has no current context, and the
    driver refuses the call there (CUDA_ERROR_INVALID_CONTEXT, H100, session 32)."""
    with DeviceContext(primary_context(device_index)):
        check(_drv().cuMemsetD32Async(ptr, value, count, stream), "cuMemsetD32Async")


def _raw_stream_getter():
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw
    return lambda index: torch.cuda.current_stream(index).cuda_stream


_raw_stream = None


def current_stream(device_index: int) -> int:
    """torch's current stream on ``device_index`` as a raw ``CUstream`` handle (an int)."""
    global _raw_stream
    if _raw_stream is None:
        _raw_stream = _raw_stream_getter()
    return _raw_stream(device_index)


_MAPS: dict[tuple, dict[int, bytes]] = {}
_MAPS_LOCK = threading.Lock()
_MAPS_PER_TENSOR = 1024  # maps kept per (spec, device, shape, strides); a full table is dropped, not evicted


def tensor_maps(spec: TmaArg, device_index: int, shape: tuple, stride: tuple) -> dict[int, bytes]:
    """The table data pointer -> 128-byte CUtensorMap for tensors of ``shape``/``stride``
    (elements) on ``device_index`` as ``spec`` describes them: with the table's own key, every
    map is cached by everything it encodes.  A prepared launch looks its table up once, so a call
    pays one dict lookup by pointer; ``tensor_map`` fills it."""
    key = (spec, device_index, shape, stride)
    maps = _MAPS.get(key)
    if maps is None:
        with _MAPS_LOCK:
            maps = _MAPS.setdefault(key, {})
    return maps


def tensor_map(maps: dict[int, bytes], spec: TmaArg, ptr: int, shape: tuple, stride: tuple) -> bytes:
    """The map for the tensor at ``ptr`` from ``maps`` (its ``tensor_maps`` table), encoded on a miss."""
    m = maps.get(ptr)
    if m is None:
        if len(maps) >= _MAPS_PER_TENSOR:
            maps.clear()
        m = maps[ptr] = encode_tensor_map(spec, ptr, shape, stride)
    return m


def encode_tensor_map(spec: TmaArg, ptr: int, shape: tuple, stride: tuple) -> bytes:
    """Encode the CUtensorMap (``cuTensorMapEncodeTiled``) of one TMA argument."""
    drv = _drv()
    dt = drv.CUtensorMapDataType
    kinds = {"bf16": dt.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, "fp16": dt.CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
             "f32": dt.CU_TENSOR_MAP_DATA_TYPE_FLOAT32, "i32": dt.CU_TENSOR_MAP_DATA_TYPE_INT32,
             "u8": dt.CU_TENSOR_MAP_DATA_TYPE_UINT8, "fp8e4m3": dt.CU_TENSOR_MAP_DATA_TYPE_UINT8}
    sw = drv.CUtensorMapSwizzle
    swizzle = {0: sw.CU_TENSOR_MAP_SWIZZLE_NONE, 32: sw.CU_TENSOR_MAP_SWIZZLE_32B,
               64: sw.CU_TENSOR_MAP_SWIZZLE_64B, 128: sw.CU_TENSOR_MAP_SWIZZLE_128B}[spec.swizzle]
    esize = DTYPES[spec.tensor.dtype][1]
    for m in spec.dims[1:]:
        if (stride[m] * esize) % 16:
            raise AbiError(f"{spec.name}: TMA needs 16-byte multiples for strides, "
                           f"mode {m} has {stride[m] * esize} bytes")
    oob = (drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA if spec.oob_nan
           else drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    tmap = check(drv.cuTensorMapEncodeTiled(
        kinds[spec.tensor.dtype], len(spec.dims), ptr,
        [drv.cuuint64_t(int(shape[m])) for m in spec.dims],
        [drv.cuuint64_t(int(stride[m]) * esize) for m in spec.dims[1:]],
        [drv.cuuint32_t(b) for b in spec.box], [drv.cuuint32_t(1)] * len(spec.dims),
        drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
        drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_128B, oob), f"cuTensorMapEncodeTiled({spec.name})")
    return struct.pack("<16Q", *[int(x) for x in tmap.opaque])
