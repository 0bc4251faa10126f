"""vLLM's result types (``vllm.outputs``), for code written against it:
``from tessellm.outputs import RequestOutput, CompletionOutput, PoolingRequestOutput, ...``."""

from tessellm.core.outputs import CompletionOutput, Logprob, RequestOutput
from tessellm.pooling.outputs import (ClassificationOutput, ClassificationRequestOutput, EmbeddingOutput,
                                      EmbeddingRequestOutput, PoolingOutput, PoolingRequestOutput,
                                      ScoringOutput, ScoringRequestOutput)

__all__ = ["RequestOutput", "CompletionOutput", "Logprob", "PoolingRequestOutput", "PoolingOutput",
           "EmbeddingRequestOutput", "EmbeddingOutput", "ClassificationRequestOutput",
           "ClassificationOutput", "ScoringRequestOutput", "ScoringOutput"]
