"""Loads the prebuilt cubins and launches them on torch's current stream.

Runtime needs torch and cuda-python only.  Per device, modules are loaded
lazily once (in torch's primary context) and kept; each launch packs the
parameters by the kernel's ABI, sets cluster/PDL attributes and calls
``cuLaunchKernelEx``.  Nothing here synchronises the host, so launches can be
captured in a CUDA graph.
"""
from __future__ import annotations

import ctypes
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from cute_mla import registry
from layouts import abi

CUBIN_DIR_ENV = "CUTE_MLA_CUBIN_DIR"
BUILD_HINT = "build them with `python -m cute_mla.compile` (on any machine, no GPU needed)"


class CubinsNotBuilt(RuntimeError):
    pass


class UnsupportedDevice(RuntimeError):
    pass


def cubin_dir() -> Path:
    env = os.environ.get(CUBIN_DIR_ENV)
    if env:
        return Path(env)
    from cute_mla.compile import DEFAULT_OUT  # a path constant; importing it loads no DSL

    return DEFAULT_OUT


def _drv():
    from cuda.bindings import driver

    return driver


def check(result, what: str):
    """Unpack a cuda-python return tuple, raising on any CUresult other than success."""
    drv = _drv()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != drv.CUresult.CUDA_SUCCESS:
        _, name = drv.cuGetErrorName(err)
        _, msg = drv.cuGetErrorString(err)
        raise RuntimeError(f"{what} failed: {name.decode() if name else err}: {msg.decode() if msg else ''}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def arch_for_device(device_index: int) -> str:
    import torch

    cc = torch.cuda.get_device_capability(device_index)
    try:
        return registry.ARCH_FOR_CC[cc]
    except KeyError:
        supported = ", ".join(f"sm_{a}{b} -> {arch}" for (a, b), arch in sorted(registry.ARCH_FOR_CC.items()))
        raise UnsupportedDevice(
            f"{torch.cuda.get_device_name(device_index)} has compute capability {cc[0]}.{cc[1]}; "
            f"cute-mla supports {supported}") from None


@dataclass
class LoadedKernel:
    entry: Mapping[str, Any]
    spec: tuple
    function: Any


class _DeviceKernels:
    """The loaded modules of one device, keyed by variant key."""

    def __init__(self, device_index: int):
        self.device_index = device_index
        self.arch = arch_for_device(device_index)
        self.dir = cubin_dir() / self.arch
        path = self.dir / "manifest.json"
        if not path.exists():
            raise CubinsNotBuilt(f"no {self.arch} cubins at {self.dir}: {BUILD_HINT}")
        self.manifest = json.loads(path.read_text())
        self.loaded: dict[str, LoadedKernel] = {}
        self.lock = threading.Lock()

    def get(self, kd: registry.KernelDef, config: Mapping[str, Any]) -> LoadedKernel:
        key = kd.key(config)
        lk = self.loaded.get(key)
        if lk is not None:
            return lk
        with self.lock:
            if key not in self.loaded:
                self.loaded[key] = self._load(kd, config, key)
            return self.loaded[key]

    def _load(self, kd, config, key) -> LoadedKernel:
        import torch

        drv = _drv()
        entry = self.manifest["kernels"].get(key)
        if entry is None:
            raise CubinsNotBuilt(f"kernel variant {key} is missing from {self.dir / 'manifest.json'}: {BUILD_HINT}")
        spec = kd.abi(config)
        if [(p["size"], p["align"]) for p in entry["params"]] != [(p["size"], p["align"]) for p in abi.param_layout(spec)]:
            raise CubinsNotBuilt(f"{key}: manifest ABI differs from this cute-mla's layouts.operands; {BUILD_HINT}")
        data = (self.dir / entry["cubin"]).read_bytes()
        # Load into torch's primary context of this device.
        with torch.cuda.device(self.device_index):
            torch.cuda.init()
            ctx = check(drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
            if ctx is None or int(ctx) == 0:
                dev = check(drv.cuDeviceGet(self.device_index), "cuDeviceGet")
                ctx = check(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
                check(drv.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
            module = check(drv.cuModuleLoadData(data), f"cuModuleLoadData({entry['cubin']})")
            fn = check(drv.cuModuleGetFunction(module, entry["symbol"].encode()), f"cuModuleGetFunction({key})")
            if entry["smem_bytes"] > 48 * 1024:
                attr = drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                check(drv.cuFuncSetAttribute(fn, attr, entry["smem_bytes"]), f"cuFuncSetAttribute({key})")
        return LoadedKernel(entry, spec, fn)


_DEVICES: dict[int, _DeviceKernels] = {}
_DEVICES_LOCK = threading.Lock()


def device_kernels(device_index: int) -> _DeviceKernels:
    dk = _DEVICES.get(device_index)
    if dk is None:
        with _DEVICES_LOCK:
            dk = _DEVICES.setdefault(device_index, _DeviceKernels(device_index))
    return dk


def launch(name: str, config: Mapping[str, Any], grid: Sequence[int], args: Sequence[Any], *,
           device_index: int | None = None, pdl: bool = False) -> None:
    """Launch kernel variant ``name``/``config`` over ``grid`` with ``args`` (tensors and
    numbers, in ABI order) on torch's current stream of the device.

    ``pdl=True`` lets the kernel start before its predecessor on the stream has
    finished (programmatic dependent launch); the kernel must then call
    ``griddepcontrol.wait`` before it reads the predecessor's output.
    """
    import torch

    drv = _drv()
    if device_index is None:
        device_index = torch.cuda.current_device()
    lk = device_kernels(device_index).get(registry.get(name), config)
    entry = lk.entry
    if pdl and not entry["pdl_wait"]:
        raise RuntimeError(f"{name}: launched with PDL but the kernel never waits on its predecessor")
    grid = [int(g) for g in grid] + [1] * (3 - len(grid))
    if min(grid) <= 0:
        return  # an empty grid is a no-op, as for torch ops on empty tensors
    if grid[1] > 65535 or grid[2] > 65535 or grid[0] > 2**31 - 1:
        raise ValueError(f"{name}: grid {grid} exceeds CUDA's limits")

    packed = abi.pack(lk.spec, args)
    buf = (ctypes.c_char * max(len(packed.buffer), 1)).from_buffer(packed.buffer)
    base = ctypes.addressof(buf)
    ptrs = (ctypes.c_void_p * len(packed.offsets))(*[base + o for o in packed.offsets])

    cfg = drv.CUlaunchConfig()
    cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = entry["block"]
    cfg.sharedMemBytes = entry["smem_bytes"]
    cfg.hStream = drv.CUstream(torch.cuda.current_stream(device_index).cuda_stream)
    attrs = []
    if list(entry["cluster"]) != [1, 1, 1]:
        a = drv.CUlaunchAttribute()
        a.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        a.value.clusterDim.x, a.value.clusterDim.y, a.value.clusterDim.z = entry["cluster"]
        attrs.append(a)
    if pdl:
        a = drv.CUlaunchAttribute()
        a.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        a.value.programmaticStreamSerializationAllowed = 1
        attrs.append(a)
    cfg.attrs = attrs
    cfg.numAttrs = len(attrs)
    check(drv.cuLaunchKernelEx(cfg, lk.function, ctypes.addressof(ptrs), 0), f"cuLaunchKernelEx({name})")
