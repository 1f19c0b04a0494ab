"""Loads the prebuilt cubins and launches them on torch's current stream (runtime code).

Runtime needs torch and cuda-python only.  Per device, each kernel variant's module is loaded
once, into the device's primary context, after its manifest entry has been checked against
this cute-mla's ABI (parameter names, sizes and alignments).

Two ways to launch:

- ``launch(name, config, grid, **args)`` binds every argument by its ABI name, checks it and
  launches: the general path (tests, probes).
- ``prepare(...)`` returns a ``Launch``: the same binding and checks done once, after which each
  ``Launch.run(stream, pointers)`` only rewrites the data pointers (and the TMA maps made from
  them) in its preallocated parameter buffer and calls ``cuLaunchKernel`` (``cuLaunchKernelEx``
  for a launch with PDL or a cluster).  The public ops keep one per call signature, which is how
  an eager call stays within SPEC section 7's host budget; a ``LaunchGroup`` runs a call's
  launches from one list of pointers, under one lock and one context check.

Nothing here synchronises the host, so launches can be captured in a CUDA graph.  A launch
makes its device's context current when the calling thread has another one or none.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from cute_mla import driver, registry, sources
from cute_mla.layouts import abi

CUBIN_DIR_ENV = "CUTE_MLA_CUBIN_DIR"
DEFAULT_CUBIN_DIR = Path(__file__).resolve().parent / "_cubins"
BUILD_HINT = ("build them with `python -m cute_mla.compile` in a source checkout (any machine, no GPU; it needs "
              "nvidia-cutlass-dsl), or install a cute-mla wheel, which carries them")
GRID_LIMITS = (2**31 - 1, 65535, 65535)
_DRV = None  # cuda.bindings.driver, set when the first Launch is made (every launch path starts there)


class CubinsNotBuilt(RuntimeError):
    pass


class UnsupportedDevice(RuntimeError):
    pass


def cubin_dir() -> Path:
    env = os.environ.get(CUBIN_DIR_ENV)
    return Path(env) if env else DEFAULT_CUBIN_DIR


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


def check_fresh(key: str, kd: registry.KernelDef, config: Mapping[str, Any], arch: str,
                entry: Mapping[str, Any]) -> None:
    """Raise CubinsNotBuilt unless manifest ``entry`` was compiled from the sources beside it: its
    fingerprint is recomputed from the modules it lists (``cute_mla.sources``; about a millisecond
    a variant, once per process)."""
    modules = tuple(entry.get("sources") or ())
    try:
        fp = sources.fingerprint(kd.source, kd.abi(config), dict(config), arch, entry.get("dsl_version"), modules)
    except (OSError, AttributeError, ImportError):  # a module it was built from is gone
        fp = None
    if not modules or fp != entry.get("fingerprint"):
        raise CubinsNotBuilt(f"{key}: the cubin is stale: the sources beside it are not the ones it was compiled "
                             f"from (fingerprint {fp} != {entry.get('fingerprint')}); {BUILD_HINT}")


class LoadedKernel:
    """One kernel variant loaded on one device: its function handle, launch shape and the layout
    of its parameters."""

    def __init__(self, key: str, entry: Mapping[str, Any], spec: tuple, function: Any, device_index: int):
        self.key = key
        self.entry = entry
        self.layout = abi.ParamLayout(spec)
        self.function = function
        self.device_index = device_index
        self.context = driver.primary_context(device_index)
        self.block = tuple(entry["block"])
        self.cluster = tuple(entry["cluster"])
        self.smem_bytes = int(entry["smem_bytes"])
        self.pdl_wait = bool(entry["pdl_wait"])
        self._max_active_clusters = None

    def cluster_attribute(self):
        """The launch attribute giving this kernel's cluster shape (``cuLaunchKernelEx``,
        ``cuOccupancyMaxActiveClusters``)."""
        drv = driver._drv()
        a = drv.CUlaunchAttribute()
        a.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        a.value.clusterDim.x, a.value.clusterDim.y, a.value.clusterDim.z = self.cluster
        return a

    def max_active_clusters(self) -> int:
        """How many of this kernel's clusters the device runs at once
        (``cuOccupancyMaxActiveClusters``, asked once): a cluster's CTAs share a GPC, so
        GPCs with an odd number of free SMs leave one idle."""
        if self._max_active_clusters is None:
            drv = driver._drv()
            cfg = drv.CUlaunchConfig()
            cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = self.cluster
            cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = self.block
            cfg.sharedMemBytes = self.smem_bytes
            cfg.attrs = [self.cluster_attribute()]
            cfg.numAttrs = 1
            with driver.DeviceContext(self.context):
                self._max_active_clusters = int(driver.check(drv.cuOccupancyMaxActiveClusters(self.function, cfg),
                                                             f"cuOccupancyMaxActiveClusters({self.key})"))
        return self._max_active_clusters


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
        if lk is None:
            with self.lock:
                if key not in self.loaded:
                    self.loaded[key] = self._load(kd, config, key)
                lk = self.loaded[key]
        return lk

    def _load(self, kd, config, key) -> LoadedKernel:
        drv = driver._drv()
        entry = self.manifest["kernels"].get(key)
        if entry is None:
            raise CubinsNotBuilt(f"kernel variant {key} is missing from {self.dir / 'manifest.json'}: {BUILD_HINT}")
        spec = kd.abi(config)
        if entry["params"] != abi.param_layout(spec):
            raise CubinsNotBuilt(f"{key}: the manifest's parameters (names, sizes, alignments) differ from this "
                                 f"cute-mla's layouts.operands; {BUILD_HINT}")
        check_fresh(key, kd, config, self.arch, entry)
        data = (self.dir / entry["cubin"]).read_bytes()
        with driver.DeviceContext(driver.primary_context(self.device_index)):
            module = driver.check(drv.cuModuleLoadData(data), f"cuModuleLoadData({entry['cubin']})")
            fn = driver.check(drv.cuModuleGetFunction(module, entry["symbol"].encode()), f"cuModuleGetFunction({key})")
            if entry["smem_bytes"] > 48 * 1024:
                attr = drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                driver.check(drv.cuFuncSetAttribute(fn, attr, entry["smem_bytes"]), f"cuFuncSetAttribute({key})")
        return LoadedKernel(key, entry, spec, fn, self.device_index)


_DEVICES: dict[int, _DeviceKernels] = {}
_DEVICES_LOCK = threading.Lock()


def device_kernels(device_index: int) -> _DeviceKernels:
    dk = _DEVICES.get(device_index)
    if dk is None:
        with _DEVICES_LOCK:
            dk = _DEVICES.get(device_index)
            if dk is None:
                dk = _DEVICES[device_index] = _DeviceKernels(device_index)
    return dk


def kernel(name: str, config: Mapping[str, Any], device_index: int) -> LoadedKernel:
    """Variant ``name``/``config`` loaded on ``device_index`` (loaded on first use)."""
    return device_kernels(device_index).get(registry.get(name), config)


class Launch:
    """One kernel launch bound to fixed shapes, strides, scalars and grid on one device.

    Made by ``prepare``, which checks every argument against the ABI.  ``run(stream, pointers)``
    then launches it again with new data pointers: ``pointers`` maps each tensor argument's name
    (but the ``static`` ones, bound for good) to the new pointer, which must point at memory of
    the same dtype, shape and strides as the tensor it replaces and share its alignment modulo
    16 (the ops' call signatures include every pointer's low four bits, so a signature hit
    guarantees it).

    A plan's launches take their pointers as one list instead (``LaunchGroup``): ``bind_slots``
    says which entry of it feeds which argument, so a call rewrites its parameter buffer with
    indexed reads, not name lookups.  Thread-safe: the buffer is rewritten and launched under
    ``lock`` (a group's launches share one), and the driver copies the parameters at launch.
    """

    def __init__(self, kernel: LoadedKernel, grid: Sequence[int], pdl: bool, args: Mapping[str, Any],
                 static: Sequence[str] = ()):
        self.kernel = kernel
        self.grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        if any(g > lim for g, lim in zip(self.grid, GRID_LIMITS)):
            raise ValueError(f"{kernel.key}: grid {self.grid} exceeds CUDA's limits {GRID_LIMITS}")
        self.empty = min(self.grid) <= 0  # an empty grid is a no-op, as for torch ops on empty tensors
        if pdl and not kernel.pdl_wait:
            raise RuntimeError(f"{kernel.key}: launched with PDL but the kernel never waits on its predecessor")
        self.pdl = pdl
        layout = kernel.layout
        buf = layout.pack(args)
        tma_names = {a.name for a in layout.args if isinstance(a, abi.TmaArg)}
        unknown = set(static) - set(layout.pointer_words) - tma_names
        if unknown:
            raise abi.AbiError(f"{kernel.key}: static arguments {sorted(unknown)} are not tensor arguments")
        # name -> (word, None) for a plain pointer, (offset, (maps, spec, shape, stride)) for a TMA map
        self._targets: dict[str, tuple] = {n: (w, None) for n, w in layout.pointer_words.items() if n not in static}
        for spec in layout.args:
            if isinstance(spec, abi.TmaArg):
                t = args[spec.name]
                shape, stride = tuple(t.shape), tuple(t.stride())
                maps = driver.tensor_maps(spec, kernel.device_index, shape, stride)
                off = layout.tma_offsets[spec.name]
                buf[off:off + 128] = driver.tensor_map(maps, spec, t.data_ptr(), shape, stride)
                if spec.name not in static:
                    self._targets[spec.name] = (off, (maps, spec, shape, stride))
        self._buffer = buf
        self._words = memoryview(buf).cast("Q")
        c_buf = (ctypes.c_char * len(buf)).from_buffer(buf)
        self._params = (ctypes.c_void_p * len(layout.offsets))(*[ctypes.addressof(c_buf) + o for o in layout.offsets])
        self._params_addr = ctypes.addressof(self._params)
        self.bind_slots(tuple(self._targets))
        self._configs: dict[int, Any] = {}
        self.lock = threading.Lock()
        self.context_handle = int(kernel.context)
        global _DRV
        drv = _DRV = driver._drv()
        # Without launch attributes the plain cuLaunchKernel takes the stream as an int and
        # costs 5.3 us against cuLaunchKernelEx's 6.2 (H200 host, 2026-12-04)
        if not pdl and kernel.cluster == (1, 1, 1):
            self._launch_plain = functools.partial(drv.cuLaunchKernel, kernel.function, *self.grid, *kernel.block,
                                                   kernel.smem_bytes)
        else:
            self._launch_plain = None
            self._launch_ex = drv.cuLaunchKernelEx

    def bind_slots(self, names: Sequence[str]) -> None:
        """From now on ``run_current`` takes its pointers as a sequence in the order of ``names``
        (which must name every non-static tensor argument; other entries are ignored)."""
        missing = [n for n in self._targets if n not in names]
        if missing:
            raise abi.AbiError(f"{self.kernel.key}: no pointer slot for the tensor arguments {missing}")
        self.slot_names = tuple(names)
        self._slots = tuple((w, names.index(n)) for n, (w, tma) in self._targets.items() if tma is None)
        self._tma_slots = tuple((off, names.index(n), tma) for n, (off, tma) in self._targets.items()
                                if tma is not None)

    def _config(self, stream: int):
        cfg = self._configs.get(stream)
        if cfg is None:
            drv = driver._drv()
            cfg = drv.CUlaunchConfig()
            cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = self.grid
            cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = self.kernel.block
            cfg.sharedMemBytes = self.kernel.smem_bytes
            cfg.hStream = drv.CUstream(stream)
            attrs = []
            if self.kernel.cluster != (1, 1, 1):
                attrs.append(self.kernel.cluster_attribute())
            if self.pdl:
                a = drv.CUlaunchAttribute()
                a.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
                a.value.programmaticStreamSerializationAllowed = 1
                attrs.append(a)
            cfg.attrs = attrs
            cfg.numAttrs = len(attrs)
            if len(self._configs) >= 64:  # streams come and go; keep the table small
                self._configs.clear()
            self._configs[stream] = cfg
        return cfg

    def run(self, stream: int, pointers: Mapping[str, int] | None = None) -> None:
        """Launch on ``stream`` (a raw CUstream handle), first re-pointing the tensor arguments
        (``pointers``: slot name -> pointer, every slot of ``slot_names``), in the kernel's
        device context."""
        ptrs = None if pointers is None else [pointers[n] for n in self.slot_names]
        with self.lock:
            _in_context(self.kernel.context, (self,), stream, ptrs)

    def run_current(self, stream: int, ptrs: Sequence[int] | None = None) -> None:
        """Launch with ``lock`` held and the kernel's context current, first writing ``ptrs``
        (in ``slot_names`` order) into the parameter buffer."""
        if self.empty:
            return
        if ptrs is not None:
            words = self._words
            for w, i in self._slots:
                words[w] = ptrs[i]
            for off, i, (maps, spec, shape, stride) in self._tma_slots:
                ptr = ptrs[i]
                m = maps.get(ptr)
                self._buffer[off:off + 128] = m if m is not None else driver.tensor_map(
                    maps, spec, ptr, shape, stride)
        if self._launch_plain is not None:
            result = self._launch_plain(stream, self._params_addr, 0)
        else:
            result = self._launch_ex(self._configs.get(stream) or self._config(stream), self.kernel.function,
                                     self._params_addr, 0)
        if result[0]:
            driver.check(result, f"launching {self.kernel.key}")


class LaunchGroup:
    """The launches a call runs in order on one stream, all of one device: bound to one list of
    pointer slots (``names``; ``Launch.bind_slots``), sharing one lock, with one context check
    a run (``driver.is_current``; the context is pushed only when the calling thread has another
    one or none)."""

    def __init__(self, launches: Sequence[Launch], names: Sequence[str]):
        self.launches = tuple(launches)
        self.context_handle = self.launches[0].context_handle
        self.context = self.launches[0].kernel.context
        if any(launch.context_handle != self.context_handle for launch in self.launches):
            raise ValueError("a LaunchGroup's launches must all be on one device")
        self.lock = threading.Lock()
        for launch in self.launches:
            launch.bind_slots(names)
            launch.lock = self.lock

    def run(self, stream: int, ptrs: Sequence[int]) -> None:
        """``run_current`` of each launch in order on ``stream``, fed from ``ptrs``."""
        with self.lock:
            err, current = _DRV.cuCtxGetCurrent()  # driver.is_current, inlined: every call runs this
            if err or current is None or int(current) != self.context_handle:
                return _in_context(self.context, self.launches, stream, ptrs)
            for launch in self.launches:
                launch.run_current(stream, ptrs)


def _in_context(context, launches: Sequence[Launch], stream: int, ptrs) -> None:
    """``run_current`` of each of ``launches`` with their ``context`` current (pushed for them
    when the calling thread has another one or none)."""
    with driver.DeviceContext(context):
        for launch in launches:
            launch.run_current(stream, ptrs)


def prepare(name: str, config: Mapping[str, Any], grid: Sequence[int], *, device_index: int,
            pdl: bool = False, static: Sequence[str] = (), **args) -> Launch:
    """Bind ``args`` (every ABI argument of ``name``, by name) to a launch of variant
    ``name``/``config`` over ``grid`` on ``device_index``, checking each against the ABI.
    The tensors named in ``static`` stay bound for good (``Launch.run`` takes no pointer for
    them): stand-ins that live as long as the process.

    ``pdl=True`` lets the kernel start before its predecessor on the stream has finished
    (programmatic dependent launch); the kernel must then call ``griddepcontrol.wait`` before
    it reads the predecessor's output.
    """
    return Launch(kernel(name, config, device_index), grid, pdl, args, static)


def launch(name: str, config: Mapping[str, Any], grid: Sequence[int], *, device_index: int | None = None,
           pdl: bool = False, **args) -> None:
    """Launch variant ``name``/``config`` over ``grid`` with ``args`` bound by ABI name, on
    torch's current stream of ``device_index`` (default: torch's current device)."""
    if device_index is None:
        import torch

        device_index = torch.cuda.current_device()
    prepare(name, config, grid, device_index=device_index, pdl=pdl, **args).run(driver.current_stream(device_index))
