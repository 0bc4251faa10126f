"""fp8 MoE experts: how a ``FusedMoE`` stores them and fills them from a checkpoint.

Two layouts, both e4m3 codes in the stacked ``w13 [E, 2L, H]`` / ``w2 [E, H, L]`` (L: this
rank's slice of the intermediate size) with float32 scales beside them:

    kind        w13_scale                     w2_scale                  from
    fp8         [E, 2L]   one per output row  [E, H]                    per-tensor scales (Mixtral-FP8,
                                                                        expanded over the rows) or
                                                                        per-channel ones; or quantized
                                                                        on load (quantization="fp8")
    fp8_block   [E, 2L/bn, ceil(H/bk)]        [E, ceil(H/bn), ceil(L/bk)]   weight_scale_inv of
                                                                        Qwen3-MoE-FP8 / DeepSeek-V3

A block-wise w13 stacks the gate's row blocks, then the up's, so L must be a whole number of
row blocks (768 and 2048 in the released models); under tensor parallelism each rank's L must
also be whole input blocks of w2. Checkpoint names are HF's, one tensor per expert and
projection: ``experts.<e>.{gate_proj|up_proj|down_proj|w1|w3|w2}.{weight, weight_scale,
weight_scale_inv, input_scale}`` (``input_scale``, a static activation scale, is unused: the
experts' activations are not quantized).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tessellm.quantization.fp8_block import quantize_block_tensors, scale_shape
from tessellm.quantization.int8_fp8 import FP8_DTYPES
from tessellm.quantization.packed import quantize_fp8


@dataclass(frozen=True)
class ExpertQuant:
    kind: str  # "fp8": a scale per output row; "fp8_block": per (bn x bk) block; "awq" /
    # "gptq": int4 codes with group scales and zeros (layers/moe_int4.py)
    block: Optional[tuple[int, int]] = None
    fp8_dtype: torch.dtype = torch.float8_e4m3fn
    group_size: int = 0  # int4: inputs per group (-1 / 0: per channel)
    zero_offset: int = 0  # int4: added to stored zeros (1 for GPTQ v1 checkpoints)
    # "bnb4" (layers/moe_bnb.py; group_size: the block size): the table, and whether the
    # checkpoint holds the 4-bit experts (else float ones are quantized to NF4 on load)
    bnb_type: str = "nf4"
    prequantized: bool = True


def expert_quant(spec) -> Optional[ExpertQuant]:
    """How experts are kept for a model quantized with ``spec`` (a ``QuantSpec`` or None)."""
    if spec is None:
        return None
    if spec.scheme == "gguf":  # GGUF experts are dequantized at load (loader/gguf_moe.py)
        return None
    if spec.scheme == "fp8":
        return ExpertQuant("fp8")
    if spec.scheme == "fp8_block":
        return ExpertQuant("fp8_block", tuple(spec.config.get("weight_block_size", (128, 128))))
    if spec.scheme in ("awq", "gptq"):  # layers/moe_int4.py
        return ExpertQuant(spec.scheme, group_size=int(spec.config.get("group_size", 128)),
                           zero_offset=int(spec.config.get("zero_offset", 0)))
    if spec.scheme == "bitsandbytes":
        return _bnb_experts(spec)
    raise ValueError(f"MoE models quantized with {spec.scheme!r} are not supported: tessellm "
                     "keeps MoE experts in fp8 (per-tensor, per-channel or block-wise fp8 "
                     "checkpoints, or quantization='fp8' / 'fp8_block' on a dense one), int4 "
                     "(AWQ / GPTQ checkpoints) or bitsandbytes 4-bit; load it with one of those "
                     "or unquantized.")


def _bnb_experts(spec) -> ExpertQuant:
    """bitsandbytes 4-bit experts (``layers/moe_bnb.py``): a checkpoint's, or NF4 on load."""
    from tessellm.layers.moe_bnb import BLOCKSIZE

    if spec.config.get("format") == "bnb8":
        raise ValueError("MoE models in bitsandbytes 8-bit are not supported: tessellm keeps "
                         "bitsandbytes MoE experts in 4-bit; use a 4-bit checkpoint, or the "
                         "dense one with quantization='bitsandbytes'.")
    prequantized = bool(spec.config.get("prequantized", False))
    ckpt = spec.config.get("checkpoint") or {}
    qtype = str(ckpt.get("bnb_4bit_quant_type", "fp4")).lower() if prequantized else "nf4"
    return ExpertQuant("bnb4", group_size=BLOCKSIZE, bnb_type=qtype, prequantized=prequantized)


def allocate(moe, quant: ExpertQuant, num_experts: int, hidden: int) -> None:
    """fp8 ``w13``/``w2`` and their scales on ``moe`` (a ``FusedMoE``; ``moe.local`` is L)."""
    local = moe.local
    if quant.kind == "fp8_block":
        bn, bk = quant.block
        if local % bn or (moe.sliced and local % bk):
            raise ValueError(f"Block-wise fp8 experts need each rank's intermediate size "
                             f"({local} at tensor_parallel_size={moe.tp.size}) to be a multiple "
                             f"of the {bn}x{bk} blocks (weight_block_size); use a "
                             "tensor_parallel_size that leaves whole blocks per rank.")
        s13 = (2 * local // bn, scale_shape(1, hidden, quant.block)[1])
        s2 = scale_shape(hidden, local, quant.block)
    else:
        s13, s2 = (2 * local,), (hidden,)
    fp8 = quant.fp8_dtype
    param = lambda *shape, dtype: torch.nn.Parameter(  # noqa: E731
        torch.ones(*shape, dtype=dtype), requires_grad=False)
    moe.w13 = param(num_experts, 2 * local, hidden, dtype=fp8)
    moe.w2 = param(num_experts, hidden, local, dtype=fp8)
    moe.w13_scale = param(num_experts, *s13, dtype=torch.float32)
    moe.w2_scale = param(num_experts, *s2, dtype=torch.float32)


def load(moe, expert: int, name: str, shard: Optional[int], attr: str, src, start: int,
         where: str) -> list[str]:
    """One checkpoint tensor of ``expert``'s projection into ``moe`` (``name`` "w13" with
    ``shard`` 0 gate / 1 up, or "w2"); ``src`` is this rank's slice of a weight (rows
    ``start..`` for w13, columns for w2) or the whole scale tensor. Returns the parameters
    filled; records which codes still wait for their scale (``missing_scales``)."""
    quant, local = moe.quant, moe.local
    rows = slice(0, None) if name == "w2" else slice(shard * local, (shard + 1) * local)
    key = (expert, name, shard)
    if attr == "input_scale":
        return []
    if attr == "weight":
        codes = getattr(moe, name).data[expert, rows]
        if src.dtype in FP8_DTYPES:
            _check_shape(codes, src, where)
            codes.copy_(src)
            moe.awaiting_scale.add(key)
            return [name]
        _check_shape(codes, src, where)  # a float expert: quantized here
        if quant.kind == "fp8":
            seg = quantize_fp8(src.float(), codes.dtype)
            q, s = seg.qweight, seg.scales
        else:
            q, s = quantize_block_tensors(src.float(), quant.block, codes.dtype)
        codes.copy_(q)
        _scale_rows(moe, name, expert, shard).copy_(s)
        return [name, f"{name}_scale"]
    want = "weight_scale_inv" if quant.kind == "fp8_block" else "weight_scale"
    if attr != want:
        raise ValueError(f"{where}.{attr} does not belong in a {quant.kind} checkpoint (its "
                         f"experts carry {want}); does the quantization_config match the "
                         "weights?")
    dst = _scale_rows(moe, name, expert, shard)
    src = src.float()
    if quant.kind == "fp8":
        src = src.reshape(-1)
        if src.numel() == 1:
            src = src.expand(dst.shape)  # per tensor: every row of this projection
        elif name == "w13":
            src = src[start:start + local]  # per channel: this rank's rows
    else:
        bn, bk = quant.block
        src = (src[start // bn:(start + local) // bn] if name == "w13"
               else src[:, start // bk:start // bk + dst.shape[1]])
    _check_shape(dst, src, f"{where}.{attr}")
    dst.copy_(src)
    moe.awaiting_scale.discard(key)
    return [f"{name}_scale"]


def missing_scales(moe, prefix: str) -> None:
    """Refuse fp8 codes whose scale the checkpoint never gave (they would read as scale 1),
    int4 experts missing a tensor (``moe_int4.missing``)."""
    if moe.quant is not None and moe.quant.kind in ("awq", "gptq"):
        from tessellm.layers import moe_int4

        return moe_int4.missing(moe, prefix)
    if moe.awaiting_scale:
        expert, name, shard = sorted(moe.awaiting_scale, key=str)[0]
        expert = moe.expert_ids[expert]  # the global id (expert parallelism: rows are local)
        part = {("w13", 0): "gate", ("w13", 1): "up", ("w2", None): "down"}[(name, shard)]
        attr = "weight_scale_inv" if moe.quant.kind == "fp8_block" else "weight_scale"
        raise ValueError(f"The checkpoint has fp8 {part} weights of expert {expert} in "
                         f"{prefix} but no {attr} for them; is it complete?")


def init_dummy(moe, generator: torch.Generator, scale: float) -> None:
    """Random experts (``load_format="dummy"``): uniform values quantized like a checkpoint's."""
    if moe.quant.kind in ("awq", "gptq"):
        from tessellm.layers import moe_int4

        return moe_int4.init_dummy(moe, generator, scale)
    if moe.quant.kind == "bnb4":
        from tessellm.layers import moe_bnb

        return moe_bnb.init_dummy(moe, generator, scale)
    for e in range(moe.w13.shape[0]):
        for name, shard in (("w13", 0), ("w13", 1), ("w2", None)):
            rows = getattr(moe, name).data[e, slice(None) if shard is None else
                                           slice(shard * moe.local, (shard + 1) * moe.local)]
            w = torch.empty(rows.shape, device=rows.device).uniform_(-scale, scale,
                                                                     generator=generator)
            load(moe, e, name, shard, "weight", w, 0, "dummy")


def _scale_rows(moe, name: str, expert: int, shard: Optional[int]) -> torch.Tensor:
    scales = getattr(moe, f"{name}_scale").data[expert]
    if name == "w2":
        return scales
    per = scales.shape[0] // 2
    return scales[shard * per:(shard + 1) * per]


def _check_shape(dst: torch.Tensor, src: torch.Tensor, where: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{where} has shape {tuple(src.shape)} on this rank, which does not fit "
                         f"{tuple(dst.shape)}; the config does not match the weights.")
