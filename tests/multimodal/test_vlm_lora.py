"""LoRA on a vision-language model served with images (as vLLM: the adapter adapts the
language model's q/k/v/o/gate/up/down, the vision tower runs as it is): greedy tokens equal HF
PEFT's (float32) on image prompts, next to the base model in one batch; an adapter that adapts
the vision tower is refused by name."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.lora import LoRARequest
from tests.multimodal.tiny_qwen2_vl import PROMPT, hf_inputs, image
from tests.multimodal import tiny_llava

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
LM_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _adapter(path: str, out: str, targets) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(3)
    base = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False,
                        lora_dropout=0.0)
    get_peft_model(base, config).save_pretrained(out)
    return out


def _qwen_inputs(path: str, img) -> dict:
    return hf_inputs(path, PROMPT, [img])


def _llava_inputs(path: str, img) -> dict:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)(text=tiny_llava.PROMPT, images=[img],
                                               return_tensors="pt")


def _hf_greedy(path: str, adapter, images: list, make_inputs=_qwen_inputs) -> list[list[int]]:
    """HF generate (PEFT's model when ``adapter``), one image prompt at a time."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    outs = []
    for img in images:
        inputs = make_inputs(path, img)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                                 do_sample=False, pad_token_id=0)
        outs.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    return outs


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_lora_with_images_matches_peft(kind, qwen2_vl_dir, qwen2_5_vl_dir, tmp_path):
    """All seven language-model projections adapted (Qwen2.5-VL's tower has gate/up/down
    projections too, left out by the adapter's regex); two image prompts with the adapter
    and the first again without it, in one batch."""
    path = qwen2_vl_dir if kind == "qwen2_vl" else qwen2_5_vl_dir
    adapter = _adapter(path, str(tmp_path / "lora"), LM_MODULES)
    images = [image(21), image(22, (24, 32))]
    want = _hf_greedy(path, adapter, images)
    base = _hf_greedy(path, None, images[:1])
    assert want[0] != base[0]  # the adapter changes the tokens
    lora = LoRARequest("mm", 1, adapter)
    with LLM(path, dtype="float32", num_kv_blocks=128, block_size=4, enable_lora=True,
             max_lora_rank=8) as llm:
        outs = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": im}}
                             for im in images + images[:1]], GREEDY, use_tqdm=False,
                            lora_request=[lora, lora, None])
    assert [list(o.outputs[0].token_ids) for o in outs] == want + base


def test_llava_lora_with_images_matches_peft(llava_dir, tmp_path):
    """LLaVA (a CLIP tower with its own q/k/v projections, left out by the regex; a Llama
    language model): the adapter on image prompts, next to the base model."""
    adapter = _adapter(llava_dir, str(tmp_path / "lora"), LM_MODULES)
    images = [tiny_llava.image(31), tiny_llava.image(32)]
    want = _hf_greedy(llava_dir, adapter, images, _llava_inputs)
    base = _hf_greedy(llava_dir, None, images[:1], _llava_inputs)
    assert want[0] != base[0]
    lora = LoRARequest("mm", 1, adapter)
    with LLM(llava_dir, dtype="float32", num_kv_blocks=64, block_size=4, enable_lora=True,
             max_lora_rank=8) as llm:
        outs = llm.generate([{"prompt": tiny_llava.PROMPT, "multi_modal_data": {"image": im}}
                             for im in images + images[:1]], GREEDY, use_tqdm=False,
                            lora_request=[lora, lora, None])
    assert [list(o.outputs[0].token_ids) for o in outs] == want + base


def test_image_text_configs_take_their_language_models_layout():
    """An image-text architecture has no LoRA layout of its own: its language model's family's
    (LLaVA: Llama's; Llama 4: attention only, as its MoE text family)."""
    import transformers

    from tessellm.lora.families import LLAMA, MOE_ATTENTION
    from tessellm.lora.shapes import BaseShapes

    llava = BaseShapes.from_config(transformers.LlavaConfig(
        architectures=["LlavaForConditionalGeneration"]))
    llama4 = BaseShapes.from_config(transformers.Llama4Config(
        architectures=["Llama4ForConditionalGeneration"]))
    assert (llava.family, llava.image_text, llava.arch) == (LLAMA, True,
                                                            "LlavaForConditionalGeneration")
    assert (llama4.family, llama4.image_text) == (MOE_ATTENTION, True)


def test_an_adapter_of_the_vision_tower_is_refused(qwen2_5_vl_dir, tmp_path):
    adapter = _adapter(qwen2_5_vl_dir, str(tmp_path / "lora"), ["q_proj", "gate_proj"])
    with LLM(qwen2_5_vl_dir, dtype="float32", num_kv_blocks=32, block_size=4, enable_lora=True,
             max_lora_rank=8) as llm:
        with pytest.raises(ValueError, match="of the vision tower or projector; LoRA on "
                                             "Qwen2_5_VLForConditionalGeneration adapts its "
                                             "language model only"):
            llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": image(23)}}, GREEDY,
                         use_tqdm=False, lora_request=LoRARequest("tower", 1, adapter))
        ok = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": image(23)}}, GREEDY,
                          use_tqdm=False)  # still serving
    assert len(ok[0].outputs[0].token_ids) == MAX_NEW
