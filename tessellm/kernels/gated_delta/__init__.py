"""The gated delta rule (gated DeltaNet: Qwen3-Next's linear attention) in Triton for the Triton
backends (cuda, rocm): what ``TritonOps.gated_delta_*`` run. ``step.py``: one token per
decoding request; ``chunk.py``: prefill chunks, a chunk of tokens at a time in the WY form;
``verify.py``: speculative decoding's verify sequences, keeping the state after every token.
The causal conv1d before them is the Mamba one (``kernels/mamba/conv1d.py``). Oracles:
``backends/reference/gated_delta.py``.
"""

from tessellm.kernels.gated_delta.chunk import gated_delta_chunk
from tessellm.kernels.gated_delta.step import gated_delta_step
from tessellm.kernels.gated_delta.verify import gated_delta_verify

__all__ = ["gated_delta_chunk", "gated_delta_step", "gated_delta_verify"]
