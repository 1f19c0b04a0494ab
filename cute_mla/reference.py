"""Float32 (or float64) torch reference implementations: the test oracles for every kernel.

They favour clarity and exactness over speed, but stay memory-frugal (queries are processed in chunks)
so the production-size cases of SPEC section 6 can be checked on a GPU. All functions:

* compute in ``compute_dtype`` (float32 by default, float64 on request) at full matmul precision
  (TF32 is switched off for the duration of the call) and return float32 tensors;
* implement the edge semantics of SPEC section 4: a query with no valid key gets out = 0, lse = +inf
  and max_logits = -inf, never NaN;
* only ever *gather* the rows that are valid, and replace the rows fetched for invalid slots with
  zeros by selection (``torch.where``), never by multiplying with a mask: NaN-poisoned cache rows,
  garbage block-table entries and out-of-range indices cannot reach any output (0 * NaN = NaN);
* work on CPU and CUDA tensors alike and accept non-contiguous inputs.

Conventions decided here (the kernels must match them):

* lse / max_logits are natural-log values of the *scaled* logits (``softmax_scale * q.k``).
* Sparse indices: a slot is valid iff ``0 <= index < number of cache rows`` and its position is below
  ``topk_length``. Duplicate valid indices are *not* deduplicated: a row selected twice contributes
  twice to the softmax, exactly what a plain gather-then-attend kernel computes.
* Attention sink: ``out *= sigmoid(lse - sink)`` (= exp(lse) / (exp(lse) + exp(sink))); the returned lse
  excludes the sink. sink = +inf zeroes the output, sink = -inf leaves it unchanged.
* Dense MHA varlen lse is ``[h_q, total_q]`` (FlashAttention >= 2.4 varlen convention). Note that
  FlashMLA's own SM100 ``flash_attn_varlen_func`` returns the transposed *view* ``[total_q, h_q]`` of
  such a buffer: compare with ``lse.T`` if the public API follows FlashMLA there.
"""

from __future__ import annotations

import contextlib
import math
import torch

__all__ = [
    "ref_dense_decode",
    "ref_sparse_decode",
    "ref_sparse_prefill",
    "ref_mha_varlen_fwd",
    "ref_mha_varlen_bwd",
]

# Upper bound on the number of compute_dtype elements of the big temporaries (gathered K, logits,
# probabilities) one chunk may create; 2**27 float32 = 512 MiB. Keeps the largest SPEC configs
# (s_q=4096, h_q=128, topk=2048) well inside a single GPU.
_CHUNK_ELEMS = 1 << 27


@contextlib.contextmanager
def _full_precision():
    """Disable TF32 for float32 matmuls: a reference computed with 10-bit mantissas is no oracle."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def _rows_per_chunk(per_row_elems: int) -> int:
    return max(1, _CHUNK_ELEMS // max(1, per_row_elems))


def _attend(q, k, v, valid, scale):
    """Masked softmax attention with the empty-row semantics of SPEC section 4.

    q [G, g, M, d_qk] attends to k [G, N, d_qk] / v [G, N, d_v] (g query heads share one K/V group);
    valid is a bool mask broadcastable to [G, g, M, N] (None = all valid). K/V must already be free of
    NaN in every position (callers zero invalid rows by selection).

    Returns out [G, g, M, d_v], lse [G, g, M] (+inf where no key is valid) and
    max_logits [G, g, M] (-inf where no key is valid). Differentiable w.r.t. q, k, v (used by the MHA
    backward); rows without keys get zero output and zero gradients, never NaN.
    """
    G, g, M, _ = q.shape
    N = k.shape[1]
    if N == 0:
        out = q.new_zeros(G, g, M, v.shape[-1])  # no graph: callers skip the backward of such rows
        lse = q.new_full((G, g, M), math.inf)
        return out, lse, torch.full_like(lse, -math.inf)
    # Fold (g, M) into one row dim: a broadcast matmul against k.unsqueeze(1) would materialise g
    # copies of K (tens of GiB at h_q = 128).
    s = torch.bmm(q.reshape(G, g * M, q.shape[-1]), k.transpose(-1, -2)).view(G, g, M, N) * scale
    if valid is not None:
        s = s.masked_fill(~valid, -math.inf)
    m = s.amax(dim=-1, keepdim=True)
    # Shift by the (detached) row max for stability; a row with no valid key has max -inf, shift by 0
    # instead so exp() gives exact zeros rather than exp(-inf - -inf) = NaN.
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m_safe)
    l = p.sum(dim=-1, keepdim=True)
    empty = l == 0
    l_safe = torch.where(empty, torch.ones_like(l), l)
    out = torch.bmm(p.reshape(G, g * M, N), v).view(G, g, M, v.shape[-1]) / l_safe
    lse = torch.where(empty, torch.full_like(l, math.inf), m_safe + torch.log(l_safe))
    return out, lse.squeeze(-1), m.squeeze(-1)


def _sink_factor(lse, sink):
    """exp(lse) / (exp(lse) + exp(sink)) with lse (without sink) broadcastable against sink.

    For rows without keys (lse = +inf here, out already 0) the factor is irrelevant; we return 1 so
    that sink = -inf or +inf cannot produce inf - inf = NaN there.
    """
    empty = torch.isinf(lse) & (lse > 0)
    lse_safe = torch.where(empty, torch.zeros_like(lse), lse)
    f = torch.sigmoid(lse_safe - sink)
    return torch.where(empty, torch.ones_like(f), f)


def _gather_rows(flat_kv, idx, valid, dtype):
    """Gather flat_kv[idx] ([R, K] -> [R, K, d]) touching only rows that exist; invalid slots read as 0."""
    n_rows = flat_kv.shape[0]
    R, K = idx.shape
    if n_rows == 0:
        return torch.zeros(R, K, flat_kv.shape[-1], dtype=dtype, device=flat_kv.device)
    safe = torch.where(valid, idx, torch.zeros_like(idx))  # row 0 exists; its value is discarded below
    rows = flat_kv.index_select(0, safe.reshape(-1)).reshape(R, K, flat_kv.shape[-1]).to(dtype)
    # Selection, not multiplication: row 0 may be NaN-poisoned.
    return torch.where(valid.unsqueeze(-1), rows, torch.zeros((), dtype=dtype, device=rows.device))


def _slot_validity(idx, n_rows, lengths):
    """Valid slots of an index tensor [R, K]: in range, and (if lengths [R] given) position < length."""
    valid = (idx >= 0) & (idx < n_rows)
    if lengths is not None:
        pos = torch.arange(idx.shape[-1], device=idx.device)
        valid &= pos.unsqueeze(0) < lengths.to(idx.device, torch.int64).unsqueeze(1)
    return valid


def _sparse_rows(q_rows, sources, scale, d_v, compute_dtype, sink=None):
    """Sparse attention for independent query rows, in chunks of rows.

    q_rows [R, h_q, d_qk]; sources: list of (flat_kv [n, d_qk], idx [R, K] int64, lengths [R] or None).
    All sources' selected rows join one softmax; sink [h_q] (or None) scales the output.
    Returns float32 out [R, h_q, d_v], lse [R, h_q] (without sink), max_logits [R, h_q].
    """
    R, h_q, d_qk = q_rows.shape
    dev = q_rows.device
    total_k = sum(src[1].shape[1] for src in sources)
    rows = _rows_per_chunk(total_k * (d_qk + 3 * h_q) + h_q * d_v)
    # Written chunk by chunk: no list of partial results plus a concatenated copy at the end.
    out = torch.empty(R, h_q, d_v, dtype=torch.float32, device=dev)
    lse = torch.empty(R, h_q, dtype=torch.float32, device=dev)
    mx = torch.empty(R, h_q, dtype=torch.float32, device=dev)
    if sink is not None:
        sink = sink.to(dev, compute_dtype)
    for r0 in range(0, R, rows):
        r1 = min(R, r0 + rows)
        ks, masks = [], []
        for flat_kv, idx, lengths in sources:
            ic = idx[r0:r1]
            valid = _slot_validity(ic, flat_kv.shape[0], None if lengths is None else lengths[r0:r1])
            ks.append(_gather_rows(flat_kv, ic, valid, compute_dtype))
            masks.append(valid)
        k = torch.cat(ks, dim=1) if len(ks) > 1 else ks[0]  # [r, K_total, d_qk]
        valid = torch.cat(masks, dim=1) if len(masks) > 1 else masks[0]
        q = q_rows[r0:r1].to(compute_dtype).unsqueeze(2)  # [r, h_q, 1, d_qk]
        o, l, m = _attend(q, k, k[..., :d_v], valid[:, None, None, :], scale)
        o, l = o.squeeze(2), l.squeeze(2)
        if sink is not None:
            o = o * _sink_factor(l, sink).unsqueeze(-1)
        out[r0:r1] = o
        lse[r0:r1] = l
        mx[r0:r1] = m.squeeze(2)
    return out, lse, mx


def _causal_valid(s_q, s_k, q_start, q_stop, device):
    """Bottom-right aligned causal mask rows [q_start, q_stop) of an s_q x s_k problem: [M, s_k]."""
    i = torch.arange(q_start, q_stop, device=device).unsqueeze(1)
    j = torch.arange(s_k, device=device).unsqueeze(0)
    return j < s_k - (s_q - 1 - i)


# --------------------------------------------------------------------------------------------------
# Dense decode (paged cache)
# --------------------------------------------------------------------------------------------------
def ref_dense_decode(q, k_cache, block_table, cache_seqlens, head_dim_v=512, softmax_scale=None,
                     causal=False, compute_dtype=torch.float32):
    """Reference of ``flash_mla_with_kvcache`` dense path.

    q [b, s_q, h_q, d_qk]; k_cache [num_blocks, page_block_size, h_kv, d_qk] (V = first head_dim_v
    columns); block_table [b, max_blocks] int32; cache_seqlens [b] int32.
    Returns out [b, s_q, h_q, head_dim_v] float32 and lse [b, h_q, s_q] float32.

    Only the block-table entries covering each request's length are read (the rest may be garbage),
    and only the first cache_seqlens[i] rows of those pages are used (the tail of the last page may
    hold NaN). Query head h uses KV head h // (h_q // h_kv).
    """
    b, s_q, h_q, d_qk = q.shape
    num_blocks, page, h_kv, d_cache = k_cache.shape
    if d_cache != d_qk:
        raise ValueError(f"k_cache head dim {d_cache} != q head dim {d_qk}")
    if h_q % h_kv != 0:
        raise ValueError(f"h_q={h_q} must be a multiple of h_kv={h_kv}")
    if head_dim_v > d_qk:
        raise ValueError(f"head_dim_v={head_dim_v} exceeds d_qk={d_qk}")
    scale = d_qk ** -0.5 if softmax_scale is None else softmax_scale
    g = h_q // h_kv
    seqlens = [int(x) for x in cache_seqlens.tolist()]
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float32, device=q.device)
    with _full_precision():
        for i, s_k in enumerate(seqlens):
            if s_k < 0:
                raise ValueError(f"cache_seqlens[{i}] = {s_k} is negative")
            if s_k == 0:
                continue  # no key: out 0, lse +inf (already set)
            n_pages = -(-s_k // page)
            if n_pages > block_table.shape[1]:
                raise ValueError(f"request {i} needs {n_pages} pages, block_table has {block_table.shape[1]}")
            blocks = block_table[i, :n_pages].to(torch.int64)
            if bool(((blocks < 0) | (blocks >= num_blocks)).any()):
                raise ValueError(f"block_table[{i}] holds an out-of-range block id within its length")
            k = k_cache.index_select(0, blocks.to(k_cache.device)).reshape(n_pages * page, h_kv, d_qk)[:s_k]
            k = k.to(compute_dtype).permute(1, 0, 2)  # [h_kv, s_k, d_qk]
            # [s_q, h_q, d] -> [h_kv, g, s_q, d]: head h = kv_head * g + j, i.e. kv_head = h // g.
            qi = q[i].to(compute_dtype).permute(1, 0, 2).reshape(h_kv, g, s_q, d_qk)
            valid = _causal_valid(s_q, s_k, 0, s_q, q.device) if causal and s_q > 1 else None
            o, l, _ = _attend(qi, k, k[..., :head_dim_v], valid, scale)
            out[i] = o.reshape(h_q, s_q, head_dim_v).permute(1, 0, 2).float()
            lse[i] = l.reshape(h_q, s_q).float()
    return out, lse


# --------------------------------------------------------------------------------------------------
# Sparse decode (dequantized paged cache, token indices)
# --------------------------------------------------------------------------------------------------
def ref_sparse_decode(q, kv, indices, topk_length=None, attn_sink=None, extra_kv=None,
                      extra_indices=None, extra_topk_length=None, d_v=512, softmax_scale=None,
                      compute_dtype=torch.float32):
    """Reference of ``flash_mla_with_kvcache`` sparse path, on the *dequantized* cache.

    q [b, s_q, h_q, d_qk]; kv [num_blocks, page_block_size, 1, d_qk] (any float dtype);
    indices [b, s_q, topk] = block id * page_block_size + offset (flat cache row); any value outside
    [0, num_blocks * page_block_size) is invalid, as is every slot at position >= topk_length[b].
    extra_kv / extra_indices [b, s_q, extra_topk] / extra_topk_length [b]: a second cache (own page
    size) whose valid rows join the same softmax. attn_sink [h_q] (see module doc).
    V = kv[..., :d_v] (d_qk 576 -> the 512 NoPE columns; d_qk 512 -> all columns incl. RoPE).
    Duplicate valid indices count once per occurrence.
    Returns out [b, s_q, h_q, d_v] float32 and lse [b, h_q, s_q] float32 (without the sink).
    """
    b, s_q, h_q, d_qk = q.shape
    if (extra_kv is None) != (extra_indices is None):
        raise ValueError("extra_kv and extra_indices must be given together")
    scale = d_qk ** -0.5 if softmax_scale is None else softmax_scale

    def source(cache, idx, lengths, name):
        if cache.shape[-1] != d_qk:
            raise ValueError(f"{name} head dim {cache.shape[-1]} != q head dim {d_qk}")
        if idx.shape[:2] != (b, s_q):
            raise ValueError(f"{name} indices shape {tuple(idx.shape)} must start with {(b, s_q)}")
        flat = cache.reshape(-1, d_qk)
        idx = idx.to(flat.device, torch.int64).reshape(b * s_q, -1)
        if lengths is not None:  # one length per request, shared by its s_q query tokens
            lengths = lengths.to(flat.device, torch.int64).repeat_interleave(s_q)
        return flat, idx, lengths

    sources = [source(kv, indices, topk_length, "kv")]
    if extra_kv is not None:
        sources.append(source(extra_kv, extra_indices, extra_topk_length, "extra_kv"))
    with _full_precision():
        out, lse, _ = _sparse_rows(q.reshape(b * s_q, h_q, d_qk), sources, scale, d_v, compute_dtype,
                                   attn_sink)
    return out.view(b, s_q, h_q, d_v), lse.view(b, s_q, h_q).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------------
# Sparse prefill (flat kv, per-token indices)
# --------------------------------------------------------------------------------------------------
def ref_sparse_prefill(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None,
                       compute_dtype=torch.float32):
    """Reference of ``flash_mla_sparse_fwd``.

    q [s_q, h_q, d_qk]; kv [s_kv, 1, d_qk]; indices [s_q, 1, topk] (invalid: < 0 or >= s_kv, any
    magnitude); topk_length [s_q] (per token); attn_sink [h_q].
    Returns out [s_q, h_q, d_v], max_logits [s_q, h_q], lse [s_q, h_q], all float32; max_logits and
    lse are of the scaled logits and exclude the sink. Processed in chunks of query tokens.
    """
    s_q, h_q, d_qk = q.shape
    if kv.shape[-1] != d_qk or kv.dim() != 3 or kv.shape[1] != 1:
        raise ValueError(f"kv must be [s_kv, 1, {d_qk}], got {tuple(kv.shape)}")
    if indices.dim() != 3 or indices.shape[0] != s_q or indices.shape[1] != 1:
        raise ValueError(f"indices must be [{s_q}, 1, topk], got {tuple(indices.shape)}")
    flat = kv.reshape(-1, d_qk)
    idx = indices.to(flat.device, torch.int64).reshape(s_q, -1)
    lengths = None if topk_length is None else topk_length.to(flat.device, torch.int64)
    with _full_precision():
        out, lse, mx = _sparse_rows(q, [(flat, idx, lengths)], sm_scale, d_v, compute_dtype, attn_sink)
    return out, mx, lse


# --------------------------------------------------------------------------------------------------
# Dense MHA prefill (varlen, GQA, causal), forward and backward
# --------------------------------------------------------------------------------------------------
def _mha_chunk(q, k, v, s_q, s_k, q_start, causal, scale):
    """One chunk of query rows of one sequence: q [M, h_q, d] vs k [s_k, h_kv, d], v [s_k, h_kv, dv].

    Returns out [M, h_q, dv] and lse [M, h_q].
    """
    M, h_q, d = q.shape
    h_kv = k.shape[1]
    g = h_q // h_kv
    qg = q.permute(1, 0, 2).reshape(h_kv, g, M, d)  # head h -> (h // g, h % g)
    valid = _causal_valid(s_q, s_k, q_start, q_start + M, q.device) if causal else None
    o, l, _ = _attend(qg, k.permute(1, 0, 2), v.permute(1, 0, 2), valid, scale)
    return o.reshape(h_q, M, -1).permute(1, 0, 2), l.reshape(h_q, M).transpose(0, 1)


def _mha_seqs(q, k, v, cu_seqlens_q, cu_seqlens_k):
    """Validate shapes and yield per-sequence (q0, q1, k0, k1) bounds."""
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"h_q={q.shape[1]} must be a multiple of h_kv={k.shape[1]}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree on tokens/heads")
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    if len(cq) != len(ck):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length")
    for i in range(len(cq) - 1):
        if cq[i + 1] < cq[i] or ck[i + 1] < ck[i] or cq[i + 1] > q.shape[0] or ck[i + 1] > k.shape[0]:
            raise ValueError(f"bad cu_seqlens at sequence {i}")
        yield cq[i], cq[i + 1], ck[i], ck[i + 1]


def ref_mha_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False,
                       compute_dtype=torch.float32):
    """Reference of ``flash_attn_varlen_func`` forward.

    q [total_q, h_q, d_qk], k [total_k, h_kv, d_qk], v [total_k, h_kv, d_v]; cu_seqlens [b + 1] int32.
    Causal is bottom-right aligned per sequence (FlashAttention >= 2.1): query i of s_q sees keys
    [0, s_k - (s_q - 1 - i)). Returns out [total_q, h_q, d_v] and lse [h_q, total_q], float32.
    Query rows not covered by cu_seqlens_q get out 0 and lse +inf.
    """
    total_q, h_q, d_qk = q.shape
    scale = d_qk ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(total_q, h_q, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((h_q, total_q), math.inf, dtype=torch.float32, device=q.device)
    with torch.no_grad(), _full_precision():
        for q0, q1, k0, k1 in _mha_seqs(q, k, v, cu_seqlens_q, cu_seqlens_k):
            rows = _rows_per_chunk(3 * h_q * max(1, k1 - k0))
            ks = k[k0:k1].to(compute_dtype)
            vs = v[k0:k1].to(compute_dtype)
            for c0 in range(q0, q1, rows):
                c1 = min(q1, c0 + rows)
                o, l = _mha_chunk(q[c0:c1].to(compute_dtype), ks, vs, q1 - q0, k1 - k0, c0 - q0, causal, scale)
                out[c0:c1] = o.float()
                lse[:, c0:c1] = l.transpose(0, 1).float()
    return out, lse


def ref_mha_varlen_bwd(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False,
                       compute_dtype=torch.float32):
    """Reference of ``flash_attn_varlen_func`` backward: (dq, dk, dv) float32, by autograd.

    Each chunk of query rows is differentiated on its own (forward + backward at once) so the peak
    memory is one chunk's probabilities; dk/dv accumulate over chunks (and over the query heads of a
    GQA group). Gradients of positions not covered by cu_seqlens are 0.
    """
    total_q, h_q, d_qk = q.shape
    scale = d_qk ** -0.5 if softmax_scale is None else softmax_scale
    # inference_mode(False) + enable_grad: works even when the caller runs under no_grad/inference
    # (the gradient buffers are written in place, so they must be normal tensors too).
    with torch.inference_mode(False), torch.enable_grad(), _full_precision():
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        for q0, q1, k0, k1 in _mha_seqs(q, k, v, cu_seqlens_q, cu_seqlens_k):
            if k1 == k0 or q1 == q0:
                continue  # no key (out = 0) or no query: all gradients of this sequence are 0
            rows = _rows_per_chunk(6 * h_q * (k1 - k0))
            ks = k[k0:k1].detach().to(compute_dtype).clone().requires_grad_()
            vs = v[k0:k1].detach().to(compute_dtype).clone().requires_grad_()
            dks = torch.zeros_like(ks)
            dvs = torch.zeros_like(vs)
            for c0 in range(q0, q1, rows):
                c1 = min(q1, c0 + rows)
                qc = q[c0:c1].detach().to(compute_dtype).clone().requires_grad_()
                o, _ = _mha_chunk(qc, ks, vs, q1 - q0, k1 - k0, c0 - q0, causal, scale)
                g_out = dout[c0:c1].detach().to(compute_dtype).clone()
                gq, gk, gv = torch.autograd.grad(o, (qc, ks, vs), g_out)
                dq[c0:c1] = gq.float()
                dks += gk
                dvs += gv
            dk[k0:k1] = dks.float()
            dv[k0:k1] = dvs.float()
    return dq, dk, dv
