"""Sampling extensions with vLLM v1's module paths (``vllm.v1.sample`` -> ``tessellm.sample``)."""
