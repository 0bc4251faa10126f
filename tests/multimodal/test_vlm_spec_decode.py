"""Speculative decoding with image prompts: n-gram drafts are accepted and the greedy tokens
are HF transformers' (float32) and those of the same engine without speculation; a draft
model (a text model over the same ids) keeps the tokens too; EAGLE and MTP, which need the
target's hidden states over the image features, are refused by name."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.multimodal.tiny_qwen2_vl import IMAGE, hf_greedy, image

MAX_NEW = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}
# text that repeats, so the n-gram proposer finds drafts in the prompt
REPEAT = "<|im_start|>user\n{}a cat on a mat a cat on a mat a cat<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava"])
def test_ngram_with_images_matches_hf_and_no_speculation(kind, qwen2_vl_dir, llava_dir):
    if kind == "qwen2_vl":
        path, prompt = qwen2_vl_dir, REPEAT.format(IMAGE)
        images = [image(41), image(42, (24, 32))]
        want = hf_greedy(path, [prompt] * 2, [[im] for im in images], MAX_NEW)
    else:
        from tests.multimodal import tiny_llava

        path, prompt = llava_dir, "USER: <image>\na cat on a mat a cat on a mat a cat ASSISTANT:"
        images = [tiny_llava.image(41), tiny_llava.image(42)]
        want = tiny_llava.hf_greedy(path, [prompt] * 2, images, MAX_NEW)
    requests = [{"prompt": prompt, "multi_modal_data": {"image": im}} for im in images]
    outs = {}
    for spec in (None, NGRAM):
        with LLM(path, dtype="float32", num_kv_blocks=128, block_size=4,
                 speculative_config=spec) as llm:
            got = llm.generate(requests, GREEDY, use_tqdm=False)
            if spec is not None:
                assert llm.engine.core.scheduler.spec_stats.num_accepted_tokens > 0
        outs[spec is None] = [list(o.outputs[0].token_ids) for o in got]
    assert outs[True] == outs[False] == want


def _text_draft(path: str, out: str) -> str:
    """The image-text checkpoint's language model alone, saved as a Llama (LLaVA's) or a
    random two-layer Llama of the same vocabulary (``path`` None)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    text = AutoConfig.from_pretrained(path).get_text_config()
    if text.model_type != "llama":
        config = LlamaConfig(vocab_size=text.vocab_size, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=512)
        LlamaForCausalLM(config).save_pretrained(out)
        return out
    draft = LlamaForCausalLM(LlamaConfig(**text.to_dict()))
    full = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).state_dict()
    draft.load_state_dict({("model." + k[len("model.language_model."):]
                            if k.startswith("model.language_model.") else k): v
                           for k, v in full.items() if "language_model" in k or k == "lm_head.weight"})
    draft.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_draft_model_with_images_keeps_the_tokens(kind, llava_dir, qwen2_vl_dir, tmp_path):
    """A text draft over image prompts (placeholders as plain tokens, 1-D positions): its
    drafts are verified and the greedy tokens are the engine's without speculation."""
    from tests.multimodal import tiny_llava, tiny_qwen2_vl

    if kind == "llava":
        path, prompt = llava_dir, tiny_llava.PROMPT
        images = [tiny_llava.image(43), tiny_llava.image(44)]
    else:
        path, prompt = qwen2_vl_dir, REPEAT.format(IMAGE)
        images = [tiny_qwen2_vl.image(43), tiny_qwen2_vl.image(44, (24, 32))]
    draft = _text_draft(path, str(tmp_path / "draft"))
    requests = [{"prompt": prompt, "multi_modal_data": {"image": im}} for im in images]
    if kind == "llava":  # text only: the draft is the target's language model, drafts right
        requests.append("USER: a cat on a mat ASSISTANT:")
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 3,
            "disable_by_batch_size": 0}
    outs = {}
    for config in (None, spec):
        with LLM(path, dtype="float32", num_kv_blocks=128, block_size=4,
                 speculative_config=config) as llm:
            got = llm.generate(requests, GREEDY, use_tqdm=False)
            if config is not None:
                stats = llm.engine.core.scheduler.spec_stats
                assert stats.num_drafts > 0
                if kind == "llava":
                    assert stats.num_accepted_tokens > 0
        outs[config is None] = [list(o.outputs[0].token_ids) for o in got]
    assert outs[True] == outs[False]


@pytest.mark.parametrize("method", ["eagle", "mtp"])
def test_proposers_that_need_image_features_are_refused(method, llava_dir):
    spec = {"method": method, "num_speculative_tokens": 2}
    if method != "mtp":
        spec["model"] = llava_dir
    with pytest.raises(ValueError, match=f"speculative_config method '{method}' does not combine "
                                         "with an image model"):
        LLM(llava_dir, dtype="float32", num_kv_blocks=16, speculative_config=spec)
