"""Speculative decoding: proposers draft tokens, the target verifies them in one pass.

``config``: SpeculativeConfig and the load policy; ``proposer``: the interface the model runner
calls after each step (docs/speculative_decoding.md); ``ngram`` / ``replay``: the model-free
proposers; ``rejection``: the exact rejection sampler; ``metrics``: vLLM-style counters.
"""

from tessellm.spec_decode.config import SpeculativeConfig, parse_speculative_config  # noqa: F401
