"""A tiny gpt-oss that writes harmony: a real ``GptOssForCausalLM`` checkpoint (one layer,
float32) whose weights make it a bigram table (``bigram.py``: attention's ``o_proj`` and the
experts' ``down_proj`` and their biases zero), so its greedy output is known token for token.
The harmony markers are the tokenizer's special tokens, as in
gpt-oss's; a bigram table needs one successor per token, so a marker met twice is spelled once
as a special token and once inside a longer added token (the text is the same).
``CHAINS`` lists, per trigger (the prompt's last token), what follows. The chat template writes
a harmony-shaped prompt (``Reasoning:``, the tools' names and descriptions, the latter
read as gpt-oss's template reads them (``"// " + description``: an error when absent), earlier
thinking, calls and results)
and ends with the last message's text, the trigger (or, with the template variable
``open_header``, with a header it opens: then the prompt's last token picks the chain).
"""

from __future__ import annotations

import json
import os

from tests.server.bigram import make_bigram, successors
SPECIAL = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>", "<|constrain|>"]
CALL_HEADER = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
CHAINS = {
    # analysis, then the final answer, whose header is the three tokens gpt-oss writes
    # (<|channel|> final <|message|>): the structured-output gate starts the grammar after them
    "[final]": ["<|channel|>analysis<|message|>", " Two and two.", "<|end|>", "<|start|>", "assistant",
                "<|channel|>", "final", "<|message|>", "It is", " four.", "<|return|>"],
    # analysis, then a call: <|call|> stops generation
    "[tool]": ["<|channel|>analysis<|message|> Need the weather.", "<|end|><|start|>assistant",
               CALL_HEADER, '{"city":', ' "Paris"}', "<|call|>"],
    "[after_tool]": ["<|channel|>final<|message|>", "It is"],  # then as [final]: "It is four."
    "[plain]": ["Just text", " without channels.", "<|return|>"],  # a model that ignores the format
}
TEMPLATE = (
    "{{- '<|start|>system<|message|>Reasoning: ' + (reasoning_effort or 'medium') + '<|end|>' }}"
    "{%- if tools %}{{- '<|start|>developer<|message|># Tools' }}{% for t in tools %}"
    "{{ ' ' + t.function.name + ' // ' + t.function.description }}{% endfor %}{{ '<|end|>' }}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}"
    "{%- if m.thinking %}{{ '<|start|>assistant<|channel|>analysis<|message|>' + m.thinking + '<|end|>' }}{% endif %}"
    "{%- for c in m.tool_calls %}{{ '<|start|>assistant to=functions.' + c.function.name"
    " + '<|channel|>commentary json<|message|>' + c.function.arguments|tojson + '<|call|>' }}{% endfor %}"
    "{%- elif m.role == 'tool' %}{{ '<|start|>functions.get_weather to=assistant<|channel|>commentary"
    "<|message|>' + m.content + '<|end|>' }}"
    "{%- else %}{{ '<|start|>' + m.role + '<|message|>' + m.content + '<|end|>' }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start|>assistant' + (open_header if open_header is defined"
    " else messages[-1].content) }}{% endif %}")


def make_harmony_model(path: str) -> str:
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    from tests.tiny_tokenizer import bpe_tokenizer

    tok = bpe_tokenizer(["abc"], ["<|endoftext|>"], 257, eos_token="<|return|>", pad_token="<|endoftext|>",
                        additional_special_tokens=SPECIAL)
    pieces = [t for trigger, chain in CHAINS.items() for t in [trigger, *chain] if t not in SPECIAL]
    tok.add_tokens(list(dict.fromkeys(pieces)))
    tok.chat_template = TEMPLATE
    vocab = -(-len(tok) // 8) * 8
    config = GptOssConfig(vocab_size=vocab, hidden_size=vocab, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=2,
                          num_experts_per_tok=1, sliding_window=128, layer_types=["full_attention"],
                          max_position_embeddings=1024, tie_word_embeddings=False,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).float()
    succ = successors(tok.convert_tokens_to_ids([trigger, *chain]) for trigger, chain in CHAINS.items())
    layer = model.model.layers[0]
    make_bigram(model, succ, [layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias,
                              layer.mlp.experts.down_proj, layer.mlp.experts.down_proj_bias])
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:  # <|call|> is the server's to add
        json.dump({"eos_token_id": [tok.eos_token_id], "pad_token_id": tok.pad_token_id}, f)
    return path
