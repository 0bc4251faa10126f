"""A tiny random Mistral 3 (``Mistral3ForConditionalGeneration``: a Pixtral vision encoder
with 4 px patches, a 2x2 patch merger and projector; a Mistral language model) with its
tokenizer and image processor, built and saved offline, and HF transformers' greedy tokens on
it: the reference for tests/multimodal/test_mistral3*.py.

Images are resized so their longest edge is at most 64 px, to multiples of 8 px (patch 4 x
merge 2, rounded up): a 40x52 image becomes 40x56 (5 x 7 merged patches), its placeholder 5
rows of 7 ``[IMG]`` each ended by ``[IMG_BREAK]``, the last by ``[IMG_END]``: 40 tokens.
"""

from __future__ import annotations

from tests.multimodal.tiny_llava import image  # noqa: F401 (the tests' random RGB images)
from tests.tiny_tokenizer import bpe_tokenizer

SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
IMG, IMG_BREAK, IMG_END = 5, 6, 7  # SPECIAL's ids are their indices
PROMPT = "<s>[INST][IMG]What is this?[/INST]"
TWO = "<s>[INST][IMG] and [IMG]Compare them.[/INST]"
TEXT = "<s>[INST]Describe a cat.[/INST]"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST]"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}[IMG]{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
LONGEST_EDGE = 64


def _tokenizer():
    return bpe_tokenizer(["What is this? a cat on a mat", "Describe the image. Compare them."] * 20,
                         SPECIAL, 300, CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>",
                         unk_token="<unk>")


def config(text_type: str = "mistral"):
    """Two text layers (hidden 64, head_dim 16), a two-layer Pixtral tower (hidden 32, 4 heads)
    whose last layer's states feed the projector. ``ministral3``: Ministral 3's text model, YaRN
    over an original 8 positions and Llama 4's attention temperature (beta 0.1), so the
    prompts' later positions are scaled."""
    import transformers

    fields = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  intermediate_size=128, vocab_size=320, max_position_embeddings=512, head_dim=16,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
                  sliding_window=None)
    if text_type == "ministral3":
        text = transformers.Ministral3Config(**fields, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 64.0,
            "original_max_position_embeddings": 8, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1})
    else:
        text = transformers.MistralConfig(**fields)
    vision = transformers.PixtralVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        patch_size=4, image_size=LONGEST_EDGE, hidden_act="silu", initializer_range=0.2,
        rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    if text_type == "pixtral_llava":  # Pixtral 12B: LLaVA over the Pixtral tower, no merger
        return transformers.LlavaConfig(
            text_config=text, vision_config=vision, image_token_id=IMG, vision_feature_layer=-1,
            vision_feature_select_strategy="full", projector_hidden_act="gelu",
            multimodal_projector_bias=True, architectures=["LlavaForConditionalGeneration"],
            tie_word_embeddings=False)
    return transformers.Mistral3Config(
        text_config=text, vision_config=vision, image_token_id=IMG, spatial_merge_size=2,
        vision_feature_layer=-1, projector_hidden_act="gelu", multimodal_projector_bias=False,
        architectures=["Mistral3ForConditionalGeneration"], tie_word_embeddings=False)


def make_tiny_mistral3(path: str, seed: int = 0, text_type: str = "mistral") -> str:
    """Saves config, float32 safetensors, tokenizer (with the chat template) and the image
    processor (``preprocessor_config.json``)."""
    import torch
    import transformers
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    torch.manual_seed(seed)
    cfg = config(text_type)
    model = getattr(transformers, cfg.architectures[0])(cfg).to(torch.float32)
    with torch.no_grad():  # larger projector weights: image content visibly moves the logits
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(4.0)
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    PixtralImageProcessorPil(patch_size=4, size={"longest_edge": LONGEST_EDGE}).save_pretrained(path)
    return path


def hf_inputs(path: str, prompt: str, images: list):
    """What ``PixtralProcessor`` gives (it needs torchvision, so its steps are done here as it
    does them): the image processor at patch * merge = 8 px (4 px for Pixtral 12B's LLaVA, which
    merges none), each ``[IMG]`` of the text replaced by its image's rows
    (``replace_image_token``), then tokenized."""
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    cfg = AutoConfig.from_pretrained(path)
    unit = cfg.vision_config.patch_size * (getattr(cfg, "spatial_merge_size", None) or 1)
    inputs = {}
    if images:
        out = AutoImageProcessor.from_pretrained(path)(images=images, patch_size=unit, return_tensors="pt")
        inputs = {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}
        parts = prompt.split("[IMG]")
        assert len(parts) == len(images) + 1
        rows = []
        for h, w in out["image_sizes"].tolist():
            seq = (["[IMG]"] * (w // unit) + ["[IMG_BREAK]"]) * (h // unit)
            seq[-1] = "[IMG_END]"
            rows.append("".join(seq))
        prompt = parts[0] + "".join(r + rest for r, rest in zip(rows, parts[1:]))
    ids = torch.tensor([tok(prompt)["input_ids"]])
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    return inputs


def hf_greedy(path: str, prompts: list[str], images: list, max_new_tokens: int) -> list[list[int]]:
    """HF generate, float32, one prompt at a time; ``images[i]``: prompt i's list of images."""
    import torch
    import transformers

    arch = transformers.AutoConfig.from_pretrained(path).architectures[0]
    model = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for prompt, imgs in zip(prompts, images):
        inputs = hf_inputs(path, prompt, imgs)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        outs.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return outs
