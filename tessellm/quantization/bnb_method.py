"""The bitsandbytes linear method (scheme ``bitsandbytes``): bnb 4-bit (NF4 / FP4) and 8-bit
(LLM.int8) checkpoints, and 4-bit NF4 quantized on load.

Checkpoint tensors of one layer (``bnb.checkpoint_names`` renames ``weight.<part>`` to
``weight_<part>`` before routing)::

    4-bit   weight uint8 [N*K/2, 1], weight_absmax (float32, or uint8 with double quant),
            weight_quant_map [16], weight_quant_state (JSON bytes: quant_type, blocksize,
            shape, nested_blocksize, nested_offset), weight_nested_absmax, weight_nested_quant_map
    8-bit   weight int8 [N, K], SCB float32 [N] (each row's absmax), weight_format (0: row-major)

A 4-bit weight becomes a ``bnb.Bnb4Weight`` (codes as stored; double-quantized absmaxes widened
to float32, as vLLM does), multiplied by the backend's ``QuantOps.bnb4_mm``; an 8-bit one an
``Int8Weight`` with per-row scale ``SCB / 127`` (``w = q * SCB / 127``), multiplied by
``int8_mm`` (W8A16: the 8-bit checkpoint's weights, without LLM.int8's fp16 outlier columns,
which need the activations and which vLLM drops too). A layer the checkpoint left in float
(``llm_int8_skip_modules``) stays dense.

``quantization="bitsandbytes"`` on a dense checkpoint quantizes each linear to NF4 with double
quantization (blocksize 64; vLLM's defaults) through the ``bitsandbytes`` package's
``quantize_4bit``, then loads the result as a pre-quantized weight. Tensor parallelism: each rank
quantizes its own slice; a pre-quantized 4-bit checkpoint is refused at ``T > 1``
(``loader.model_loader.check_tensor_parallel_quantization``: its blocks run over the flattened
weight, as vLLM refuses); an 8-bit one is split by rows / columns with its row scales.
"""

from __future__ import annotations

import torch

from tessellm.quantization import bnb, sharding
from tessellm.quantization.base import QuantLinearMethod, dense_segment
from tessellm.quantization.packed import Int8Weight

BNB8_FORMATS = {0: "row"}  # weight_format values this method reads (bnb's FORMAT_TO_INT)
INFLIGHT = {"quant_type": "nf4", "blocksize": 64, "double_quant": True}


class BnbMethod(QuantLinearMethod):
    name = "bitsandbytes"
    accepts = ("weight", "SCB", "weight_format") + tuple(f"weight_{p}" for p in bnb.STATE_PARTS)
    checkpoint_names = staticmethod(bnb.checkpoint_names)

    def __init__(self, ops, config=None):
        super().__init__(ops, config)
        self.prequantized = bool(self.config.get("prequantized", False))

    def shard_tensor(self, layer, name, tensor, split):
        """8-bit: the int8 rows / columns and their ``SCB`` rows (as fp8's per-row scales);
        4-bit stored blocks never reach here (refused at ``T > 1`` before loading)."""
        if name in ("SCB", "weight_format"):
            return sharding.fp8(layer, name, tensor, split)
        return sharding.dense(layer, name, tensor, split)

    def _load(self, layer, name, tensor, shard, pieces):
        tensor = tensor.to(layer.quant_device)
        if name != "weight" or tensor.dtype in (torch.uint8, torch.int8):
            pieces[name] = tensor
        elif not tensor.is_floating_point():
            raise ValueError(f"bitsandbytes cannot use {layer.quant_name}.weight stored as "
                             f"{tensor.dtype}: a bnb checkpoint holds uint8 (4-bit) or int8 "
                             "(8-bit) codes, or float weights for layers it left unquantized.")
        elif self.prequantized:
            pieces[name] = dense_segment(tensor, layer)  # a layer the checkpoint skipped
        else:
            self._quantize_shard(layer, tensor, shard)

    def _missing(self, pieces):
        weight = pieces.get("weight")
        if weight is None:
            return ["weight"]
        if not isinstance(weight, torch.Tensor):
            return []
        if weight.dtype == torch.int8:
            return [] if "SCB" in pieces else ["SCB"]
        return [f"weight.{p}" for p in ("absmax", "quant_map", "quant_state")
                if f"weight_{p}" not in pieces]

    def _finish(self, layer, pieces, rows):
        weight = pieces["weight"]
        if not isinstance(weight, torch.Tensor):
            return weight  # dense
        n, k = rows.stop - rows.start, layer.input_size
        if weight.dtype == torch.int8:
            return _int8_segment(layer, pieces, n, k)
        state = bnb.quant_state(pieces["weight_quant_state"], layer.quant_name)
        if list(state["shape"]) != [n, k] or weight.numel() * 2 != n * k:
            raise ValueError(f"{layer.quant_name}.weight is a bnb 4-bit weight of shape "
                             f"{state['shape']} ({weight.numel()} bytes), but the layer takes "
                             f"[{n}, {k}]; does the checkpoint match the model's config?")
        state_parts = {p: pieces[f"weight_{p}"] for p in bnb.STATE_PARTS
                       if f"weight_{p}" in pieces}
        absmax = bnb.widen_absmax(state_parts, state, layer.quant_name)
        return bnb.Bnb4Weight(weight.reshape(n, k // 2), absmax, pieces["weight_quant_map"],
                              int(state["blocksize"]))

    def _quantize_shard(self, layer, w, shard):
        """NF4 with double quantization through the ``bitsandbytes`` package (vLLM's defaults),
        loaded as the checkpoint tensors it would have saved. Without the package:
        NotImplementedError naming it (this method then loads bnb checkpoints only; the engine
        refuses ``quantization="bitsandbytes"`` on a dense checkpoint before building)."""
        try:
            functional = bitsandbytes_functional()
        except ValueError as exc:
            raise NotImplementedError(str(exc)) from None
        q, state = functional.quantize_4bit(
            w.float().contiguous(), blocksize=INFLIGHT["blocksize"],
            quant_type=INFLIGHT["quant_type"], compress_statistics=INFLIGHT["double_quant"])
        saved = {"w.weight": q}
        saved.update((f"w.weight.{k}", v) for k, v in state.as_dict(packed=True).items())
        for name, t in bnb.checkpoint_names(saved.items()):  # "w.weight_absmax", ...
            self.load_weight(layer, name[2:], t, shard)


def _int8_segment(layer, pieces: dict, n: int, k: int) -> Int8Weight:
    fmt = pieces.get("weight_format")
    if fmt is not None and int(fmt.reshape(-1)[0]) not in BNB8_FORMATS:
        raise ValueError(f"{layer.quant_name}.weight_format is {int(fmt.reshape(-1)[0])}, a "
                         "GPU-specific bitsandbytes 8-bit layout; tessellm reads row-major (0) "
                         "8-bit checkpoints: save the model again with a recent bitsandbytes.")
    q, scb = pieces["weight"], pieces["SCB"].float().reshape(-1)
    if tuple(q.shape) != (n, k) or scb.numel() != n:
        raise ValueError(f"{layer.quant_name}: bnb 8-bit weight {tuple(q.shape)} with "
                         f"{scb.numel()} row scales (SCB) does not match the layer's [{n}, {k}].")
    return Int8Weight(q.contiguous(), (scb / 127.0).reshape(1, n), k)


def bitsandbytes_functional():
    """``bitsandbytes.functional``; a ValueError naming the install when it is missing."""
    try:
        import bitsandbytes.functional as functional
    except ImportError:
        raise ValueError("quantization='bitsandbytes' on an unquantized checkpoint quantizes it "
                         "with the bitsandbytes package, which is not installed: pip install "
                         "bitsandbytes (a checkpoint already saved in bnb 4-bit or 8-bit needs "
                         "no package).") from None
    return functional
