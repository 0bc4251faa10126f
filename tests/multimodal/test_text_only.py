"""Image-text checkpoints served text-only (``limit_mm_per_prompt={"image": 0}``,
``tessellm/multimodal/text_only.py``), against HF transformers' image-text model in float32 on
the tiny random checkpoints of this folder: greedy tokens on text prompts for every image family;
the vision tower and projector neither built nor read (the parameters are the language model's,
no encoder budget); Llama 4's conditional checkpoint (how Scout and Maverick ship) at
pipeline_parallel_size=2 and with n-gram speculative decoding;
an image request refused by one sentence naming the flag, offline and as a 400, after which the
engine goes on serving."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.config import EngineArgs
from tessellm.lora import LoRARequest
from tests.multimodal.serve_app import MAX_NEW, chat_body, image_part, serve
from tests.multimodal.tiny_llava import data_url, image

OFF = {"image": 0}
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
PROMPTS = ["hello there a cat", "What is this? a mat on the"]
VISION_PARTS = ("vision_model", "vision_tower", "visual", "multi_modal_projector", "image_newline")
FAMILIES = ["llama4_dir", "gemma3_dir", "qwen2_vl_dir", "qwen2_5_vl_dir", "qwen3_vl_dir", "llava_dir",
            "llava_next_dir", "mistral3_dir"]


def hf_text_greedy(path: str, prompts: list, max_new: int) -> tuple[list[list[int]], int]:
    """HF's image-text model's greedy tokens on text prompts (str: tokenized as HF does; or
    token ids), one at a time, and its language model's parameter count (all but the vision
    tower's and the projector's)."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt]) if isinstance(prompt, list) else \
            tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or 0)
        outs.append(out[0, ids.shape[1]:].tolist())
    text = sum(p.numel() for n, p in model.named_parameters()
               if not set(n.split(".")) & set(VISION_PARTS))
    return outs, text


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("family", FAMILIES)
def test_images_off_gives_hf_tokens_without_the_vision_tower(family, request):
    """Every image family: HF's tokens, from the language model alone (its parameters are HF's
    language model's, none of the tower's or projector's), with no encoder budget."""
    path = request.getfixturevalue(family)
    want, text_params = hf_text_greedy(path, PROMPTS, MAX_NEW)
    with LLM(path, dtype="float32", num_kv_blocks=64, block_size=4, limit_mm_per_prompt=OFF) as llm:
        assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == want
        model = llm.engine.core.runner.model
        names = [n for n, _ in model.named_parameters()]
        assert not [n for n in names if set(n.split(".")) & set(VISION_PARTS)]
        assert sum(p.numel() for p in model.parameters()) == text_params
        assert llm.engine.core.scheduler.encoder is None
        assert llm.engine.core.info.mm_limits == OFF


def test_images_on_builds_the_tower(llama4_dir):
    """The counterpart: the default limit builds and loads the vision model and projector."""
    with LLM(llama4_dir, dtype="float32", num_kv_blocks=16, block_size=4) as llm:
        names = [n for n, _ in llm.engine.core.runner.model.named_parameters()]
        assert any(n.startswith("vision_model.") for n in names)
        assert llm.engine.core.scheduler.encoder is not None


@pytest.fixture(scope="module")
def llama4_want(llama4_dir):
    return hf_text_greedy(llama4_dir, PROMPTS, MAX_NEW)[0]


def test_llama4_conditional_images_off_pipeline_parallel(llama4_dir, llama4_want):
    """Two stages of two layers (gloo), the vision model neither built nor loaded (with images
    it would be, on the first stage: test_vlm_pipeline.py)."""
    with LLM(llama4_dir, dtype="float32", num_kv_blocks=64, block_size=4, device="cpu",
             pipeline_parallel_size=2, limit_mm_per_prompt=OFF) as llm:
        assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == llama4_want


def test_llama4_conditional_images_off_ngram_speculation(llama4_dir):
    """Repetitive prompts: n-gram drafts accepted, HF's greedy tokens still."""
    prompts = [[20, 21, 22, 23] * 4 + [24], [30, 31, 32] * 5]
    want, _ = hf_text_greedy(llama4_dir, prompts, 16)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
            "prompt_lookup_max": 3}
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    with LLM(llama4_dir, dtype="float32", num_kv_blocks=64, block_size=4,
             speculative_config=spec, limit_mm_per_prompt=OFF) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert llm.engine.core.scheduler.spec_stats.num_accepted_tokens > 0
    assert _tokens(outs) == want


def test_an_image_is_refused_naming_the_flag_and_text_goes_on(llama4_dir, llama4_want):
    with LLM(llama4_dir, dtype="float32", num_kv_blocks=64, block_size=4,
             limit_mm_per_prompt=OFF) as llm:
        with pytest.raises(ValueError, match=r"Images are turned off .*--limit-mm-per-prompt"):
            llm.generate({"prompt": PROMPTS[0], "multi_modal_data": {"image": image(1)}}, GREEDY)
        assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == llama4_want


def test_server_answers_an_image_with_a_400_and_goes_on_serving(llava_dir):
    text = {"type": "text", "text": "What is this?"}

    async def scenario(c):
        refused = await c.post("/v1/chat/completions",
                               json=chat_body(image_part(data_url(image(5))), text))
        ok = await c.post("/v1/chat/completions", json=chat_body(text, return_token_ids=True))
        return refused, ok

    args = EngineArgs(model=llava_dir, dtype="float32", num_kv_blocks=64, block_size=4,
                      limit_mm_per_prompt=OFF)
    refused, ok = asyncio.run(serve(args, scenario))
    assert refused.status_code == 400, refused.text
    assert "Images are turned off" in refused.json()["error"]["message"]
    assert "--limit-mm-per-prompt" in refused.json()["error"]["message"]
    assert ok.status_code == 200, ok.text
    prompt = ok.json()["prompt_token_ids"]
    assert ok.json()["choices"][0]["token_ids"] == hf_text_greedy(llava_dir, [prompt], MAX_NEW)[0][0]


def _image_text_adapter(path: str, out: str, targets=("q_proj", "v_proj")) -> str:
    """A random PEFT LoRA adapter trained on the image-text model: ``targets`` of the language
    model and of the vision tower (whose tensors are skipped with images off)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(3)
    base = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(targets),
                        init_lora_weights=False, lora_dropout=0.0)
    get_peft_model(base, config).save_pretrained(out)
    return out


def _peft_text_greedy(path: str, adapter: str, prompts: list[list[int]], max_new: int):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32), adapter).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                 pad_token_id=0)
            outs.append(out[0, len(p):].tolist())
    return outs


def assert_text_lora_matches_peft(path: str, adapter: str, prompts: list[list[int]],
                                  max_new: int = MAX_NEW) -> None:
    """An adapter of the image-text model at ``path``, served with images off: HF PEFT's greedy
    tokens for every prompt, next to the base model (HF's tokens, which the adapter changes)
    for the first prompt again, in one batch."""
    want = _peft_text_greedy(path, adapter, prompts, max_new)
    base_want, _ = hf_text_greedy(path, prompts[:1], max_new)
    assert want[0] != base_want[0]  # the adapter changes the tokens
    greedy = SamplingParams(temperature=0.0, max_tokens=max_new, min_tokens=max_new,
                            ignore_eos=True)
    lora = LoRARequest("mm", 1, adapter)
    with LLM(path, dtype="float32", num_kv_blocks=64, block_size=4, enable_lora=True,
             max_lora_rank=8, limit_mm_per_prompt=OFF) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts + prompts[:1]], greedy,
                            use_tqdm=False, lora_request=[lora, lora, None])
    assert _tokens(outs) == want + base_want


def test_gemma3_images_off_lora_adapter_of_the_image_text_model(gemma3_dir, tmp_path):
    """LoRA, which an image model refuses: an adapter trained on Gemma3ForConditionalGeneration
    (its language model's modules under ``language_model``, its tower's too) gives HF PEFT's
    tokens, next to the base model in one batch; the server's adapter check reads it as the
    engine serves the model."""
    from safetensors import safe_open

    from tessellm.entrypoints.openai.lora_modules import LoRAModules

    adapter = _image_text_adapter(gemma3_dir, str(tmp_path / "lora"))
    with safe_open(f"{adapter}/adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any("language_model" in k for k in keys) and any("vision_tower" in k for k in keys)
    prompts = [[2, 40, 41, 42, 43], [2, 50, 60, 70]]
    assert_text_lora_matches_peft(gemma3_dir, adapter, prompts)
    args = EngineArgs(model=gemma3_dir, enable_lora=True, limit_mm_per_prompt=OFF)
    LoRAModules("base", gemma3_dir, 8, engine_args=args).add("mm", adapter)


def test_llama4_conditional_images_off_attention_lora(llama4_dir, tmp_path):
    """Llama 4 (attention-only LoRA, as the other mixture-of-experts families): an adapter of
    Llama4ForConditionalGeneration's q/k/v/o projections (language model and vision model)
    gives HF PEFT's tokens, next to the base model in one batch."""
    adapter = _image_text_adapter(llama4_dir, str(tmp_path / "lora"),
                                  ["q_proj", "k_proj", "v_proj", "o_proj"])
    prompts = [[1, 40, 41, 42, 43], [1, 50, 60, 70]]
    assert_text_lora_matches_peft(llama4_dir, adapter, prompts)


def test_the_flag_forms_and_the_served_config(llama4_dir):
    """The CLI's JSON, vLLM's older ``image=0`` and a dict all turn images off; the served
    config is the language model's, a copy (the image-text config is left as it is)."""
    from transformers import AutoConfig

    from tessellm.multimodal.text_only import images_off, text_only_config

    config = AutoConfig.from_pretrained(llama4_dir)
    assert all(images_off(config, v) for v in ('{"image": 0}', "image=0", {"image": 0}))
    assert not any(images_off(config, v) for v in (None, {"image": 1}, '{"image": 2}'))
    text = text_only_config(config)
    assert text.architectures == ["Llama4ForCausalLM"] and text.tie_word_embeddings is False
    assert config.architectures == ["Llama4ForConditionalGeneration"]
    assert config.get_text_config().architectures != ["Llama4ForCausalLM"]
