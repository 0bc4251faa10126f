"""tessellm: LLM inference and serving with a paged KV cache and pluggable hardware backends."""

__version__ = "0.1.0"

from tessellm.core.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from tessellm.core.sampling_params import SamplingParams  # noqa: E402
from tessellm.inputs import PromptType, TextPrompt, TokensPrompt  # noqa: E402 - vLLM's top-level names
from tessellm.structured_output.params import StructuredOutputsParams  # noqa: E402


_POOLING_OUTPUTS = ("PoolingRequestOutput", "PoolingOutput", "EmbeddingRequestOutput", "EmbeddingOutput",
                    "ClassificationRequestOutput", "ClassificationOutput", "ScoringRequestOutput",
                    "ScoringOutput")


def __getattr__(name):
    # LLM pulls in the model stack; import it lazily so `import tessellm` stays light.
    if name == "LLM":
        from tessellm.entrypoints.llm import LLM

        return LLM
    if name == "PoolingParams":  # embeddings (tessellm.pooling), as vllm.PoolingParams
        from tessellm.pooling.params import PoolingParams

        return PoolingParams
    if name in ("EngineArgs", "AsyncEngineArgs"):  # vLLM's: its argument names taken, as LLM(...) takes them
        from tessellm.entrypoints import vllm_engine_args

        return vllm_engine_args.VllmEngineArgs if name == "EngineArgs" else vllm_engine_args.VllmAsyncEngineArgs
    if name in ("AsyncLLM", "AsyncLLMEngine"):  # vLLM's: AsyncLLMEngine.from_engine_args(AsyncEngineArgs(...))
        from tessellm.entrypoints.async_llm import AsyncLLM

        return AsyncLLM
    if name == "LLMEngine":
        from tessellm.core.llm_engine import LLMEngine

        return LLMEngine
    if name in _POOLING_OUTPUTS:  # vLLM's top-level names of tessellm.outputs' pooling results
        from tessellm.pooling import outputs

        return getattr(outputs, name)
    if name in ("BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence"):  # as vLLM's
        from tessellm.entrypoints import beam_search

        return getattr(beam_search, name)
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "AsyncLLM", "AsyncLLMEngine", "EngineArgs", "AsyncEngineArgs", "PoolingParams",
           "SamplingParams", "StructuredOutputsParams", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence",
           "RequestOutput", "CompletionOutput", "Logprob", "TextPrompt", "TokensPrompt", "PromptType",
           *_POOLING_OUTPUTS, "__version__"]
