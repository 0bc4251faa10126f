"""What a Gemma 3 GGUF (llama.cpp's ``gemma3`` architecture, text only) needs beyond the llama
mapping: its config, its four norms per layer, and a chat template where the file has none.

llama.cpp stores every Gemma norm as ``1 + w``; the loader yields ``w`` under HF names (as HF
transformers' own GGUF loading does) and ``Gemma3ForCausalLM`` adds the 1 back.
"""

from __future__ import annotations

from typing import Optional

from tessellm.loader.transformers_classes import transformers_class

GEMMA3_LAYER_NAMES = {  # blk.{i}.KEY -> model.layers.{i}.VALUE (overrides of the llama names)
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}

# Gemma's turn markers (the template Google ships with Gemma 3, text content only).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
END_OF_TURN = "<end_of_turn>"
END_OF_TURN_ID = 106  # in every Gemma 3 vocabulary; HF's generation_config lists eos [1, 106]


def gemma3_config(hp, common: dict, eos, embed_rows,
                  rope_scaling: Optional[dict] = None):
    """``hp(key, default)`` reads ``gemma3.<key>``; ``common``: the fields every architecture
    reads alike (gguf_loader.py). Defaults as HF's GGUF loading uses them: sliding pattern
    5 local : 1 global, local rope base 10000, query scale head_dim. ``rope_scaling`` (the
    4B-27B models' linear factor 8) applies to the global layers, as in HF and llama.cpp.
    Returns a ``Gemma3TextConfig`` (transformers >= 4.50: resolved here, by name)."""
    hidden, heads = common["hidden_size"], common["num_attention_heads"]
    extra = {"rope_scaling": rope_scaling} if rope_scaling else {}
    return transformers_class("Gemma3TextConfig", "Gemma 3")(
        **extra,
        architectures=["Gemma3ForCausalLM"],
        **common,
        head_dim=hp("attention.key_length", hidden // heads),
        rope_theta=hp("rope.freq_base", 1_000_000.0),
        sliding_window=hp("attention.sliding_window", 4096),
        eos_token_id=[eos, END_OF_TURN_ID] if eos is not None and embed_rows and
        embed_rows > END_OF_TURN_ID else eos,
    )


def gemma3_tokenizer_fixups(tokenizer) -> None:
    """The Gemma chat template when the file carries none (the 270M GGUF does not)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
