"""Block-wise fp8 ("fine-grained fp8"): the format of Qwen3-*-FP8 and DeepSeek-V3/R1 checkpoints.

A weight ``[N, K]`` is stored as e4m3 codes with one float32 scale per ``bn x bk`` block
(``weight_block_size = [bn, bk]``, [128, 128] in every released checkpoint), the checkpoint
tensor ``weight_scale_inv [ceil(N/bn), ceil(K/bk)]``. Despite its name the scale multiplies::

    w[n, k] = q[n, k] * s[n // bn, k // bk]

        K ->   0 .. bk-1 | bk .. 2bk-1 | ... | (last block may be short)
    N   0     s[0, 0]    | s[0, 1]     |
    |   ..
    v   bn    s[1, 0]    | s[1, 1]     |

Activations (W8A8, DeepSeek's and vLLM's form) are quantized per token and per group of ``bk``
inputs, so each K block of a row has its own scale and the product of one block pair is exact
in float32 before both scales multiply it::

    y[m, n] = sum over K blocks j of  sx[m, j] * s[n // bn, j] * sum_{k in j} qx[m, k] q[n, k]

``Fp8BlockWeight`` is the in-memory segment; ``dequantize_block`` and the quantizers here are the
reference the kernels and tests compare against.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch

from tessellm.quantization.packed import PackedWeight, cat_rows

FP8_E4M3_MAX = 448.0
BLOCK_K_RANGE = (16, 1024)  # the input block must be a power of two in this range (kernels' tile)


def check_block_size(block, where: str = "weight_block_size") -> tuple[int, int]:
    """``[bn, bk]`` as ints; ValueError naming the fix when the kernels cannot run it: ``bk``
    (the input block, also the activation group) a power of two in 16..1024, ``bn`` >= 1."""
    try:
        bn, bk = (int(v) for v in block)
    except (TypeError, ValueError):
        raise ValueError(f"{where} {block!r} must be two integers [rows, inputs], e.g. "
                         "[128, 128].") from None
    lo, hi = BLOCK_K_RANGE
    if bn < 1 or bk < lo or bk > hi or bk & (bk - 1):
        raise ValueError(f"{where} [{bn}, {bk}] is not supported: the input block (second "
                         f"value) must be a power of two from {lo} to {hi} and the row block "
                         "positive, as in the released checkpoints' [128, 128]; requantize the "
                         "checkpoint with such a block size.")
    return bn, bk


def scale_shape(n: int, k: int, block: tuple[int, int]) -> tuple[int, int]:
    return -(-n // block[0]), -(-k // block[1])


class Fp8BlockWeight(PackedWeight):
    """``qweight`` fp8 ``[N, K]`` and ``scales`` float32 ``[ceil(N/bn), ceil(K/bk)]``."""

    kind = "fp8_block"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]):
        super().__init__()
        block = (int(block[0]), int(block[1]))
        assert qweight.dim() == 2 and tuple(scales.shape) == scale_shape(*qweight.shape, block)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.float().contiguous())
        self.block = block

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def dequantize(self, dtype=torch.float32):
        return dequantize_block(self.qweight, self.scales, self.block, dtype)

    def can_cat(self, other: PackedWeight) -> bool:
        """Stacking along N keeps every block whole only when this segment's rows end on a
        block boundary (q/k/v of 4096/1024/1024 rows do; a short last block would not)."""
        return (other.kind == self.kind and other.block == self.block
                and other.qweight.dtype == self.qweight.dtype
                and other.qweight.shape[1] == self.qweight.shape[1]
                and self.qweight.shape[0] % self.block[0] == 0)

    def cat_with(self, other: "Fp8BlockWeight") -> "Fp8BlockWeight":
        return Fp8BlockWeight(cat_rows([self.qweight, other.qweight]),
                              torch.cat([self.scales, other.scales]), self.block)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block={list(self.block)}"


def expand_scales(scales: torch.Tensor, n: int, k: int, block: tuple[int, int]) -> torch.Tensor:
    """Block scales ``[..., Nb, Kb]`` -> one per weight ``[..., n, k]`` (float32)."""
    s = scales.float().repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return s[..., :n, :k]


def dequantize_block(qweight: torch.Tensor, scales: torch.Tensor, block: tuple[int, int],
                     dtype=torch.float32) -> torch.Tensor:
    """``q * s`` per block, in float32, then cast to ``dtype``. Works on stacked experts
    (``[E, N, K]`` with ``[E, Nb, Kb]``) too."""
    n, k = qweight.shape[-2:]
    return (qweight.float() * expand_scales(scales, n, k, block)).to(dtype)


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = (128, 128),
                       fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> Fp8BlockWeight:
    """Block-wise fp8 of ``w [N, K]``: each block's scale is its amax / 448 (DeepSeek's
    ``weight_quant``), blocks of zeros get scale 1."""
    q, s = quantize_block_tensors(w, block, fp8_dtype)
    return Fp8BlockWeight(q, s, block)


def quantize_block_tensors(w: torch.Tensor, block: tuple[int, int] = (128, 128),
                           fp8_dtype: torch.dtype = torch.float8_e4m3fn):
    """``(codes [.., N, K] fp8, scales [.., Nb, Kb] float32)``: what a checkpoint stores as
    ``weight`` and ``weight_scale_inv``."""
    n, k = w.shape[-2:]
    bn, bk = block
    nb, kb = scale_shape(n, k, block)
    fmax = torch.finfo(fp8_dtype).max
    padded = torch.zeros(*w.shape[:-2], nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[..., :n, :k] = w.float()
    tiles = padded.unflatten(-2, (nb, bn)).unflatten(-1, (kb, bk))  # [.., nb, bn, kb, bk]
    amax = tiles.abs().amax(dim=(-3, -1))  # [.., nb, kb]
    scales = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    q = tiles / scales[..., :, None, :, None]
    q = q.clamp(-fmax, fmax).flatten(-4, -3).flatten(-2, -1)[..., :n, :k].to(fp8_dtype)
    return q.contiguous(), scales


def quantize_per_token_group(x: torch.Tensor, group: int,
                             fp8_dtype: torch.dtype = torch.float8_e4m3fn):
    """Dynamic activation quantization, DeepSeek's ``act_quant``: each row's inputs in groups of
    ``group`` (the weight's ``bk``), scale ``max(amax, 1e-12) / 448`` per group. Returns
    ``(qx [M, K] fp8, scales [M, ceil(K/group)] float32)``; a short last group is padded with
    zeros for its amax."""
    m, k = x.shape
    g = -(-k // group)
    fmax = torch.finfo(fp8_dtype).max
    padded = torch.zeros(m, g * group, dtype=torch.float32, device=x.device)
    padded[:, :k] = x.float()
    tiles = padded.view(m, g, group)
    scales = tiles.abs().amax(dim=-1).clamp(min=1e-12) / fmax
    q = (tiles / scales[..., None]).clamp(-fmax, fmax).view(m, g * group)[:, :k].to(fp8_dtype)
    return q.contiguous(), scales


def w8a8_block_reference(x: torch.Tensor, w: Fp8BlockWeight, bias=None) -> torch.Tensor:
    """The W8A8 product's oracle: x quantized per token and group of ``bk``, then
    ``sum_j sx[m, j] * s[n, j] * (qx_j @ q_j.T)`` in float32, in x's dtype (+ bias)."""
    bn, bk = w.block
    n, k = w.qweight.shape
    qx, sx = quantize_per_token_group(x, bk, w.qweight.dtype)
    sw = expand_scales(w.scales, n, k, w.block)[:, ::bk]  # [N, Kb]: one per row and K block
    out = torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device)
    for j in range(sx.shape[1]):
        cols = slice(j * bk, min(k, (j + 1) * bk))
        part = qx[:, cols].float() @ w.qweight[:, cols].float().t()
        out += part * sx[:, j:j + 1] * sw[None, :, j]
    out = out.to(x.dtype)
    return out if bias is None else out + bias


def dequantized_stream(weights: Iterable[tuple[str, object]], block: Optional[tuple[int, int]],
                       wanted) -> Iterator[tuple[str, object]]:
    """Checkpoint tensors with each fp8 ``<p>.weight`` for which ``wanted(<p>.weight)`` holds
    and its scale turned into one dense float32 ``<p>.weight``: for layers that keep dense
    weights (DeepSeek's MLA projections). The scale is ``weight_scale_inv`` per block
    (``block``), or with ``block`` None ``weight_scale`` per row or per tensor. Each half waits
    for the other, which checkpoints store next to it; everything else passes through."""
    scale_attr = "weight_scale" if block is None else "weight_scale_inv"
    waiting: dict[str, dict] = {}
    for name, tensor in weights:
        prefix, _, attr = name.rpartition(".")
        if attr not in ("weight", scale_attr) or not wanted(f"{prefix}.weight"):
            yield name, tensor
            continue
        tensor = _read(tensor)
        if attr == "weight" and tensor.dtype not in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
            yield name, tensor  # stored dense (a layer the checkpoint left unquantized)
            continue
        pair = waiting.setdefault(prefix, {})
        pair[attr] = tensor
        if len(pair) == 2:
            del waiting[prefix]
            q, s = pair["weight"], pair[scale_attr]
            yield f"{prefix}.weight", (dequantize_block(q, s, block) if block is not None else
                                       q.float() * s.float().reshape(-1, 1))
    if waiting:
        prefix, pair = next(iter(waiting.items()))
        missing = scale_attr if "weight" in pair else "weight"
        raise ValueError(f"The checkpoint has no {prefix}.{missing} for its fp8 {prefix}; is it "
                         "complete?")


def _read(tensor) -> torch.Tensor:
    return tensor.materialize() if hasattr(tensor, "materialize") else tensor


def block_config(spec_config: Optional[dict]) -> tuple[int, int]:
    return tuple((spec_config or {}).get("weight_block_size", (128, 128)))
