"""Weight and config loading: safetensors directories, GGUF files, dummy (random) weights."""
