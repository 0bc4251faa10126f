"""Helpers for the config-variant parity tests: build a tiny random HF model from a config,
save it (any dtype, optionally sharded), and compare tessellm with HF transformers in float32:
greedy tokens, and the log-probability of every token of prompt + continuation."""

from __future__ import annotations

import random
from typing import Optional

import torch

from tessellm import LLM, SamplingParams

# 2 layers, hidden 64: the shape every variant starts from (families override what they must).
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=False,
            # sharper attention than the default 0.02: position (rotary, windows) must matter
            initializer_range=0.2)


def save_tiny(config, path: str, dtype=torch.float32, seed: int = 0, **save_kwargs) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF starts norms at 1 (Gemma: 0): make them matter too
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
            elif "norm" in name or ".ln_" in name:  # GPT-2 style: ln_1, ln_2, ln_f
                p.add_(torch.rand_like(p) - 0.5)
    model.to(dtype).save_pretrained(path, **save_kwargs)
    return path


def prompts(lengths, vocab: int = 128, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def hf_reference(path: str, prompt_list, max_new: int, hf_attn: Optional[str] = None,
                 **load_kwargs):
    """HF's greedy continuations (one prompt at a time) and, for each prompt + continuation,
    the log-probability of each token after the first (one forward pass). ``hf_attn``: HF's
    ``attn_implementation`` (None: its default; "eager" where only eager soft-caps, Gemma 3);
    ``load_kwargs`` go to ``from_pretrained`` (``gguf_file``: HF reads that GGUF file)."""
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": hf_attn} if hf_attn else {}
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra, **load_kwargs)
    # As ignore_eos=True on our side: EOS may be chosen and does not stop (min_new_tokens
    # would instead ban it, and differ from us wherever EOS is the greedy choice).
    hf.generation_config.eos_token_id = None
    tokens, logprobs = [], []
    with torch.no_grad():
        for p in prompt_list:
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                              do_sample=False, pad_token_id=0)
            new = out[0, len(p):].tolist()
            full = torch.tensor([p + new])
            logits = hf(full).logits[0, :-1].float().log_softmax(-1)
            logprobs.append(logits.gather(1, full[0, 1:, None])[:, 0])
            tokens.append(new)
    return tokens, logprobs


def ours(path: str, prompt_list, max_new: int, **engine_kwargs):
    greedy = SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True)
    score = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, ignore_eos=True)
    with LLM(path, dtype="float32", **engine_kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompt_list], greedy, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        full = [p + t for p, t in zip(prompt_list, tokens)]
        scored = llm.generate([{"prompt_token_ids": f} for f in full], score, use_tqdm=False)
    logprobs = [torch.tensor([o.prompt_logprobs[i][f[i]].logprob for i in range(1, len(f))])
                for o, f in zip(scored, full)]
    return tokens, logprobs


def assert_parity(path: str, prompt_list, max_new: int = 10, atol: float = 2e-4,
                  hf_attn: Optional[str] = None, **engine_kwargs) -> None:
    want_tokens, want_lp = hf_reference(path, prompt_list, max_new, hf_attn)
    got_tokens, got_lp = ours(path, prompt_list, max_new, **engine_kwargs)
    assert got_tokens == want_tokens
    for got, want in zip(got_lp, want_lp):
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


def assert_hf_changed(path: str, prompt_list, max_new: int, want) -> None:
    """HF's eager output on the (edited) model at ``path`` differs from ``want``, the
    ``hf_reference(..., "eager")`` of the model before the edit: in a token or in a
    log-probability by more than 1e-3. So the edited feature matters to the parity cases."""
    tokens, lp = hf_reference(path, prompt_list, max_new, "eager")
    want_tokens, want_lp = want
    assert tokens != want_tokens or not all(torch.allclose(a, b, atol=1e-3)
                                            for a, b in zip(lp, want_lp)), \
        f"the edit of {path} leaves HF's output as it was"


def edit_config(path: str, **fields) -> None:
    """Sets ``fields`` in the saved model's ``config.json``."""
    import json
    import os

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(fields)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def assert_refused_at_load(config, architecture: str, path, match: str) -> None:
    """Loading ``config`` (dummy weights) as ``architecture`` raises a ValueError matching
    ``match``: a config option the family does not implement is refused naming it."""
    import pytest

    config.architectures = [architecture]
    config.save_pretrained(path)
    with pytest.raises(ValueError, match=match):
        LLM(str(path), load_format="dummy", dtype="float32")


def add_to_checkpoint(path: str, extra: dict) -> None:
    """Adds ``extra`` (name -> tensor) to the saved ``model.safetensors``, as tensors some
    released checkpoints carry beside the weights (causal-mask buffers)."""
    import os

    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    save_file({**load_file(file), **extra}, file, metadata={"format": "pt"})
