"""Checkpoint tensor names of the GPT-2-lineage families (GPT-NeoX, GPT-BigCode, GPT-J) in the
llama form ``LlamaForCausalLM.load_weights`` and the quantized loader route by::

    transformer.h.3.attn.c_proj.weight  ->  model.layers.3.self_attn.c_proj.weight
    (a prefix)   (a part)                    (then the family's stacked_params: -> o_proj)
"""

from __future__ import annotations


def llama_form(name: str, prefixes: tuple[tuple[str, str], ...],
               parts: tuple[tuple[str, str], ...]) -> str:
    """``name`` with its first matching prefix replaced, then every part of ``parts``. Names
    already in llama form pass unchanged (both loaders may rename a tensor)."""
    for theirs, ours in prefixes:
        if name.startswith(theirs):
            name = ours + name[len(theirs):]
            break
    for theirs, ours in parts:
        name = name.replace(theirs, ours)
    return name
