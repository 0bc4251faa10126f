"""Weight-only quantized GEMMs through intel-extension-for-pytorch (IPEX's WOQ linear).

The engine's quantization methods (``tessellm/quantization``) hold packed weights and call a
``QuantOps``; this one hands int8 and int4 segments to IPEX::

    int8  qweight int8 [N, K], scales [G, N]    ->  weight_only_qlinear_prepack(q, INT8,
                                                     scales [N] (per channel) or [N, G])
    int4  qweight int32 [K/8, N] (GPTQ packing), ->  weight_only_qlinear_prepack_int4(
          scales [G, N], zero point, offsets        uint8 [N, K/2] (low nibble first),
                                                     scales [N, G], zero points [N, G], PLAIN)
    then  torch.ops.torch_ipex.ipex_woq_linear(x, context)

Each segment is prepacked once, on its first GEMM (the context lives on the segment module),
with ``lowp_mode=NONE``: the GEMM runs in the activations' dtype (float32 stays float32, the
tolerance of the torch reference). IPEX's CPU WOQ kernels run here; on an Intel GPU (``xpu``
tensors) IPEX has other WOQ entry points this does not call: those segments, int4 with
act-order (``perm``) and fp8/gguf go through the device-agnostic torch ops instead.
``calls`` counts the GEMMs each path ran (the lane test reads it).
"""

from __future__ import annotations

import collections
from typing import Optional

import torch

from tessellm.backends.reference.quant_ops import TorchQuantOps, _finish
from tessellm.quantization.packed import Int4Weight, Int8Weight


def ipex_woq_available() -> bool:
    try:
        import intel_extension_for_pytorch  # noqa: F401

        return hasattr(torch.ops.torch_ipex, "ipex_woq_linear")
    except Exception:  # noqa: BLE001 - absent or broken IPEX: the torch ops
        return False


class IpexQuantOps(TorchQuantOps):
    name = "ipex-woq"
    schemes = TorchQuantOps.schemes | {"awq", "gptq"}  # int4 through IPEX (torch fallback)

    def __init__(self):
        self.calls: collections.Counter = collections.Counter()  # "int8-ipex", "int4-torch", ...

    def int8_mm(self, x: torch.Tensor, w: Int8Weight, bias=None) -> torch.Tensor:
        ctx = _context(w, x, _prepack_int8)
        if ctx is None:
            self.calls["int8-torch"] += 1
            return super().int8_mm(x, w, bias)
        self.calls["int8-ipex"] += 1
        return _finish(torch.ops.torch_ipex.ipex_woq_linear(x, ctx.get_data_handle()), x.dtype, bias)

    def int4_mm(self, x: torch.Tensor, w: Int4Weight, bias=None) -> torch.Tensor:
        ctx = _context(w, x, _prepack_int4) if w.perm is None else None
        if ctx is None:
            self.calls["int4-torch"] += 1
            return super().int4_mm(x, w, bias)
        self.calls["int4-ipex"] += 1
        return _finish(torch.ops.torch_ipex.ipex_woq_linear(x, ctx.get_data_handle()), x.dtype, bias)


def _context(w, x: torch.Tensor, prepack) -> Optional[object]:
    """The segment's prepacked IPEX context (made on first use), or None off the CPU."""
    if x.device.type != "cpu" or x.dim() != 2:
        return None
    ctx = w.__dict__.get("_ipex_woq")
    if ctx is None:
        ctx = prepack(w)
        w.__dict__["_ipex_woq"] = ctx if ctx is not None else False
    return None if ctx is False else ctx


def _woq_enums():
    from intel_extension_for_pytorch.quantization import WoqActQuantMode, WoqLowpMode, WoqWeightDtype

    return WoqWeightDtype, int(WoqLowpMode.NONE), WoqActQuantMode.NONE


def _prepack_int8(w: Int8Weight):
    dtype, lowp, act = _woq_enums()
    n, k = w.qweight.shape
    per_channel = w.scales.shape[0] == 1
    scales = w.scales[0].float().contiguous() if per_channel else w.scales.t().float().contiguous()
    return torch.ops.ipex_prepack.weight_only_qlinear_prepack(
        w.qweight.contiguous(), dtype.INT8, [n, k], scales, None, None, None, None,
        -1 if per_channel else w.group_size, lowp, act, False)


def _prepack_int4(w: Int4Weight):
    from intel_extension_for_pytorch.nn.modules.weight_only_quantization import WoqWeightFormat

    _, lowp, act = _woq_enums()
    k8, n = w.qweight.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=w.qweight.device)
    q = ((w.qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(k8 * 8, n).t()  # [N, K]
    plain = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).contiguous()  # low nibble first
    scales = w.scales.t().float().contiguous()  # [N, G]
    zeros = torch.full_like(scales, float(w.zero_point))
    if w.offsets is not None:  # (q - z) * s + o == (q - (z - o / s)) * s
        if not scales.ne(0).all():
            return None  # a zero scale with an offset: no zero point says that (torch ops)
        zeros = zeros - w.offsets.t().float() / scales
    group = w.group_size
    if scales.shape[1] == 1:  # one group over K: IPEX takes per-channel as 1-D, group -1
        scales, zeros, group = scales[:, 0].contiguous(), zeros[:, 0].contiguous(), -1
    return torch.ops.ipex_prepack.weight_only_qlinear_prepack_int4(
        plain, scales, zeros, None, None, None, group, lowp, act, False,
        WoqWeightFormat.PLAIN_FORMAT)
