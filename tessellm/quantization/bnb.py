"""bitsandbytes checkpoints: the 4-bit (NF4 / FP4) format as it sits on disk and in memory.

A bnb 4-bit weight ``[N, K]`` is quantized over its *flattened* values (row-major), in blocks of
``blocksize`` (64 in transformers' default) consecutive weights, each block with one absmax::

    flat w[j] = code[q[j]] * absmax[j // blocksize]          j = n * K + k

    stored byte i of ``weight`` (uint8 [N*K/2, 1]):  high nibble q[2i], low nibble q[2i+1]

``code`` is the 16-entry table of the type (NF4: normal-float quantiles; FP4: a 1-2-1 float
format), saved as ``weight.quant_map``. With double quantization (``bnb_4bit_use_double_quant``)
the absmaxes are themselves 8-bit: ``absmax[b] = nested_code[a[b]] * nested_absmax[b // 256]
+ offset`` (``weight.absmax`` uint8, ``weight.nested_absmax``, ``weight.nested_quant_map``, the
offset and sizes in the JSON of ``weight.quant_state.bitsandbytes__nf4|fp4``). As vLLM does, the
nested absmaxes are widened to float32 at load (4 bytes a block instead of ~1: at blocksize 64,
0.5 bits a weight instead of 0.13), so every product reads one float32 absmax a block.

``Bnb4Weight`` is the in-memory segment (codes as stored: 4 bits a weight); its ``dequantize``
(and ``dequantize_bnb4``) is the reference the Triton kernel and the tests compare against.
``bnb_stored.py`` gathers a checkpoint's tensors into such segments.
"""

from __future__ import annotations

import json
import math

import torch

from tessellm.quantization.packed import PackedWeight

QUANT_TYPES = ("nf4", "fp4")


class Bnb4Weight(PackedWeight):
    """``qweight`` uint8 ``[N, K/2]`` (the stored bytes, row-major: two weights a byte, the
    first in the high nibble), ``absmax`` float32 ``[ceil(N*K / blocksize)]`` over the flattened
    weight, ``code`` float32 ``[16]`` (the type's table as the checkpoint stores it)."""

    kind = "bnb4"

    def __init__(self, qweight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                 blocksize: int):
        super().__init__()
        n, half = qweight.shape
        assert qweight.dtype == torch.uint8 and code.numel() == 16
        assert absmax.numel() == -(-n * half * 2 // blocksize)
        self.register_buffer("qweight", qweight)
        self.register_buffer("absmax", absmax.float().reshape(-1).contiguous())
        self.register_buffer("code", code.float().reshape(16).contiguous())
        self.blocksize = int(blocksize)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 2

    def dequantize(self, dtype=torch.float32):
        return dequantize_bnb4(self.qweight, self.absmax, self.code, self.blocksize, dtype)

    def can_cat(self, other: PackedWeight) -> bool:
        """Stacking along N keeps the flat blocks whole when this segment's weights fill its
        last block (q/k/v and gate/up shards of a real model: N*K a multiple of 64)."""
        return (other.kind == self.kind and other.blocksize == self.blocksize
                and other.qweight.shape[1] == self.qweight.shape[1]
                and self.qweight.numel() * 2 % self.blocksize == 0
                and torch.equal(other.code, self.code))

    def cat_with(self, other: "Bnb4Weight") -> "Bnb4Weight":
        return Bnb4Weight(torch.cat([self.qweight, other.qweight]),
                          torch.cat([self.absmax, other.absmax]), self.code, self.blocksize)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocksize={self.blocksize}"


def unpack_bnb4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K/2]`` -> codes ``[N, K]`` (uint8 in 0..15), high nibble first."""
    return torch.stack([qweight >> 4, qweight & 0xF], dim=-1).reshape(qweight.shape[0], -1)


def pack_bnb4(q: torch.Tensor) -> torch.Tensor:
    """Codes ``[N, K]`` in 0..15 -> uint8 ``[N, K/2]`` (``unpack_bnb4``'s inverse)."""
    q = q.to(torch.uint8).reshape(q.shape[0], -1, 2)
    return (q[..., 0] << 4) | q[..., 1]


def dequantize_bnb4(qweight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                    blocksize: int, dtype=torch.float32, row0: int = 0) -> torch.Tensor:
    """``code[q] * absmax[j // blocksize]`` in float32, cast to ``dtype``: the ``[n, K]`` weight
    of ``qweight``'s rows, which start at row ``row0`` of the segment ``absmax`` covers."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    flat = unpack_bnb4(qweight).reshape(-1).long()
    j = torch.arange(row0 * k, (row0 + n) * k, device=qweight.device)
    return (code.float()[flat] * absmax.float()[j // blocksize]).reshape(n, k).to(dtype)


def quant_state(raw: torch.Tensor, where: str) -> dict:
    """The JSON of a ``weight.quant_state.bitsandbytes__<type>`` tensor (uint8 bytes), checked:
    a JSON object with a known ``quant_type``, an integer ``blocksize`` of at least 2, a
    ``shape`` of two positive integers and, where given, a positive integer
    ``nested_blocksize`` and a finite number ``nested_offset``."""
    try:
        state = json.loads(bytes(raw.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{where}.weight.quant_state is not the JSON bitsandbytes writes "
                         f"({exc}); is the checkpoint complete?") from None
    if not isinstance(state, dict):
        raise ValueError(f"{where}.weight.quant_state is {type(state).__name__} JSON, not the "
                         "object bitsandbytes writes; is the checkpoint complete?")
    qtype = str(state.get("quant_type", "")).lower()
    shape = state.get("shape")
    if (qtype not in QUANT_TYPES or not _int_at_least(state.get("blocksize"), 2)
            or not isinstance(shape, list) or len(shape) != 2 or not all(_int_at_least(s, 1) for s in shape)):
        raise ValueError(f"{where}.weight.quant_state says quant_type {state.get('quant_type')!r}"
                         f", blocksize {state.get('blocksize')!r}, shape {shape!r}: tessellm "
                         "serves bitsandbytes 4-bit linear weights (nf4 or fp4, an integer "
                         "blocksize, a 2-D shape of positive integers).")
    offset = state.get("nested_offset", 0.0)
    if ("nested_blocksize" in state and not _int_at_least(state["nested_blocksize"], 1)) or not (
            isinstance(offset, (int, float)) and not isinstance(offset, bool) and math.isfinite(offset)):
        raise ValueError(f"{where}.weight.quant_state says nested_blocksize "
                         f"{state.get('nested_blocksize')!r}, nested_offset {offset!r}: bitsandbytes "
                         "writes a positive integer and a number; is the checkpoint complete?")
    return state


def _int_at_least(value, least: int) -> bool:
    """``value`` is a JSON integer (not a bool) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def widen_absmax(pieces: dict, state: dict, where: str) -> torch.Tensor:
    """The float32 absmax of each block: as stored, or for a double-quantized weight
    ``nested_code[a] * nested_absmax[b // nested_blocksize] + offset``."""
    absmax = pieces["absmax"]
    if absmax.dtype != torch.uint8:
        return absmax.float().reshape(-1)
    missing = [p for p in ("nested_absmax", "nested_quant_map") if p not in pieces]
    if missing or "nested_blocksize" not in state:
        raise ValueError(f"{where}.weight.absmax is 8-bit (double quantization) but the "
                         f"checkpoint lacks {', '.join(missing) or 'nested_blocksize'} for it; "
                         "is it complete?")
    a = absmax.reshape(-1).long()
    nested_blocks = -(-a.numel() // state["nested_blocksize"])
    nested_absmax, nested_code = pieces["nested_absmax"].reshape(-1), pieces["nested_quant_map"].reshape(-1)
    if nested_absmax.numel() != nested_blocks or nested_code.numel() != 256:
        raise ValueError(f"{where}.weight has {nested_absmax.numel()} nested_absmax values and a "
                         f"nested_quant_map of {nested_code.numel()} entries, but its {a.numel()} "
                         f"8-bit absmaxes in blocks of {state['nested_blocksize']} need "
                         f"{nested_blocks} and 256; is the checkpoint complete?")
    block = torch.arange(a.numel(), device=a.device) // state["nested_blocksize"]
    nested = nested_code.float()[a] * nested_absmax.float()[block]
    return nested + float(state.get("nested_offset", 0.0))


# The code tables bitsandbytes stores as ``weight.quant_map`` (float32 values as saved).
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
            0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
FP4_CODE = (0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5,
            0.1666666716337204, 0.25, -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
            -0.3333333432674408, -0.5, -0.1666666716337204, -0.25)


def quantize_bnb4(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64) -> Bnb4Weight:
    """bnb 4-bit of ``w [N, K]`` in plain torch (tests, the conformance suite): each flat block's
    absmax, each value the nearest entry of the type's table. Same format as bitsandbytes'
    ``quantize_4bit`` (which rounds through midpoints: a value exactly between two entries may
    take the other one); the engine quantizes on load with bitsandbytes itself."""
    n, k = w.shape
    code = torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, device=w.device)
    nb = -(-n * k // blocksize)
    flat = torch.zeros(nb * blocksize, device=w.device)
    flat[:n * k] = w.float().reshape(-1)
    blocks = flat.view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax.clamp(min=1e-30)[:, None]).reshape(-1)[:n * k]
    values, order = code.sort()  # nearest entry: the bucket between midpoints (O(N*K) memory)
    q = order[torch.bucketize(scaled, (values[1:] + values[:-1]) / 2)]
    return Bnb4Weight(pack_bnb4(q.reshape(n, k)), absmax, code, blocksize)
