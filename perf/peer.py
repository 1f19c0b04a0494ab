"""FlashMLA as a peer to measure against, through its compiled ops (never built or committed here).

``load(path=None)`` finds the ops in this order: an installed ``flash_mla`` package, vLLM's
``vllm._flashmla_C``, or a ``_flashmla_C*.so`` given by ``path`` / ``$CUTE_MLA_PEER`` / the ignored
``.peers/`` folder (``torch.ops.load_library``).  ../shared/PEERS.md says how to get the library onto a
GPU machine.  The ops are ``dense_decode_fwd``, ``sparse_decode_fwd`` and ``sparse_prefill_fwd``, with
the argument order of FlashMLA's ``flash_mla_interface.py``.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PEER_ENV = "CUTE_MLA_PEER"


def load(path: str | None = None):
    """FlashMLA's op namespace (``torch.ops._flashmla_C``), or raise RuntimeError saying what was tried."""
    import importlib

    import torch

    tried = []
    for mod in ("flash_mla.cuda", "flash_mla._flashmla_C", "vllm._flashmla_C"):
        try:
            importlib.import_module(mod)
            return torch.ops._flashmla_C
        except Exception as e:  # not installed, or built for another torch
            tried.append(f"{mod}: {type(e).__name__}")
    candidates = [path, os.environ.get(PEER_ENV)]
    candidates += sorted(str(p) for p in (REPO_ROOT / ".peers").glob("_flashmla_C*.so"))
    for c in (c for c in candidates if c):
        try:
            torch.ops.load_library(c)
            return torch.ops._flashmla_C
        except Exception as e:
            tried.append(f"{c}: {type(e).__name__}: {e}")
    raise RuntimeError("FlashMLA not found; tried " + "; ".join(tried))


def host_call(entry: str, x: dict, fresh_meta: bool = False):
    """A zero-argument FlashMLA call of ``entry`` on the inputs ``perf.host_overhead`` built."""
    ops = load()
    d_v = 512
    if entry == "sparse_prefill":
        return lambda: ops.sparse_prefill_fwd(x["q"], x["kv"], x["indices"], x["sm_scale"], d_v, None, None, None)
    state = [None, None]

    def call():
        meta, splits = (None, None) if fresh_meta else state
        if entry == "dense_decode":
            r = ops.dense_decode_fwd(x["q"], x["k_cache"], d_v, x["cache_seqlens"], x["block_table"],
                                     x["q"].shape[-1] ** -0.5, True, meta, splits, None)
        else:
            r = ops.sparse_decode_fwd(x["q"], x["k_cache"], x["indices"], None, x["attn_sink"], meta, splits,
                                      x["extra_k_cache"], x["extra_indices"], None, d_v, x["q"].shape[-1] ** -0.5,
                                      None)
        state[0], state[1] = r[2], r[3]
        return r

    return call
