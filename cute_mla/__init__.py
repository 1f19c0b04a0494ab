"""cute-mla: Multi-head Latent Attention kernels (CuTe DSL, compiled ahead of time),
with FlashMLA's Python API."""
from cute_mla.api import (
    FlashMLASchedMeta,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_mla_sparse_fwd,
    flash_mla_with_kvcache,
    flatten_sparse_prefill_batch,
    get_mla_metadata,
)
from cute_mla.quant import dequantize_kvcache, quantize_kvcache

__all__ = [
    "FlashMLASchedMeta",
    "get_mla_metadata",
    "flash_mla_with_kvcache",
    "flash_mla_sparse_fwd",
    "flatten_sparse_prefill_batch",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "quantize_kvcache",
    "dequantize_kvcache",
]
