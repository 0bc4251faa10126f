"""A tiny random LLaVA-1.5 (CLIP ViT + projector + Llama) with its processor, built and saved
offline, and HF transformers' greedy tokens on it: the reference for tests/multimodal."""

from __future__ import annotations

import numpy as np

from tests.tiny_tokenizer import bpe_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH = 28, 7  # 16 patches: 16 placeholder tokens per image ("default" drops CLS)
FEATURES = (IMAGE_SIZE // PATCH) ** 2
PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}: "
                 "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                 "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n"
                 "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _tokenizer():
    return bpe_tokenizer(["USER: What is this? ASSISTANT: a cat on a mat", "Describe the image."] * 20,
                         ["<pad>", "<s>", "</s>", IMAGE_TOKEN], 300, CHAT_TEMPLATE, bos_token="<s>",
                         eos_token="</s>", pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN})


def tiny_configs(image_size: int):
    """(CLIP vision config, Llama text config) of the tiny test models; patches of 7 px."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                              num_hidden_layers=3, image_size=image_size, patch_size=PATCH,
                              projection_dim=16)
    text = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=2, intermediate_size=128, vocab_size=320,
                       max_position_embeddings=512, initializer_range=0.2, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0)
    return vision, text


def make_tiny_llava(path: str, seed: int = 0, strategy: str = "default", feature_layer=-2) -> str:
    """Saves config, float32 safetensors, tokenizer (``<image>`` = id 3) and processor.
    ``strategy`` "full" keeps the class token (17 placeholders an image); ``feature_layer``
    may be a list (the layers' hidden states concatenated)."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    vision, text = tiny_configs(IMAGE_SIZE)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=3,
                         vision_feature_select_strategy=strategy, vision_feature_layer=feature_layer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():  # larger projector weights: image content visibly moves the logits
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(8.0)
    model.save_pretrained(path)
    tokenizer = _tokenizer()
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                   vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
                   chat_template=CHAT_TEMPLATE).save_pretrained(path)
    return path


def image(seed: int, size=(40, 52)):
    """A random RGB PIL image (not square: the processor resizes and crops it)."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (*size, 3), dtype=np.uint8))


def hf_greedy(path: str, prompts: list[str], images: list, max_new_tokens: int,
              architecture: str = "LlavaForConditionalGeneration",
              processor_kwargs: dict | None = None) -> list[list[int]]:
    """HF ``architecture``'s generate, float32, one prompt at a time; ``images[i]`` is prompt
    i's image or list of images. EOS is banned for all ``max_new_tokens`` (``min_new_tokens``),
    so every caller compares with ``min_tokens=max_tokens`` (and ``ignore_eos``), which bans the
    same id on our side; ``tests/conftest.py::hf_greedy`` instead allows EOS, for callers that
    pass ``ignore_eos`` alone. Either pairing is exact; mixing them is not."""
    import torch
    import transformers
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model_class = getattr(transformers, architecture)
    model = model_class.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for prompt, imgs in zip(prompts, images):
        inputs = processor(text=prompt, images=imgs if isinstance(imgs, list) else [imgs],
                           return_tensors="pt", **(processor_kwargs or {}))
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        outs.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return outs


def data_url(img, fmt: str = "PNG") -> str:
    import base64
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def hf_chat_prompt(path: str, text: str, num_images: int = 1) -> str:
    """The HF processor's chat template over one user message with images then text."""
    from transformers import AutoProcessor

    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    return AutoProcessor.from_pretrained(path).apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True)
