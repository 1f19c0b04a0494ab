"""Run MODEL1 sparse decode on caches whose scale exponents span every ue8m0 byte, save or compare.

    PYTHONPATH=TREE python perf/results/pending/same_bits.py save FILE.pt
    PYTHONPATH=TREE python perf/results/pending/same_bits.py compare FILE.pt

For ``model1-pack-halves.patch``: its bf16 packing must give the dequantised cache, and so the
outputs, bit for bit what the rounding conversion gives, for every scale (the exponent bytes 0-2
take the rounding path, 255 is NaN).  Run ``save`` in the tree without the patch, ``compare`` in
the tree with it; both on the same GPU.  Every head count (8, 16: the heads kernel; 64, 128: the
64-row kernel), bf16 matmuls (MODEL1's default), with the sink, some invalid indices, and codes
of every byte but the two NaNs.
"""
from __future__ import annotations

import sys

import torch

import cute_mla
from cute_mla import quant


def inputs(h_q: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    nb, pbs, b, s_q, topk = 24, 64, 6, 2, 256
    codes = torch.randint(0, 256, (nb, pbs, 1, 448), generator=g, device="cuda", dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes: a NaN would hide a scale's effect
    half = nb // 2 * pbs  # tokens [0, half): small scales; [half, 2 half): scales near 2^0
    if seed < 2:
        # exponent bytes 0-5 (0-2 take the rounding path) for the first half of the cache, 118-136
        # for the rest; a row selects from one half only, so the small values are not swamped
        e_low = torch.randint(0, 6, (nb, pbs, 1, 7), generator=g, device="cuda")
        e_mid = torch.randint(118, 137, (nb, pbs, 1, 7), generator=g, device="cuda")
        exps = torch.cat([e_low[: nb // 2], e_mid[nb // 2:]]).to(torch.uint8)
    else:  # every byte but NaN's: overflow to inf and NaN rows compared too
        exps = torch.randint(0, 255, (nb, pbs, 1, 7), generator=g, device="cuda", dtype=torch.uint8)
    rope = torch.randn((nb, pbs, 1, 64), generator=g, device="cuda") * 0.1
    rope[: nb // 2] *= 2.0 ** -124  # as small as the small scales' values
    rope = rope.to(torch.bfloat16)
    cache = quant.pack_model1(codes, exps, rope)
    idx = torch.randint(0, half, (b, s_q, topk), generator=g, device="cuda", dtype=torch.int32)
    idx[1::2] += half  # odd requests select from the second half
    idx[:, :, ::17] = -1
    q = (torch.randn((b, s_q, h_q, 512), generator=g, device="cuda") * 0.1).to(torch.bfloat16)
    sink = torch.randn(h_q, generator=g, device="cuda")
    return q, cache, idx, sink


def run_all():
    res = {}
    for h_q in (8, 16, 64, 128):
        for seed in range(3):
            q, cache, idx, sink = inputs(h_q, seed)
            meta = cute_mla.get_mla_metadata()[0]
            out, lse = cute_mla.flash_mla_with_kvcache(q, cache, None, None, 512, meta, is_fp8_kvcache=True,
                                                       indices=idx, attn_sink=sink)
            res[(h_q, seed)] = (out.cpu(), lse.cpu())
    return res


def main(argv) -> int:
    mode, path = argv
    res = run_all()
    if mode == "save":
        torch.save(res, path)
        print(f"saved {len(res)} cases")
        return 0
    ref = torch.load(path)
    bad = 0
    for key, (out, lse) in res.items():
        r_out, r_lse = ref[key]
        same = torch.equal(out.view(torch.int16), r_out.view(torch.int16)) and \
            torch.equal(lse.view(torch.int32), r_lse.view(torch.int32))
        bad += not same
        print(f"h_q {key[0]:3d} seed {key[1]}: {'same bits' if same else 'DIFFERENT'}"
              f" (finite outputs {out.float().isfinite().float().mean():.3f})")
    print("all the same" if not bad else f"{bad} cases differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
