"""The bitsandbytes linear method (scheme ``bitsandbytes``): bnb 4-bit (NF4 / FP4) and 8-bit
(LLM.int8) checkpoints, and 4-bit NF4 quantized on load.

The loader hands each quantized weight over whole, its state gathered with it
(``bnb_stored.stored_weights``, this method's ``checkpoint_names``): a ``StoredBnb`` holding a
``bnb.Bnb4Weight`` (the stored codes, 4 bits a weight; double-quantized absmaxes widened to
float32, as vLLM does) multiplied by the backend's ``QuantOps.bnb4_mm``, or an ``Int8Weight``
with per-row scale ``SCB / 127`` (``w = q * SCB / 127``) multiplied by ``int8_mm`` (W8A16: the
8-bit checkpoint's weights, without LLM.int8's fp16 outlier columns, which need the
activations and which vLLM does not run either). A layer the checkpoint left in float
(``llm_int8_skip_modules``) stays dense.

``quantization="bitsandbytes"`` on a dense checkpoint quantizes each linear to NF4 with double
quantization (blocksize 64; vLLM's defaults) through the ``bitsandbytes`` package's
``quantize_4bit``, then loads the result as a pre-quantized weight. Tensor parallelism: each rank
quantizes its own slice on load; a pre-quantized checkpoint is cut as stored (``shard_tensor``):
8-bit by rows / columns with its row scales, 4-bit by rows or whole blocks of input columns
(vLLM refuses pre-quantized bnb at ``T > 1``).
"""

from __future__ import annotations

import torch

from tessellm.quantization import sharding
from tessellm.quantization.base import QuantLinearMethod, dense_segment
from tessellm.quantization.bnb import Bnb4Weight
from tessellm.quantization.bnb_stored import StoredBnb, inputs, stored_weights

INFLIGHT = {"quant_type": "nf4", "blocksize": 64, "double_quant": True}


class BnbMethod(QuantLinearMethod):
    name = "bitsandbytes"
    checkpoint_names = staticmethod(stored_weights)  # applied by quantization.loading

    def __init__(self, ops, config=None):
        super().__init__(ops, config)
        self.prequantized = bool(self.config.get("prequantized", False))

    def shard_tensor(self, layer, name, tensor, split):
        """A stored bnb weight: this rank's rows or input columns (``bnb_stored.py`` draws the
        cut); a 4-bit one whose rank part does not hold whole blocks is refused naming the
        layer. Anything else (a float weight, a bias) as dense."""
        if not isinstance(tensor, StoredBnb):
            return sharding.dense(layer, name, tensor, split)
        seg = tensor.seg
        if isinstance(seg, Bnb4Weight):
            k, bs = seg.in_features, seg.blocksize
            what = f"blocks of {bs} flattened weights of bitsandbytes 4-bit ({k} inputs a row)"
            if k % bs:
                raise ValueError(f"{sharding._where(layer, split)}: its {what} span rows, so no "
                                 "rank's rows or columns hold whole blocks; use "
                                 "tensor_parallel_size=1 (or pipeline_parallel_size).")
            if split.dim == 1:
                sharding._check_groups(layer, split, bs, what)
        return tensor.narrow(split.dim, split.start, split.size)

    def _load(self, layer, name, tensor, shard, pieces):
        if isinstance(tensor, StoredBnb):
            pieces[name] = tensor.seg.to(layer.quant_device)
        elif not tensor.is_floating_point():
            raise ValueError(f"bitsandbytes cannot use {layer.quant_name}.weight stored as "
                             f"{tensor.dtype} without its quantization state (weight.absmax, "
                             "weight.quant_state... or SCB); is the checkpoint complete?")
        elif self.prequantized:
            pieces[name] = dense_segment(tensor, layer)  # a layer the checkpoint skipped
        else:
            self._quantize_shard(layer, tensor, shard)

    def _finish(self, layer, pieces, rows):
        seg = pieces["weight"]
        k = inputs(seg)
        if k != layer.input_size:
            raise ValueError(f"{layer.quant_name}.weight is a bitsandbytes weight of "
                             f"[{seg.out_features}, {k}], but the layer takes "
                             f"[{rows.stop - rows.start}, {layer.input_size}]; does the "
                             "checkpoint match the model's config?")
        return seg

    def _quantize_shard(self, layer, w, shard):
        """NF4 with double quantization (``quantize_on_load``), loaded as the checkpoint it
        would have saved. Without the package: NotImplementedError naming it (this method then
        loads bnb checkpoints only; the engine refuses ``quantization="bitsandbytes"`` on a
        dense checkpoint before building)."""
        try:
            seg = quantize_on_load(w, layer.quant_device)
        except ValueError as exc:
            raise NotImplementedError(str(exc)) from None
        self.load_weight(layer, "weight", StoredBnb("weight", seg), shard)


def quantize_on_load(w, device=None) -> Bnb4Weight:
    """``w [N, K]`` in NF4 with double quantization through the ``bitsandbytes`` package
    (vLLM's defaults, ``INFLIGHT``), as the checkpoint it would have saved reads back (absmaxes
    widened to float32); a ValueError naming the install when the package is missing. On
    ``device`` (the layer's: bitsandbytes on the CPU takes ~0.1 s a million weights, minutes for
    a model's checkpoint tensors read there), or on the CPU where the package has no kernels for
    it."""
    if device is not None and torch.device(device) != w.device:
        try:
            return quantize_on_load(w.to(device))
        except (RuntimeError, NotImplementedError):  # no kernels for that device: the CPU
            w = w.cpu()
    functional = bitsandbytes_functional()
    q, state = functional.quantize_4bit(
        w.float().contiguous(), blocksize=INFLIGHT["blocksize"],
        quant_type=INFLIGHT["quant_type"], compress_statistics=INFLIGHT["double_quant"])
    saved = [("w.weight", q)]
    saved += [(f"w.weight.{k}", v) for k, v in state.as_dict(packed=True).items()]
    ((_, stored),) = list(stored_weights(saved))
    return stored.seg


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
