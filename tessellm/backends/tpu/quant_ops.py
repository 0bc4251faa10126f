"""The tpu backend's ``QuantOps``: the reference torch ops, plus AWQ / GPTQ int4 as one traced
dequantize-then-matmul per layer (``reference.quant_ops.int4_mm_whole``).

Every step is traced into one XLA program, so an op's cost is the graph it leaves, not Python
time: the reference ``int4_mm`` loops over slabs of output columns (a handful of ops and an
in-place slice write per slab, dozens per layer), while ``int4_mm_whole`` unpacks the int32
words with shifts and masks, scales each group (``q * s + z``, one fused multiply-add) and
multiplies once. XLA fuses the elementwise chain into the dot's weight operand (on a TPU the
int4 codes are widened to the model dtype tile by tile, in the matmul's prologue), and the
graph is the same for every layer shape. GPTQ act-order gathers ``x[:, perm]`` first (an XLA
gather). torch-xla's own ``quantized_matmul`` takes int4 weights only as unpacked int8 codes
copied to the host on every call, so it is not used.
"""

from __future__ import annotations

from tessellm.backends.reference.quant_ops import TorchQuantOps, int4_mm_whole


class XlaQuantOps(TorchQuantOps):
    name = "xla"
    schemes = TorchQuantOps.schemes | {"awq", "gptq"}

    def int4_mm(self, x, w, bias=None):
        return int4_mm_whole(x, w, bias)
