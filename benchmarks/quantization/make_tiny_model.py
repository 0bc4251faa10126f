"""Write a tiny random Llama with the bundled SmolLM2 tokenizer: a GPU accuracy test subject.

    python benchmarks/quantization/make_tiny_model.py OUT_DIR [--config-only]

``--config-only`` writes config and tokenizer (a few MB, to carry to a device machine); run it
again there without the flag to add the weights (seed 0, so every run makes the same model).
"""

from __future__ import annotations

import argparse
import os

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--config-only", action="store_true")
    args = p.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if not os.path.exists(os.path.join(args.out, "config.json")):
        from tessellm.loader.default_model import default_model_path
        from tessellm.loader.gguf_loader import load_gguf_tokenizer

        load_gguf_tokenizer(default_model_path()).save_pretrained(args.out)
        LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                    tie_word_embeddings=True, architectures=["LlamaForCausalLM"], bos_token_id=1,
                    eos_token_id=2, initializer_range=0.05).save_pretrained(args.out)
    if not args.config_only:
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(args.out)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(args.out)


if __name__ == "__main__":
    main()
