"""Each Mamba2 Triton op on the GPU against the pure-torch reference (``backends/reference/
mamba.py``) on the same random inputs: one mixed step (decodes, then prefill chunks shorter
than the conv window, inside one scan chunk, across many) from earlier states, at the tiny
test families' sizes and at released models' sizes; float32 and bfloat16. Prints the largest
error of each output and state, and exits 1 when one is past its tolerance.

    python benchmarks/kernels/check_mamba_ops.py            (repo root, on a GPU)
"""

from __future__ import annotations

import sys

import torch

from tessellm.backends.reference import mamba as ref
from tessellm.core.mamba_state import make_batch
from tessellm.kernels.mamba import mamba_chunk_scan, mamba_conv1d, mamba_state_update

# name: (heads H, head dim P, groups G, state N, conv width K, scan chunk)
SHAPES = {
    "tiny families (mamba2, granite-4h tests)": (8, 16, 2, 16, 4, 8),
    "tiny, one group": (8, 16, 1, 16, 4, 8),
    "Mamba2-2.7B": (80, 64, 1, 128, 4, 256),
    "Granite 4.0-H small": (128, 64, 1, 128, 4, 256),
    "Nemotron-H 8B (8 groups)": (128, 64, 8, 128, 4, 128),
}
LENGTHS = [1, 1, 1, 2, 3, 31, 257, 700]  # four decodes, then prefill chunks
TOL = {torch.float32: 2e-3, torch.bfloat16: 6e-2}  # relative to each output's largest value


def _step(shape, dtype, device, seed=0):
    H, P, G, N, K, chunk = shape
    g = torch.Generator().manual_seed(seed)
    T, conv_dim, slots = sum(LENGTHS), H * P + 2 * G * N, [9, 2, 5, 0, 7, 3, 1, 4]

    def rnd(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device)

    return dict(xbc=rnd(T, conv_dim).to(dtype), weight=rnd(conv_dim, K, scale=0.5).to(dtype),
                bias=rnd(conv_dim).to(dtype), dt=rnd(T, H).to(dtype) - 1.0,
                A=-(torch.rand(H, generator=g) * 4 + 0.5).to(device), D=rnd(H),
                dt_bias=rnd(H, scale=0.5), conv_state=rnd(10, conv_dim, K - 1).to(dtype),
                ssm_state=rnd(10, H, P, N, scale=0.3).to(dtype),
                batch=make_batch(LENGTHS, slots, device), dims=(H, P, G, N, chunk))


def _mixer(ops, s):
    """As ``MambaMixer2.forward``: conv, then state update (decodes) and scan (prefills) on
    x, B, C as column views of the conv output."""
    conv, scan, update = ops
    H, P, G, N, chunk = s["dims"]
    b = s["batch"]
    out = conv(s["xbc"], s["weight"], s["bias"], s["conv_state"], b)
    x, B, C = out.split([H * P, G * N, G * N], dim=-1)
    T = out.shape[0]
    x, B, C = x.reshape(T, H, P), B.reshape(T, G, N), C.reshape(T, G, N)
    nd = b.num_decodes
    y = torch.cat([update(x[:nd], s["dt"][:nd], s["A"], B[:nd], C[:nd], s["D"], s["dt_bias"],
                          s["ssm_state"], b.state_indices[:nd]),
                   scan(x[nd:], s["dt"][nd:], s["A"], B[nd:], C[nd:], s["D"], s["dt_bias"],
                        s["ssm_state"], b.prefills, chunk)])
    return {"conv out": out, "y": y, "conv state": s["conv_state"], "ssm state": s["ssm_state"]}


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    bad = 0
    for name, shape in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            want = _mixer((ref.causal_conv1d, ref.ssd_chunk_scan, ref.selective_state_update),
                          _step(shape, dtype, "cuda"))
            got = _mixer((mamba_conv1d, mamba_chunk_scan, mamba_state_update),
                         _step(shape, dtype, "cuda"))
            parts = []
            for key in want:
                w, o = want[key].float(), got[key].float()
                err = float((w - o).abs().max() / w.abs().max().clamp_min(1e-6))
                ok = err <= TOL[dtype] and torch.isfinite(o).all()
                bad += not ok
                parts.append(f"{key} {err:.1e}{'' if ok else ' FAIL'}")
            print(f"{name:42s} {str(dtype)[6:]:9s} " + "  ".join(parts), flush=True)
    print("all within tolerance" if not bad else f"{bad} outputs past tolerance")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
