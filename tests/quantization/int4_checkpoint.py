"""Tiny AWQ / GPTQ int4 checkpoints written the way AutoAWQ (GEMM) and AutoGPTQ (v1) store them,
from a dense tiny model's safetensors: random codes, zeros and fp16 scales per group of
``GROUP`` inputs for every linear a released checkpoint quantizes (``quantized_names``), packed
in each format's layout (``pack_awq``: 8 outputs a word; ``pack_int4``: 8 inputs a word; GPTQ v1
stores ``zero - 1``), plus the *dequantized* checkpoint (each weight ``(q - zero) * scale`` in
float32): the model the int4 one must serve, which HF transformers loads as a dense model.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from tessellm.quantization.int4 import pack_awq, pack_gptq_zeros
from tessellm.quantization.packed import pack_int4, quantize_int4
from tests.quantization.block_fp8_checkpoint import quantized_names, write_checkpoint

GROUP = 32


def write_int4(dense_dir: str, root, fmts=("awq", "gptq"), extra_packed=(), group: int = GROUP,
               rtn: bool = False) -> dict:
    """The ``{fmt: dir}`` of int4 checkpoints of one set of random codes (every quantized
    linear of ``quantized_names``, plus ``extra_packed`` name fragments), and ``"deq"``: their
    dequantized checkpoint (``root``: a ``pathlib.Path``). ``rtn``: codes, zeros and scales
    rounded from the dense weights (min/max per group, round to nearest) instead of random
    ones, for a model whose outputs should still read (benchmarks)."""
    g = torch.Generator().manual_seed(1)
    state = load_file(os.path.join(dense_dir, "model.safetensors"))
    names = [n[:-len(".weight")] for n in state
             if n in quantized_names(state) or any(e in n for e in extra_packed)]
    quant = {fmt: dict(state) for fmt in fmts}
    dense = dict(state)
    for name in names:
        n, k = state[f"{name}.weight"].shape
        rows = torch.arange(k) // group
        if rtn:
            q, z, s = _round_to_nearest(state[f"{name}.weight"].float().t(), group)
        else:
            q = torch.randint(0, 16, (k, n), generator=g)
            z = torch.randint(1, 16, (k // group, n), generator=g)  # (GPTQ v1 stores zero - 1)
            s = (torch.rand(k // group, n, generator=g) * 0.01 + 0.004).half()
        dense[f"{name}.weight"] = ((q - z[rows]) * s.float()[rows]).t().contiguous()
        for fmt, tensors in quant.items():
            del tensors[f"{name}.weight"]
            if fmt == "awq":
                tensors.update({f"{name}.qweight": pack_awq(q), f"{name}.qzeros": pack_awq(z)})
            else:
                tensors.update({f"{name}.qweight": pack_int4(q),
                                f"{name}.qzeros": pack_gptq_zeros(z - 1),
                                f"{name}.g_idx": rows.to(torch.int32)})
            tensors[f"{name}.scales"] = s
    configs = {"awq": {"quant_method": "awq", "bits": 4, "group_size": group,
                       "zero_point": True, "version": "gemm"},
               "gptq": {"quant_method": "gptq", "bits": 4, "group_size": group,
                        "desc_act": False, "sym": False, "checkpoint_format": "gptq"}}
    out = {fmt: write_checkpoint(str(root / fmt), quant[fmt], dense_dir, configs[fmt]) for fmt in fmts}
    out["deq"] = write_checkpoint(str(root / "deq"), dense, dense_dir)
    return out


def _round_to_nearest(w_kn: torch.Tensor, group: int):
    """Asymmetric 4-bit codes ``[K, N]``, zeros ``[G, N]`` in 1..15 and fp16 scales of ``w_kn``."""
    k, n = w_kn.shape
    wg = w_kn.reshape(k // group, group, n)
    lo, hi = wg.amin(1), wg.amax(1)
    s = ((hi - lo) / 15).clamp_min(1e-6).half()
    z = (-lo / s.float()).round().clamp(1, 15)
    q = (wg / s.float()[:, None] + z[:, None]).round().clamp(0, 15).reshape(k, n)
    return q.long(), z.long(), s


def random_int4_experts(e, n, k, group, seed):
    """Random ``[E, N, K]`` weights quantized round-to-nearest in the experts' layout."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(e, n, k, generator=g) / k ** 0.5
    parts = [quantize_int4(we, group) for we in w]
    return (torch.stack([pack_int4(q).t() for q, _, _ in parts]).contiguous(),
            torch.stack([s.t() for _, s, _ in parts]).contiguous(),
            torch.stack([z.t().to(torch.uint8) for _, _, z in parts]).contiguous())
