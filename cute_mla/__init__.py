"""cute-mla: Multi-head Latent Attention kernels (CuTe DSL, compiled ahead of time),
with FlashMLA's Python API.

The public functions are imported on first use, so ``import cute_mla.compile`` (and the wheel
build's cubin check) runs without torch.
"""
import importlib
import os

# The kernels, their layouts and schedules are cute_mla.kernels, cute_mla.layouts and
# cute_mla.schedules: inside this package once installed (pyproject's package-dir), beside it in a
# source checkout (the repository keeps them at its top level), where this makes them reachable.
_checkout = os.path.dirname(__path__[0])
if (not os.path.isdir(os.path.join(__path__[0], "layouts"))
        and os.path.isfile(os.path.join(_checkout, "layouts", "abi.py"))):
    __path__.append(_checkout)

_PUBLIC = {
    "FlashMLASchedMeta": "cute_mla.api",
    "get_mla_metadata": "cute_mla.api",
    "flash_mla_with_kvcache": "cute_mla.api",
    "flash_mla_sparse_fwd": "cute_mla.api",
    "flatten_sparse_prefill_batch": "cute_mla.api",
    "flash_attn_varlen_func": "cute_mla.api",
    "flash_attn_varlen_qkvpacked_func": "cute_mla.api",
    "flash_attn_varlen_kvpacked_func": "cute_mla.api",
    "quantize_kvcache": "cute_mla.quant",
    "dequantize_kvcache": "cute_mla.quant",
}
__all__ = list(_PUBLIC)


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'cute_mla' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
