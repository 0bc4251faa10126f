"""A tiny "thinking" model for the reasoning tests: a real Llama checkpoint (one layer, float32)
whose weights make it a bigram table (``bigram.py``: ``o_proj`` and ``down_proj`` zero), so its
greedy output is known token for token. ``CHAINS`` lists, per trigger (the prompt's last token), the tokens that follow. The
tokenizer is byte-level without merges plus the chains' pieces as added tokens, so the think
markers are single tokens, or, with ``split_markers``, two tokens each (``"<thi" "nk>"``,
``"</" "think>"``): then a marker reaches a stream in two deltas; or, with ``special_markers``,
special tokens (which ``skip_special_tokens`` would hide). ``markers`` spells the think markers
otherwise (``("[THINK]", "[/THINK]")`` for Mistral), and ``chains`` replaces ``CHAINS`` (other
parsers' envelopes).
"""

from __future__ import annotations

import json
import os

from tests.server.bigram import make_bigram, successors
TOOL_IN_THOUGHT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
FILLER = [f" r{i}" for i in range(40)]  # a long chain of distinct thinking tokens

# trigger -> the tokens it leads to (every token has one successor across all chains)
CHAINS = {
    "[think]": ["<think>", " Let me see.", " Two and two.", "</think>", " It is", " four.", "</s>"],
    "[bare]": [" I recall", "</think>"],  # no opening marker (DeepSeek-R1); then as above
    "[noend]": [" Step", " by", " step", " Step"],  # never ends its thinking
    "[tool]": [" Maybe", TOOL_IN_THOUGHT, " No, later.", "</think>"],
    "[json]": [" Think:", " {not json", "</think>"],
    "[long]": [*FILLER, "</think>"],
}
TEMPLATE = ("{% for m in messages %}{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>"
            "{% endif %}{{ m['content'] }}{% endfor %}"
            "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")


def _spelled(chains: dict, markers: tuple[str, str]) -> dict:
    """``chains`` with ``<think>`` and ``</think>`` spelled as ``markers``."""
    spell = dict(zip(("<think>", "</think>"), markers))
    return {t: [spell.get(tok, tok) for tok in chain] for t, chain in chains.items()}


def _pieces(split_markers: bool, special_markers: bool, chains: dict, markers=("<think>", "</think>")) -> list[str]:
    pieces = []
    for trigger, chain in chains.items():
        for token in [trigger, *chain]:
            if token in markers and special_markers:
                continue
            if token in ("<think>", "</think>") and split_markers:
                pieces += ["<thi", "nk>"] if token == "<think>" else ["</", "think>"]
            elif token != "</s>" and token not in pieces:
                pieces.append(token)
    return list(dict.fromkeys(pieces))


def _chain_ids(tok, split_markers: bool, chains: dict) -> list[list[int]]:
    out = []
    for trigger, chain in chains.items():
        ids = []
        for token in [trigger, *chain]:
            if token in ("<think>", "</think>") and split_markers:
                ids += tok.convert_tokens_to_ids(["<thi", "nk>"] if token == "<think>" else ["</", "think>"])
            else:
                ids.append(tok.convert_tokens_to_ids(token))
        out.append(ids)
    return out


def make_thinking_model(path: str, split_markers: bool = False, special_markers: bool = False,
                        markers: tuple[str, str] = ("<think>", "</think>"), chains: dict = CHAINS) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_tokenizer import bpe_tokenizer

    tok = bpe_tokenizer(["abc"], ["<pad>", "<s>", "</s>"], 259, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    chains = _spelled(chains, markers)
    if special_markers:
        tok.add_special_tokens({"additional_special_tokens": list(markers)})
    tok.add_tokens(_pieces(split_markers, special_markers, chains, markers))
    tok.chat_template = TEMPLATE.replace("<think>", markers[0]).replace("</think>", markers[1])
    vocab = -(-len(tok) // 8) * 8
    config = LlamaConfig(vocab_size=vocab, hidden_size=vocab, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    layer = model.model.layers[0]
    make_bigram(model, successors(_chain_ids(tok, split_markers, chains)),
                [layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight])
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 2, "bos_token_id": 1}, f)
    return path
