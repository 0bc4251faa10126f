"""vLLM's ``vllm.pooling_params`` path: ``from tessellm.pooling_params import PoolingParams``."""

from tessellm.pooling.params import PoolingParams

__all__ = ["PoolingParams"]
