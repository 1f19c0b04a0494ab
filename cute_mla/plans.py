"""Prepared calls: everything a public call needs that depends only on its signature, worked out once.

A call's *signature* is, for every tensor argument, (dtype, shape, strides, device, data pointer
modulo 16), plus its scalar arguments: everything the input checks and the kernels' parameter
layouts depend on.  The first call with a new signature is checked in full (``cute_mla.api``)
and gets a plan: its kernel variants, grids, output shapes and ``launcher.Launch`` objects bound
by name.  Every later call with that signature only allocates its outputs, collects data pointers
into one list (the plan's pointer slots: the call's tensors in ``DECODE_ARGS`` / ``PREFILL_ARGS``
order, then the plan's ``SLOTS``) and launches.  Measured on the H200 hosts (2026-12-04): a
launch costs 4.5-6.5 us, an output 2.0 us (``output_proto``) and the call's signature about
0.7 us a tensor, so a sparse decode call (one launch, two outputs, six tensors) has about 13 us
of unavoidable work; the plan keeps everything else out of the call.  A call is one launch once
its scheduling metadata is bound (dense decode merges its own splits), but a sparse decode with
length tensors, which adds the combine.

Plans hold no tensor of a caller's, and each call's outputs are fresh from torch's allocator on the
current stream, so one plan serves any number of streams, threads and CUDA graphs at once.  The
split-KV workspace is shared by the layers of one decode step through their ``FlashMLASchedMeta``
(``SplitKvPlan.fresh_workspace`` says when).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Optional

import torch

from cute_mla import driver, launcher, registry
from cute_mla.ops import DTYPE_NAMES, combine_variant
from cute_mla.sched_meta import FlashMLASchedMeta, KeptWorkspace, require_sched_meta
from cute_mla.layouts.constants import (BLOCK_M, BLOCK_N, D_V, DENSE_DECODE_MAX_COLUMNS, DENSE_DECODE_SMALL_HEADS,
                                        DENSE_DECODE_TOKENS, PAGE_BLOCK_SIZE,
                                        SCHED_META_FIELDS, SPARSE_DECODE_SMALL_HEADS, SPLIT_COUNTS)
from cute_mla.schedules import decode_plan, grids


# The public entry points' tensor arguments in call order, under the kernels' ABI names: the first
# pointer slots of a plan's launches (``launcher.LaunchGroup``).  A caller's ``out`` is its own
# slot; the plan's output slots follow (``SplitKvPlan.SLOTS``, ``SparsePrefillPlan.SLOTS``).
DECODE_ARGS = ("q", "k_cache", "block_table", "cache_seqlens", "indices", "attn_sink", "extra_k_cache",
               "extra_indices", "topk_length", "extra_topk_length", "out_arg")
PREFILL_ARGS = ("q", "kv", "indices", "attn_sink", "topk_length", "out_arg")


def signature(tensors: tuple) -> tuple[tuple, list]:
    """(key, pointers) of a call's ``tensors``: the key holds (dtype, shape, strides, device, data
    pointer modulo 16) of each present tensor and None for an absent one; pointers holds each
    one's data pointer (None when absent), in order.  Raises AttributeError for a non-tensor.
    (Appending per-tensor tuples through bound ``append`` methods was the fastest loop tried,
    23% faster than extending one flat list: session 12.)"""
    key = []
    pointers = []
    add_key, add_pointer = key.append, pointers.append
    for t in tensors:
        if t is None:
            add_key(None)
            add_pointer(None)
        else:
            p = t.data_ptr()
            add_pointer(p)
            add_key((t.dtype, t.shape, t.stride(), t.get_device(), p & 15))
    return tuple(key), pointers


class PlanCache:
    """A bounded signature -> plan table shared by all threads (a full table is dropped: engines
    use a handful of signatures per layer shape, so it only fills under churn)."""

    def __init__(self, limit: int = 1024):
        self.limit = limit
        self._plans: dict = {}

    def lookup(self, tensors: tuple, scalars: tuple):
        """(key, plan or None, pointers) of a call: its ``signature`` of ``tensors`` with its
        hashable ``scalars``.  The key is None, and so are the plan and pointers, when an argument
        is not a tensor or a scalar cannot be hashed: the caller's checks then name the argument."""
        try:
            key, pointers = signature(tensors)
            key = (key, scalars)
            return key, self._plans.get(key), pointers
        except (AttributeError, TypeError):
            return None, None, None

    def keep(self, key, plan, tensors: tuple, pointers) -> list:
        """Store a new ``plan`` under ``key`` (from ``lookup``; not when it is None) and return
        the call's pointers."""
        if key is None:
            return signature(tensors)[1]
        if len(self._plans) >= self.limit:
            self._plans.clear()
        self._plans[key] = plan
        return pointers


# whether torch's current stream is capturing a CUDA graph (the private accessor skips the public
# wrapper's Python frame; both read the same state)
_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", torch.cuda.is_current_stream_capturing)
_raw_stream = driver._raw_stream_getter()  # device index -> torch's current raw CUstream (driver.current_stream)
_empty_like = torch.empty_like


def output_proto(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A one-element tensor expanded to ``shape``: ``torch.empty_like`` of it is a fresh contiguous
    tensor of that shape, dtype and device (an expanded tensor overlaps itself, so its strides are
    not kept), made in 2.03 us against 2.48 for ``torch.empty(*shape, dtype=, device=)``, which
    parses three arguments (H200 host, session 13).  It holds one element, not an output's worth."""
    return torch.empty(1, dtype=dtype, device=device).expand(shape)

_DUMMIES: dict[int, dict[str, torch.Tensor]] = {}
_DUMMIES_LOCK = threading.Lock()


def dummies(device_index: int) -> dict[str, torch.Tensor]:
    """Per-device stand-ins for absent optional arguments (kernels never read them: each comes
    with a has_* flag of 0), kept for the life of the process; uninitialised, so making them
    enqueues nothing."""
    d = _DUMMIES.get(device_index)
    if d is None:
        with _DUMMIES_LOCK:
            d = _DUMMIES.get(device_index)
            if d is None:
                dev = torch.device("cuda", device_index)
                d = _DUMMIES[device_index] = {
                    "i32": torch.empty(1, dtype=torch.int32, device=dev),
                    "f32": torch.empty(1, dtype=torch.float32, device=dev),
                    "fp8_cache": torch.empty(1, 16, dtype=torch.uint8, device=dev),
                    "indices": torch.empty(1, 1, 1, dtype=torch.int32, device=dev),
                }
    return d


_CONSTANTS: dict[tuple[int, int, int], torch.Tensor] = {}


def constant_lengths(device_index: int, b: int, value: int) -> torch.Tensor:
    """A read-only int32 [b] tensor of ``value``, kept for the life of the process (a CUDA graph
    may hold its address, so it must outlive any plan)."""
    key = (device_index, b, value)
    t = _CONSTANTS.get(key)
    if t is None:
        with _DUMMIES_LOCK:
            t = _CONSTANTS.get(key)
            if t is None:
                t = _CONSTANTS[key] = torch.full((b,), value, dtype=torch.int32,
                                                 device=torch.device("cuda", device_index))
    return t


def fp8_cache_bytes(cache: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, page_block_size, 1, bytes_per_token]`` FP8 cache (any 1-byte dtype) ->
    the (num_blocks, block_bytes) uint8 view the sparse decode kernels take (same memory, same
    data pointer; rows keep the cache's block stride)."""
    u8 = cache.view(torch.uint8)
    return u8.as_strided((u8.shape[0], u8.shape[1] * u8.shape[3]), (u8.stride(0), 1))


def lengths_stamp(t: Optional[torch.Tensor]) -> Optional[tuple[int, Optional[int]]]:
    """What a schedule remembers of a length tensor it was planned from: (data pointer, version
    counter).  The counter counts torch's in-place writes to the tensor and every view of its
    memory, so new values written through torch change the stamp; writes torch cannot see (a
    foreign kernel, a CUDA-graph replay) and tensors made in inference mode, which keep no
    counter (None), are not caught."""
    if t is None:
        return None
    try:
        return t.data_ptr(), t._version
    except RuntimeError:  # an inference tensor
        return t.data_ptr(), None


def default_parts(q: torch.Tensor, h_kv: int, token_rows: Optional[int] = None) -> int:
    """``decode_plan.num_sm_parts`` on q's device: token_rows rows per query token and kv head
    (default h_q / h_kv)."""
    _, s_q, h_q, _ = q.shape
    num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return decode_plan.num_sm_parts(num_sms, s_q, h_kv * (token_rows or h_q // h_kv), h_kv)


class SplitKvPlan:
    """What dense and sparse decode share: the scheduler launch that binds a ``FlashMLASchedMeta``,
    the workspace (o_accum, lse_accum, then any int32 counters, in one 4-byte buffer) and the
    combine, which a plan whose requests are never split, or whose kernel merges its own splits
    (dense decode), leaves out (``launches``).  A call's pointers are the ``DECODE_ARGS`` then
    ``SLOTS`` (the counters' slot points past the partials even when a plan has none)."""

    SLOTS = ("sched_meta", "split_offsets", "out", "lse", "o_accum", "lse_accum", "split_counters")
    no_lengths = False  # whether the plan's signature has no length tensor (``SparseDecodePlan``)

    def __init__(self, q: torch.Tensor, config: FlashMLASchedMeta.Config, h_kv: int, fixed_overhead: int,
                 max_len: int, token_rows: Optional[int] = None, parts: Optional[int] = None,
                 splits: bool = True, counters: int = 0, light_overhead: Optional[int] = None):
        """``token_rows``: the kernel's query rows per query token and kv head (default
        h_q / h_kv; sparse decode rounds h_q up to a whole row block); ``parts``: the
        persistent CTAs per row block (default ``decode_plan.num_sm_parts``); ``splits``:
        whether the schedule may split a request (when it never does, no kernel writes a
        partial: the launches are bound to a one-row workspace for its shape, and every call
        passes a stand-in, ``idle_workspace``); ``counters``: int32 counters after the partials
        (``layouts.operands.split_counters``), zero in a new workspace; every launch leaves them
        zero; ``light_overhead``: the scheduler's fixed cost a piece in a light plan
        (``decode_plan.piece_overhead``; default ``fixed_overhead``)."""
        b, s_q, h_q, _ = q.shape
        self.device_index = q.get_device()
        self.device = q.device
        self.config = config
        self.dtype = q.dtype
        self.out_shape = (b, s_q, h_q, D_V)
        self.lse_shape = (b, h_q, s_q)
        self.out_proto = output_proto(self.out_shape, self.dtype, self.device)
        self.lse_proto = output_proto(self.lse_shape, torch.float32, self.device)
        self.parts = parts or default_parts(q, h_kv, token_rows)
        self.splits = splits
        if not splits:  # workspace slots of a plan that never splits: a stand-in nothing reads
            self.idle_workspace = (dummies(self.device_index)["f32"].data_ptr(),) * 3
        self.sched_shapes = ((self.parts, SCHED_META_FIELDS), (b + 1,))
        # at most one extra split per part on top of one per request
        self.n_partial = n_partial = b + self.parts if splits else 1
        rows = n_partial * s_q * h_q
        self.counters_start = rows * (D_V + 1)  # elements
        self.workspace_numel = self.counters_start + counters
        self.lse_accum_offset = rows * D_V * 4  # bytes
        self.counters_offset = self.counters_start * 4  # bytes
        self.fixed_overhead = fixed_overhead
        self.light_overhead = fixed_overhead if light_overhead is None else light_overhead
        # the most KV tokens one request can have: the scheduler clamps each length to it
        self.max_len = max_len
        decode_plan.check_plan_fits(b, max_len, self.parts, BLOCK_N, fixed_overhead)

    def templates(self, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fresh buffers of every shape the split-KV launches take, to bind them by name (a plan
        keeps none of them: only their shapes, strides and alignment matter).  Also binds the
        scheduler launch to ``lengths``."""
        n_partial, (_, s_q, h_q, _) = self.n_partial, self.out_shape
        ws = self.workspace()
        rows = n_partial * s_q * h_q
        sched, offsets = self.schedule_buffers()
        t = {"o_accum": ws[:rows * D_V].view(n_partial, s_q, h_q, D_V),
             "lse_accum": ws[rows * D_V:self.counters_start].view(n_partial, s_q, h_q), "sched_meta": sched,
             "split_offsets": offsets}
        if self.workspace_numel > self.counters_start:
            t["split_counters"] = ws[self.counters_start:].view(torch.int32)
        self.scheduler = launcher.prepare(
            "decode_scheduler", {}, grids.SCHEDULER, device_index=self.device_index, cache_seqlens=lengths,
            sched_meta=t["sched_meta"], split_offsets=t["split_offsets"], block_n=BLOCK_N,
            fixed_overhead=self.fixed_overhead, light_overhead=self.light_overhead, max_len=self.max_len)
        return t

    def workspace(self) -> torch.Tensor:
        return torch.empty(self.workspace_numel, dtype=torch.float32, device=self.device)

    def schedule_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh (sched_meta [parts, 8], split_offsets [b + 1]) int32 buffers."""
        return tuple(torch.empty(s, dtype=torch.int32, device=self.device) for s in self.sched_shapes)

    def outputs(self, out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """out [b, s_q, h_q, 512] in q's dtype (the caller's ``out``, checked by the API, or a
        fresh one) and a fresh lse [b, h_q, s_q] float32."""
        return _empty_like(self.out_proto) if out is None else out, _empty_like(self.lse_proto)

    def fresh_workspace(self, meta: FlashMLASchedMeta, stream: int) -> KeptWorkspace:
        """A new partials buffer for a call that cannot use the one ``meta`` holds, kept in
        ``meta`` for the next layer.  A call uses the kept one when it was made on its stream and
        has its size (the layers of a step run in stream order, so one layer's merge has read it,
        and its counters are back to zero, before the next layer's split kernel writes it) and no
        CUDA graph is being captured: under capture every call gets a fresh one from the graph's
        pool, never kept, because a buffer made outside the capture must not be baked into the
        graph (it could be freed while the graph lives).  The caller holds the result until its
        launches are enqueued.  Its counters are zeroed (enqueued on the stream; under capture,
        part of the graph: a memset node, where ``zero_()`` was a fill kernel, 0.75 us plus a
        0.6 us gap in every replay, H100, session 31; dense b 5 s_q 3 graph-timed 29.7 -> 29.4 us,
        1.018x over 3 rounds, H100, session 32)."""
        ws = self.workspace()
        if self.workspace_numel > self.counters_start:
            driver.memset_d32(ws.data_ptr() + self.counters_offset, 0, self.workspace_numel - self.counters_start,
                              stream, self.device_index)
        fresh = KeptWorkspace(ws, stream, self.workspace_numel, ws.data_ptr())
        if not _capturing():
            meta.workspace = fresh
        return fresh

    def prepare_combine(self, out: torch.Tensor, lse: torch.Tensor, attn_sink: Optional[torch.Tensor],
                        templates: dict[str, torch.Tensor]):
        b, s_q, h_q, _ = self.out_shape
        has_sink = attn_sink is not None
        self.combine = launcher.prepare(
            "combine", *combine_variant(self.dtype, b, s_q, h_q), device_index=self.device_index, pdl=True,
            static=() if has_sink else ("attn_sink",), out=out, lse=lse,
            attn_sink=attn_sink if has_sink else dummies(self.device_index)["f32"],
            skip_single_split=1, has_sink=int(has_sink), o_accum=templates["o_accum"],
            lse_accum=templates["lse_accum"], split_offsets=templates["split_offsets"])
        self.bind_launches(self.main, self.combine)

    def bind_launches(self, *launches: launcher.Launch) -> None:
        """The launches of every call, in order, fed from its pointer list."""
        self.launches = launcher.LaunchGroup(launches, DECODE_ARGS + self.SLOTS)

    def bind(self, meta: FlashMLASchedMeta, stream: int, length_tensors: tuple, stamp: tuple) -> None:
        """Make ``meta`` this plan's schedule: check it, or compute it from the lengths
        ``plan_lengths(*length_tensors)`` gives when it is still empty.  It stays unbound if
        anything fails."""
        require_sched_meta(meta)
        if meta.have_initialized:
            meta.check_config(self.config)
            meta.check_lengths(stamp)
            return
        lens = self.plan_lengths(*length_tensors)
        sched, offsets = self.schedule_buffers()
        self.scheduler.run(stream, {"cache_seqlens": lens.data_ptr(), "sched_meta": sched.data_ptr(),
                                    "split_offsets": offsets.data_ptr()})
        meta.tile_scheduler_metadata, meta.num_splits = sched, offsets
        meta.schedule_pointers = (sched.data_ptr(), offsets.data_ptr())
        meta.config = self.config
        meta.lengths_stamp = stamp
        meta.have_initialized = True

    def __call__(self, meta: FlashMLASchedMeta, pointers: list, tensors: tuple,
                 out: Optional[torch.Tensor] = None):
        """One call: bind ``meta`` if needed (from the call's length arguments, the ``LENGTHS``
        of its ``tensors``), allocate lse / workspace (and out unless given), run the split kernel
        (``self.main``, bound by the subclass) then the combine.  ``pointers``: the call's
        ``DECODE_ARGS`` pointers (a list, extended here).

        Every call of a signature after the first runs only this; its steps are written out
        rather than split into helpers, because on the H200 hosts a Python call costs 0.1-0.5 us
        (session 12: an inlined prototype of the dense call ran 3.3-5.5 us faster than the same steps
        behind helpers, on hosts where FlashMLA's call takes 37-60 us)."""
        stream = _raw_stream(self.device_index)
        length_tensors = tensors[self.LENGTHS]
        # a plan without length tensors (its signature says which are absent) has a constant stamp
        stamp = self.NO_LENGTHS if self.no_lengths else tuple(map(lengths_stamp, length_tensors))
        if meta.config is not self.config:
            self.bind(meta, stream, length_tensors, stamp)
        elif meta.lengths_stamp != stamp:
            meta.check_lengths(stamp)
        if out is None:
            out = _empty_like(self.out_proto)
        lse = _empty_like(self.lse_proto)
        if self.splits:
            ws = meta.workspace
            if ws is None or ws.stream != stream or ws.numel != self.workspace_numel or _capturing():
                ws = self.fresh_workspace(meta, stream)
            pointers += (*meta.schedule_pointers, out.data_ptr(), lse.data_ptr(), ws.ptr,
                         ws.ptr + self.lse_accum_offset, ws.ptr + self.counters_offset)  # SLOTS
        else:  # no request is ever split, so no kernel touches a workspace
            pointers += (*meta.schedule_pointers, out.data_ptr(), lse.data_ptr(), *self.idle_workspace)
        self.launches.run(stream, pointers)
        return out, lse


DENSE_CLUSTER_ROWS_ENV = "CUTE_MLA_DENSE_CLUSTER_ROWS"
# The cap without the variable: on an H200 clusters of 4 ran 0.90-0.98x of clusters of 2 (only 30
# fit), 2 against none 1.04x (perf/results/NOTES.md, session 18).
DENSE_CLUSTER_ROWS_DEFAULT = 2


def dense_cluster_rows(row_blocks: int) -> int:
    """Dense decode's ``cluster_rows`` for a kv head of ``row_blocks`` row blocks: the largest
    n of ``registry.DENSE_CLUSTER_ROWS`` up to the cap that divides them (row blocks
    nk .. nk + n - 1 of a part run as one cluster and share each page by TMA multicast).  The
    cap is DENSE_CLUSTER_ROWS_DEFAULT, or CUTE_MLA_DENSE_CLUSTER_ROWS (1 keeps clusters off),
    read when a plan is made, to time the variants against each other."""
    env = os.environ.get(DENSE_CLUSTER_ROWS_ENV)
    built = registry.DENSE_CLUSTER_ROWS
    cap = int(env) if env in {str(n) for n in built} else DENSE_CLUSTER_ROWS_DEFAULT
    return max(n for n in built if n <= cap and row_blocks % n == 0)


class DenseSplitKvPlan(SplitKvPlan):
    """What the dense decode plans share: their schedule is that of ``cache_seqlens``."""

    LENGTHS = slice(3, 4)  # the length arguments among ``DECODE_ARGS``: cache_seqlens

    def plan_lengths(self, cache_seqlens: torch.Tensor) -> torch.Tensor:
        """The scheduler plans ``cache_seqlens`` as given (it clamps them as the kernel does)."""
        return cache_seqlens

    def prepare_dense(self, name: str, variant: dict, h_kv: int, rows: int, q, k_cache, block_table, cache_seqlens,
                      softmax_scale: float, causal: bool, **kernel_args):
        """Bind ``self.main``, dense split kernel ``name`` over ``rows`` rows under each of
        ``h_kv`` kv heads, with the arguments every dense kernel takes (causal only matters at
        s_q > 1) and its own ``kernel_args``.  Returns (templates, out, lse)."""
        templates = self.templates(cache_seqlens)
        out, lse = self.outputs()
        self.main = launcher.prepare(
            name, variant, grids.split_kv(self.parts, h_kv, rows), device_index=self.device_index,
            q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens, out=out, lse=lse,
            softmax_scale=float(softmax_scale), causal=int(bool(causal) and q.shape[1] > 1), **kernel_args,
            **templates)
        return templates, out, lse


class DenseDecodePlan(DenseSplitKvPlan):
    """SM90 dense decode over the schedule of ``cache_seqlens``: one launch, whose CTAs merge
    the split requests themselves (``kernels.sm90.split_tickets``), so a call is one launch
    once its metadata is bound."""

    def __init__(self, q, k_cache, block_table, cache_seqlens, softmax_scale: float, causal: bool,
                 config: FlashMLASchedMeta.Config):
        h_kv = k_cache.shape[2]
        b, s_q, h_q, _ = q.shape
        rows = s_q * (h_q // h_kv)  # under one kv head
        row_blocks = grids.row_blocks(rows)
        variant = {"dtype": DTYPE_NAMES[q.dtype], "cluster_rows": dense_cluster_rows(row_blocks)}
        parts = default_parts(q, h_kv)
        if variant["cluster_rows"] > 1:  # no more parts than clusters fit at once (a second wave doubles the time)
            clusters = launcher.kernel("dense_decode_sm90", variant, q.get_device()).max_active_clusters()
            if clusters == 0:  # the device cannot place one at all: run without clusters
                variant["cluster_rows"] = 1
            else:
                parts = min(parts, max(clusters * variant["cluster_rows"] // (h_kv * row_blocks), 1))
        super().__init__(q, config, h_kv, dense_fixed_overhead(), block_table.shape[1] * PAGE_BLOCK_SIZE,
                         parts=parts, counters=SPLIT_COUNTS + b * h_kv * row_blocks,
                         light_overhead=dense_fixed_overhead(light=True))
        self.prepare_dense("dense_decode_sm90", variant, h_kv, rows, q, k_cache, block_table, cache_seqlens,
                           softmax_scale, causal, heads_per_kv=h_q // h_kv)
        self.bind_launches(self.main)


DENSE_FIXED_OVERHEAD_ENV = "CUTE_MLA_DENSE_FIXED_OVERHEAD"


def dense_fixed_overhead(light: bool = False) -> int:
    """The fixed cost of a piece, in blocks, that dense decode plans with
    (``decode_plan.FIXED_OVERHEAD_BLOCKS``; with ``light``, in a light plan of the 64-row kernel:
    ``decode_plan.DENSE_LIGHT_FIXED_OVERHEAD_BLOCKS``), or CUTE_MLA_DENSE_FIXED_OVERHEAD (an
    integer 0-64, read when a plan is made, then for every plan), to time other values against it."""
    env = os.environ.get(DENSE_FIXED_OVERHEAD_ENV, "")
    if env.isdigit() and int(env) <= 64:
        return int(env)
    return decode_plan.DENSE_LIGHT_FIXED_OVERHEAD_BLOCKS if light else decode_plan.FIXED_OVERHEAD_BLOCKS


DENSE_HEADS_ENV = "CUTE_MLA_DENSE_HEADS"


def dense_heads(h_kv: int, h_q: int, s_q: int) -> bool:
    """Whether a dense decode plan runs the small-head kernel (``DenseDecodeHeadsPlan``): h_kv 1,
    h_q one of ``DENSE_DECODE_SMALL_HEADS``, and a CTA can take all s_q query tokens
    (``dense_heads_tokens``), so that each page streams once for all of them, as the 64-row
    kernel streams it once for all its rows.  CUTE_MLA_DENSE_HEADS (read when a plan is made)
    overrides, to time the two kernels against each other: 0 never, 1 at any s_q (a CTA then
    takes one token where it cannot take all)."""
    env = os.environ.get(DENSE_HEADS_ENV)
    if env == "0" or h_kv != 1 or h_q not in DENSE_DECODE_SMALL_HEADS:
        return False
    return dense_heads_tokens(h_q, s_q) == s_q or env == "1"


def dense_heads_tokens(h_q: int, s_q: int) -> int:
    """The query tokens a CTA of the small-head dense kernel takes: all s_q where it is built for
    that many (``DENSE_DECODE_TOKENS``, at most ``DENSE_DECODE_MAX_COLUMNS`` columns of tokens x
    heads), else one."""
    if s_q in DENSE_DECODE_TOKENS and s_q * h_q <= DENSE_DECODE_MAX_COLUMNS:
        return s_q
    return 1


class DenseDecodeHeadsPlan(DenseSplitKvPlan):
    """SM90 dense decode of h_kv 1 and h_q 8 / 16 / 32 on the small-head kernel
    (``kernels.sm90.dense_decode_heads``): split kernel + combine over the schedule of
    ``cache_seqlens``, a row block a group of ``dense_heads_tokens`` query tokens."""

    def __init__(self, q, k_cache, block_table, cache_seqlens, softmax_scale: float, causal: bool,
                 config: FlashMLASchedMeta.Config):
        _, s_q, h_q, _ = q.shape
        tokens = dense_heads_tokens(h_q, s_q)
        token_rows = BLOCK_M // tokens  # so that a group of tokens is one row block of the plan
        super().__init__(q, config, 1, dense_fixed_overhead(), block_table.shape[1] * PAGE_BLOCK_SIZE,
                         token_rows=token_rows)
        templates, out, lse = self.prepare_dense(
            "dense_decode_heads_sm90", {"dtype": DTYPE_NAMES[q.dtype], "heads": h_q, "tokens": tokens}, 1,
            s_q * token_rows, q, k_cache, block_table, cache_seqlens, softmax_scale, causal)
        self.prepare_combine(out, lse, None, templates)


def sparse_decode_max_length(topk: int, extra_topk: int) -> int:
    """The largest length ``sparse_decode_lengths`` gives a request: its topk slots padded to
    whole blocks, then every extra slot."""
    return decode_plan.cdiv(topk, BLOCK_N) * BLOCK_N + extra_topk


def sparse_decode_lengths(b: int, topk: int, topk_length: Optional[torch.Tensor], extra_topk: int,
                          extra_topk_length: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Each request's length in the split-KV plan (GPU, no sync): its counted main slots
    padded to whole 64-slot blocks, then its counted extra slots; a length is clamped into
    [0, topk] as the kernel does (``kernels.sm90.sparse_decode``).  Three int32 ops per given
    length tensor (each costs a few microseconds of host time), none without one."""
    blk = BLOCK_N
    if topk_length is None:
        if extra_topk_length is None:
            return torch.full((b,), topk + extra_topk, dtype=torch.int32, device=device)
        lengths = extra_topk_length.clamp(0, extra_topk) + topk
    else:
        lengths = (topk_length.clamp(0, topk) + (blk - 1)) & -blk  # blk is a power of two
        if extra_topk:
            lengths += extra_topk if extra_topk_length is None else extra_topk_length.clamp(0, extra_topk)
    return lengths


class SparseDecodePlan(SplitKvPlan):
    """SM90 FP8 sparse decode: split kernel + combine over the schedule of the topk lengths.

    Without length tensors every request has the same, known length, so the plan is known here:
    when whole requests per part cost no more than splitting them plus the combine
    (``decode_plan.whole_request_parts``), the plan takes that part count and launches the split
    kernel alone (it finalises every request itself): one launch less on the host, and no
    combine on the GPU.  ``decode_plan.sparse_split`` makes that choice, and the overhead per
    piece of a split plan (none under 64 heads)."""

    LENGTHS = slice(8, 10)  # the length arguments among ``DECODE_ARGS``: topk_length, extra_topk_length
    NO_LENGTHS = (None, None)  # their stamp when both are absent

    def __init__(self, q, k_cache, indices, topk_length, extra_k_cache, extra_indices, extra_topk_length,
                 attn_sink, softmax_scale: float, matmul: str, fmt: str, config: FlashMLASchedMeta.Config):
        b, s_q, h_q, _ = q.shape
        self.topk = indices.shape[-1]
        self.extra_topk = 0 if extra_indices is None else extra_indices.shape[-1]
        token_rows = max(h_q, BLOCK_M)  # a row block gathers one query token's keys
        length = sparse_decode_max_length(self.topk, self.extra_topk)
        split = decode_plan.sparse_split(b, length, default_parts(q, 1, token_rows), h_q,
                                         lengths_known=topk_length is None and extra_topk_length is None)
        super().__init__(q, config, 1, split.fixed_overhead, length, token_rows, split.parts, splits=split.splits)
        # the scheduler's lengths are bound by shape only: nothing is enqueued before every check passed
        templates = self.templates(torch.empty(b, dtype=torch.int32, device=q.device))
        dm = dummies(self.device_index)
        has_extra = extra_k_cache is not None
        optional = {"topk_length": (topk_length, dm["i32"]), "extra_k_cache": (extra_k_cache, dm["fp8_cache"]),
                    "extra_indices": (extra_indices, dm["indices"]),
                    "extra_topk_length": (extra_topk_length, dm["i32"]), "attn_sink": (attn_sink, dm["f32"])}
        bound = {name: (dummy if t is None else t) for name, (t, dummy) in optional.items()}
        bound["extra_k_cache"] = fp8_cache_bytes(extra_k_cache) if has_extra else dm["fp8_cache"]
        static = tuple(name for name, (t, _) in optional.items() if t is None)
        out, lse = self.outputs()
        # h_q 8 / 16: the kernel with the heads on the MMA's N side (no padding rows)
        kernel, variant = "sparse_decode_sm90", {"fmt": fmt, "matmul": matmul}
        if h_q in SPARSE_DECODE_SMALL_HEADS:
            kernel, variant = "sparse_decode_heads_sm90", dict(variant, heads=h_q)
        self.main = launcher.prepare(
            kernel, variant, grids.split_kv(self.parts, 1, s_q * token_rows),
            device_index=self.device_index, static=static, q=q, k_cache=fp8_cache_bytes(k_cache), indices=indices,
            out=out, lse=lse,
            softmax_scale=float(softmax_scale), page_block_size=k_cache.shape[1],
            extra_page_block_size=extra_k_cache.shape[1] if has_extra else 1,
            has_topk_length=int(topk_length is not None), has_extra=int(has_extra),
            has_extra_topk_length=int(extra_topk_length is not None), has_sink=int(attn_sink is not None),
            **bound, **templates)
        if split.splits:
            self.prepare_combine(out, lse, attn_sink, templates)
        else:  # no request is ever split: nothing to combine
            self.bind_launches(self.main)
        self.constant_lengths = None
        self.no_lengths = topk_length is None and extra_topk_length is None
        if self.no_lengths:
            self.constant_lengths = constant_lengths(self.device_index, b, self.topk + self.extra_topk)

    def plan_lengths(self, topk_length, extra_topk_length) -> torch.Tensor:
        """The scheduler's lengths for a new step: computed from the given length tensors, or,
        without any, this plan's constant ones (read-only, made once)."""
        if topk_length is None and extra_topk_length is None:
            return self.constant_lengths
        return sparse_decode_lengths(self.out_shape[0], self.topk, topk_length, self.extra_topk, extra_topk_length,
                                     self.device)


class SparsePrefillPlan:
    """SM90 sparse prefill: one persistent launch of min(tiles, SMs) CTAs.  A call's pointers are
    the ``PREFILL_ARGS`` then ``SLOTS``."""

    SLOTS = ("out", "max_logits", "lse")

    def __init__(self, q, kv, indices, sm_scale: float, attn_sink, topk_length):
        s_q, h_q, d_qk = q.shape
        self.device_index = q.get_device()
        self.device = q.device
        self.out_shape = (s_q, h_q, D_V)
        self.stat_shape = (s_q, h_q)
        self.out_proto = output_proto(self.out_shape, torch.bfloat16, self.device)
        self.stat_proto = output_proto(self.stat_shape, torch.float32, self.device)
        dm = dummies(self.device_index)
        optional = {"topk_length": (topk_length, dm["i32"]), "attn_sink": (attn_sink, dm["f32"])}
        out, max_logits, lse = self.outputs()
        num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.main = launcher.prepare(
            "sparse_prefill_sm90", {"d_qk": d_qk}, grids.sparse_prefill(s_q, h_q, num_sms),
            device_index=self.device_index, static=tuple(name for name, (t, _) in optional.items() if t is None),
            q=q, kv=kv, indices=indices, out=out, max_logits=max_logits, lse=lse,
            sm_scale=float(sm_scale), has_topk_length=int(topk_length is not None),
            has_sink=int(attn_sink is not None),
            **{name: (dummy if t is None else t) for name, (t, dummy) in optional.items()})
        self.launches = launcher.LaunchGroup((self.main,), PREFILL_ARGS + self.SLOTS)

    def outputs(self, out: Optional[torch.Tensor] = None):
        """out [s_q, h_q, 512] bf16 (the caller's, checked by the API, or fresh), fresh
        max_logits and lse [s_q, h_q] float32."""
        return (_empty_like(self.out_proto) if out is None else out, _empty_like(self.stat_proto),
                _empty_like(self.stat_proto))

    def __call__(self, pointers: list, out: Optional[torch.Tensor] = None) -> tuple[Any, Any, Any]:
        """One call; ``pointers``: its ``PREFILL_ARGS`` pointers (a list, extended here)."""
        out, max_logits, lse = self.outputs(out)
        pointers += (out.data_ptr(), max_logits.data_ptr(), lse.data_ptr())  # SLOTS
        self.launches.run(_raw_stream(self.device_index), pointers)
        return out, max_logits, lse
