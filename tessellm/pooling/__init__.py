"""Embedding models: pooling mode of the engine (docs/pooling.md).

config.py   which runner the engine is; PoolerConfig (type, normalize) from the checkpoint/flags
convert.py  hf_overrides and convert="classify": a *ForCausalLM as a classifier (from-token heads)
pooler.py   the runner side: hidden states of a step -> pooled vectors (LAST, MEAN, CLS), or a
            row per prompt token (token_embed, token_classify)
params.py   PoolingParams per request (task, dimensions, normalize, truncation), applied in the front end
outputs.py  PoolingRequestOutput / EmbeddingRequestOutput / ClassificationRequestOutput /
            ScoringRequestOutput (vLLM's shapes)
score.py    LLM.score / /score / /rerank: cross-encoder pairs (a score template), or cosine of two embeddings
"""

from tessellm.pooling.config import PoolerConfig
from tessellm.pooling.outputs import (ClassificationOutput, ClassificationRequestOutput,
                                      EmbeddingOutput, EmbeddingRequestOutput, PoolingOutput,
                                      PoolingRequestOutput, ScoringOutput, ScoringRequestOutput)
from tessellm.pooling.params import PoolingParams

__all__ = ["ClassificationOutput", "ClassificationRequestOutput", "EmbeddingOutput",
           "EmbeddingRequestOutput", "PoolerConfig", "PoolingOutput", "PoolingParams",
           "PoolingRequestOutput", "ScoringOutput", "ScoringRequestOutput"]
