"""Embedding models: pooling mode of the engine (docs/pooling.md).

config.py   which runner the engine is; PoolerConfig (type, normalize) from the checkpoint/flags
pooler.py   the runner side: hidden states of a step -> pooled vectors (LAST, MEAN, CLS)
params.py   PoolingParams per request (dimensions, normalize, truncation), applied in the front end
outputs.py  PoolingRequestOutput / EmbeddingRequestOutput (vLLM's shapes)
"""

from tessellm.pooling.config import PoolerConfig
from tessellm.pooling.outputs import (EmbeddingOutput, EmbeddingRequestOutput, PoolingOutput,
                                      PoolingRequestOutput)
from tessellm.pooling.params import PoolingParams

__all__ = ["EmbeddingOutput", "EmbeddingRequestOutput", "PoolerConfig", "PoolingOutput",
           "PoolingParams", "PoolingRequestOutput"]
