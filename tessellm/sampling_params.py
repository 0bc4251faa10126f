"""vLLM's ``vllm.sampling_params`` names, for code written against it:
``from tessellm.sampling_params import SamplingParams, StructuredOutputsParams``."""

from tessellm.core.sampling_params import SamplingParams
from tessellm.structured_output.params import StructuredOutputsParams

__all__ = ["SamplingParams", "StructuredOutputsParams"]
