"""vLLM's ``vllm.engine`` module paths, for scripts written against it (``arg_utils``)."""
