"""bitsandbytes 4-bit MoE experts: kept packed (4 bits a weight), multiplied packed by ops that
declare it, else dequantized per routed expert.

In memory, per expert the rows of the float layout (``w13``: gate rows then up rows; L: this
rank's slice of the intermediate size), each row's K inputs as bnb stores them (two codes a
byte, high nibble first) with a float32 absmax per block of ``bs`` inputs of that row, and one
code table (NF4 or FP4) for the layer::

    w13  uint8 [E, 2L, H/2]    w13_absmax float32 [E, 2L, H/bs]
    w2   uint8 [E, H, L/2]     w2_absmax  float32 [E, H, L/bs]       code float32 [16]

    w[e, n, k] = code[q[e, n, k]] * absmax[e, n, k // bs]

A checkpoint's expert projection (``bnb.Bnb4Weight``: blocks over its *flattened* ``[N, K]``)
has exactly these blocks when K is a multiple of ``bs`` (64 in every released model: K is the
hidden or intermediate size), which is required; a rank's part (``w13``'s rows, ``w2``'s
inputs under tensor parallelism) must then be whole blocks too (L a multiple of ``bs``).
Double-quantized absmaxes arrive widened to float32 (``bnb_stored.py``): 4.5 bits a weight.

One step: where the ops declare ``fused_moe_bnb4`` (plugin API 26; every in-tree backend's:
the Triton ones' decode kernels read the codes, ``kernels/moe/decode_bnb4.py``) the layer
hands them the codes,
the absmaxes as ``w13_scale`` / ``w2_scale`` and the table as ``bnb4_code``, as it hands int4
experts over (``fused_applies``; ``TESSELLM_BNB_MOE_FUSED=0`` keeps the path below). Else
(``dense_experts``): route as the contract does; the experts the step routes to, padded to
a fixed count ``U = min(E, T * k)`` (a shape known ahead: no host sync, so graphs can capture
it), are dequantized in the hidden dtype, then the backend's ``fused_experts`` multiplies
them with each routed id renumbered into ``0..U)``::

    ids [T, k] = [[5, 1], [1, 7]]  E = 8   hit = {1, 5, 7}, padded: used = [1, 5, 7, 0]
    renumbered [[1, 0], [0, 2]]            dense w13 [4, 2L, H] = dequant(w13[used])

Expert parallelism: a pair whose expert another rank holds is sent to slot 0 with weight 0.
A decode step dequantizes its ``T * k`` experts; a long prefill every expert of the layer
(the layer's dense experts exist for that step only), a chunk of whole experts at a time
(``CHUNK_ELEMENTS``).
"""

from __future__ import annotations

from typing import Optional

import torch

from tessellm import envs
from tessellm.backends.reference.moe import dequantize_bnb4_experts, local_expert_ids
from tessellm.quantization.bnb import FP4_CODE, NF4_CODE, Bnb4Weight
from tessellm.quantization.bnb_stored import StoredBnb
from tessellm.quantization.sharding import materialize

BLOCKSIZE = 64  # the block size transformers saves (and NF4 on load uses)


def allocate(moe, quant, num_experts: int, hidden: int) -> None:
    """Packed ``w13`` / ``w2``, their absmaxes and the code table on ``moe`` (``moe.local``
    is L); ``quant.group_size`` is the block size, ``quant.kind``'s table from ``quant``."""
    local, bs = moe.local, quant.group_size
    if hidden % bs or local % bs:
        raise ValueError(f"bitsandbytes 4-bit experts need hidden_size {hidden} and each rank's "
                         f"intermediate size ({local} at tensor_parallel_size="
                         f"{moe.tp.size if moe.sliced else 1}) to be multiples of the block "
                         f"size {bs} (each row whole blocks); use a tensor_parallel_size that "
                         "leaves whole blocks per rank, or the dense checkpoint.")

    def param(*shape, dtype):
        return torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)

    moe.w13 = param(num_experts, 2 * local, hidden // 2, dtype=torch.uint8)
    moe.w2 = param(num_experts, hidden, local // 2, dtype=torch.uint8)
    moe.w13_absmax = param(num_experts, 2 * local, hidden // bs, dtype=torch.float32)
    moe.w2_absmax = param(num_experts, hidden, local // bs, dtype=torch.float32)
    table = FP4_CODE if quant.bnb_type == "fp4" else NF4_CODE
    moe.register_buffer("code", torch.tensor(table, dtype=torch.float32))


def load(moe, expert: int, name: str, shard: Optional[int], attr: str, tensor, start: int,
         where: str) -> list[str]:
    """One checkpoint weight of ``expert``'s projection (``name`` "w13" with ``shard`` 0
    gate / 1 up, or "w2"): a ``StoredBnb`` (pre-quantized) or a float tensor (quantized here,
    NF4 on load); this rank's rows of w13 / inputs of w2 from ``start``. Returns the
    parameters filled."""
    if attr != "weight":
        raise ValueError(f"{where}.{attr} has no place in bitsandbytes 4-bit experts (each "
                         "projection is a weight with its quantization state); is the "
                         "quantization_config right for these weights?")
    quantized = isinstance(tensor, StoredBnb) or moe.quant.prequantized
    if moe.sliced and not quantized:  # a float expert: this rank's part, quantized below
        tensor = tensor.narrow(0 if name == "w13" else 1, start, moe.local)
    seg = _segment(moe, tensor, where)
    k, bs = seg.in_features, seg.blocksize
    if bs != moe.quant.group_size or k % bs or not torch.equal(seg.code.cpu(), moe.code.cpu()):
        raise ValueError(f"{where} is bitsandbytes 4-bit in blocks of {bs} over rows of {k} "
                         f"inputs; tessellm keeps a layer's experts in blocks of "
                         f"{moe.quant.group_size} within each row and one quant type "
                         f"({moe.quant.bnb_type}); this checkpoint's experts are stored "
                         "otherwise: load the dense checkpoint.")
    if moe.sliced and quantized:
        stored = StoredBnb(where, seg)
        seg = (stored.narrow(0, start, moe.local) if name == "w13"
               else stored.narrow(1, start, moe.local)).seg
    rows = slice(None) if name == "w2" else slice(shard * moe.local, (shard + 1) * moe.local)
    codes = getattr(moe, name).data[expert, rows]
    absmax = getattr(moe, f"{name}_absmax").data[expert, rows]
    if tuple(codes.shape) != tuple(seg.qweight.shape):
        raise ValueError(f"{where} has shape [{seg.out_features}, {seg.in_features}] on this "
                         f"rank, which does not fit [{codes.shape[0]}, {codes.shape[1] * 2}]; "
                         "the config does not match the weights.")
    codes.copy_(seg.qweight)
    absmax.copy_(seg.absmax.view(absmax.shape))
    return [name, f"{name}_absmax"]


def _segment(moe, tensor, where: str) -> Bnb4Weight:
    """The 4-bit segment of a checkpoint weight: as stored, or NF4 of a float one on load."""
    if isinstance(tensor, StoredBnb):
        if not isinstance(tensor.seg, Bnb4Weight):
            raise ValueError(f"{where} is bitsandbytes 8-bit; tessellm serves bitsandbytes MoE "
                             "experts in 4-bit only: use a 4-bit checkpoint or the dense one "
                             "with quantization='bitsandbytes'.")
        return tensor.seg
    if moe.quant.prequantized:
        raise ValueError(f"{where} is stored unquantized in a bitsandbytes 4-bit checkpoint "
                         "whose quantization_config does not leave this layer's experts float "
                         "(llm_int8_skip_modules); a layer's experts must be all 4-bit or all "
                         "float: list them there, or load the dense checkpoint with "
                         "quantization='bitsandbytes'.")
    from tessellm.quantization.bnb_method import quantize_on_load

    # on the layer's device: on the CPU it took ~0.1 s an expert projection (18k of them in
    # Qwen3-30B-A3B: the load did not finish)
    return quantize_on_load(materialize(tensor).float(), moe.w13.device)


def fused_applies(ops) -> bool:
    """Whether the layer passes its packed experts to ``ops``' bnb4 variant: declared
    (``fused_moe_bnb4``) and not turned off (``TESSELLM_BNB_MOE_FUSED=0``)."""
    return bool(getattr(ops, "fused_moe_bnb4", False)) and envs.bnb_moe_fused() is not False


def dense_experts(moe, weights: torch.Tensor, topk_ids: torch.Tensor, dtype):
    """``(weights, ids, w13, w2)``: the routed experts dequantized in ``dtype`` and the
    routing renumbered into them (module docstring)."""
    ids = local_expert_ids(topk_ids, moe.expert_map).long()
    num = moe.w13.shape[0]
    count = min(num, ids.numel())
    flat = torch.where(ids >= 0, ids, num).reshape(-1)
    hit = torch.zeros(num + 1, dtype=torch.int32, device=ids.device).scatter_(0, flat, 1)
    used = torch.sort(hit[:num], descending=True, stable=True).indices[:count]
    slot = torch.zeros(num + 1, dtype=torch.long, device=ids.device)
    slot.scatter_(0, used, torch.arange(count, device=ids.device))
    weights = torch.where(ids >= 0, weights, torch.zeros_like(weights))
    w13 = dequantize(moe.w13, moe.w13_absmax, moe.code, used, dtype)
    w2 = dequantize(moe.w2, moe.w2_absmax, moe.code, used, dtype)
    return weights, slot[flat].view(ids.shape), w13, w2


# float32 products of one dequantization chunk at most in flight (~13 bytes an element with
# the unpacked codes): whole experts, at least one (Qwen3-30B-A3B: a decode step's 8 experts in
# one chunk of w13, not one Python iteration and ~10 launches per expert and layer)
CHUNK_ELEMENTS = 1 << 25


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               used: torch.Tensor, dtype) -> torch.Tensor:
    """Experts ``used`` of ``codes [E, N, K/2]`` as ``dtype`` ``[U, N, K]``, as many experts at
    a time as ``CHUNK_ELEMENTS`` holds (a fixed count per shape: no host sync)."""
    count, n, half = used.numel(), codes.shape[1], codes.shape[2]
    out = torch.empty(count, n, 2 * half, dtype=dtype, device=codes.device)
    step = max(1, CHUNK_ELEMENTS // max(1, 2 * n * half))
    for u in range(0, count, step):
        ids = used[u:u + step]
        out[u:u + step] = dequantize_bnb4_experts(codes.index_select(0, ids),
                                                  absmax.index_select(0, ids), code, dtype)
    return out


def init_dummy(moe, generator: torch.Generator, scale: float) -> None:
    """Random experts (``load_format="dummy"``): random codes of the layer's table with each
    block's absmax uniform in ``[scale / 2, scale]`` (values within ``[-scale, scale]``), drawn
    for all experts at once (quantizing a float tensor per expert took minutes at 128 experts
    and 48 layers)."""
    for name in ("w13", "w2"):
        codes, absmax = getattr(moe, name).data, getattr(moe, f"{name}_absmax").data
        codes.copy_(torch.randint(0, 256, codes.shape, generator=generator,
                                  device=codes.device, dtype=torch.uint8))
        absmax.uniform_(scale / 2, scale, generator=generator)
