"""A tiny random Llama 4 with images (``Llama4ForConditionalGeneration``: a two-layer vision
model over 16 px tiles of 4 px patches, pixel shuffle 0.5 -> 4 tokens a tile; a four-layer
Llama 4 language model with dense and MoE, rope and NoPE layers) with its tokenizer and
``Llama4Processor`` (at most 4 tiles an image, plus the global view), built and saved offline,
and HF transformers' greedy tokens on it: the reference for tests/multimodal/test_llama4*.py.

Transformers' ``Llama4ImageProcessor`` runs on torchvision. Where torchvision is not installed
(this project's CI: no CPU build of it matches the CPU torch), the saved processor's image
processor is ``TilingImageProcessor`` below instead: the same interface and outputs (tiles of
``size`` px row by row, the global view last when there are several, ``aspect_ratios``), a
plain resize. Both sides of every comparison take the processor's pixels and ids, so the
parity holds for either; what the stand-in does not check is the real one's canvas choice.
"""

from __future__ import annotations

import numpy as np

from tests.multimodal.tiny_llava import image  # noqa: F401 (the tests' random RGB images)
from tests.tiny_tokenizer import bpe_tokenizer

SPECIAL = ["<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|eot|>", "<|header_start|>",
           "<|header_end|>", "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
           "<|tile_x_separator|>", "<|tile_y_separator|>"]
PAD, BOS, EOT = 0, 1, 2
IMAGE_START, IMAGE_END, IMAGE, PATCH, TILE_X, TILE_Y = 5, 6, 7, 8, 9, 10  # SPECIAL's indices
TILE, PATCH_PX, PER_TILE, MAX_PATCHES = 16, 4, 4, 4
PROMPT = ("<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|>What is this?<|eot|>"
          "<|header_start|>assistant<|header_end|>\n\n")
TWO = ("<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|>and<|image|>Compare "
       "them.<|eot|><|header_start|>assistant<|header_end|>\n\n")
TEXT = ("<|begin_of_text|><|header_start|>user<|header_end|>\n\nDescribe a cat.<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n")


def has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as none
        return False
    return True


def _tiling_processor_class():
    from PIL import Image
    from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

    class TilingImageProcessor(BaseImageProcessor):
        """Llama4ImageProcessor's outputs without torchvision (module docstring)."""

        model_input_names = ["pixel_values", "aspect_ratios"]

        def __init__(self, size=None, max_patches: int = MAX_PATCHES, **kwargs):
            super().__init__(**kwargs)
            self.size = size or {"height": TILE, "width": TILE}
            self.max_patches = max_patches

        def _grid(self, height: int, width: int) -> tuple[int, int]:
            side = self.size["height"]
            rows, cols = max(1, -(-height // side)), max(1, -(-width // side))
            while rows * cols > self.max_patches:
                rows, cols = (rows - 1, cols) if rows >= cols else (rows, cols - 1)
            return rows, cols

        def _array(self, img, height: int, width: int) -> np.ndarray:
            resized = img.convert("RGB").resize((width, height), Image.BILINEAR)
            return ((np.asarray(resized, dtype=np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)

        def preprocess(self, images, return_tensors=None, **kwargs):
            images = images if isinstance(images, (list, tuple)) else [images]
            side = self.size["height"]
            tiles, ratios = [], []
            for img in images:
                rows, cols = self._grid(img.height, img.width)
                canvas = self._array(img, rows * side, cols * side)
                tiles += [canvas[:, y * side:(y + 1) * side, x * side:(x + 1) * side]
                          for y in range(rows) for x in range(cols)]
                if rows * cols > 1:
                    tiles.append(self._array(img, side, side))
                ratios.append([rows, cols])
            return BatchFeature({"pixel_values": np.stack(tiles), "aspect_ratios": np.array(ratios)},
                                tensor_type=return_tensors)

    return TilingImageProcessor


_TILING = None


def register_tiling_processor() -> None:
    """Lets ``AutoProcessor`` load a checkpoint saved with ``TilingImageProcessor`` (this
    process only; a no-op with torchvision installed, where the real one is saved)."""
    global _TILING
    if has_torchvision() or _TILING is not None:
        return
    _TILING = _tiling_processor_class()
    from transformers import AutoImageProcessor, PretrainedConfig

    class TilingConfig(PretrainedConfig):  # a key of its own: Llama 4's entry stays as it is
        model_type = "tessellm_test_tiling"

    AutoImageProcessor.register(TilingConfig, image_processor_classes={"pil": _TILING}, exist_ok=True)


def _tokenizer():
    return bpe_tokenizer(["user assistant What is this? a cat on a mat", "Describe the image. "
                          "Compare them. and\n\n"] * 20, SPECIAL, 300, bos_token="<|begin_of_text|>",
                         eos_token="<|eot|>", pad_token="<|finetune_right_pad_id|>")


def config():
    from transformers import Llama4Config

    text = dict(vocab_size=320, hidden_size=64, intermediate_size=32, intermediate_size_mlp=48,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                attention_chunk_size=32, floor_scale=4, attn_scale=0.5,
                max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.2,
                bos_token_id=BOS, eos_token_id=EOT, pad_token_id=PAD)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                  image_size=TILE, patch_size=PATCH_PX, pixel_shuffle_ratio=0.5,
                  vision_output_dim=48, projector_input_dim=48, projector_output_dim=48,
                  initializer_range=0.2)
    return Llama4Config(text_config=text, vision_config=vision, image_token_index=PATCH,
                        boi_token_index=IMAGE_START, eoi_token_index=IMAGE_END,
                        architectures=["Llama4ForConditionalGeneration"])


def make_tiny_llama4(path: str, seed: int = 0) -> str:
    """Saves config, float32 safetensors, tokenizer and processor (with HF's Llama 4 chat
    template)."""
    import torch
    from transformers import Llama4ForConditionalGeneration, Llama4Processor

    torch.manual_seed(seed)
    model = Llama4ForConditionalGeneration(config()).to(torch.float32)
    with torch.no_grad():  # the class token and positions matter (HF's init scales them down)
        model.vision_model.class_embedding.normal_(0.0, 1.0)
        model.vision_model.positional_embedding_vlm.normal_(0.0, 1.0)
    model.save_pretrained(path)
    if has_torchvision():
        from transformers import Llama4ImageProcessor

        images = Llama4ImageProcessor(size={"height": TILE, "width": TILE}, max_patches=MAX_PATCHES)
    else:
        register_tiling_processor()
        images = _TILING()
    Llama4Processor(image_processor=images, tokenizer=_tokenizer(), patch_size=PATCH_PX,
                    pixel_shuffle_ratio=0.5).save_pretrained(path)
    return path


def hf_greedy(path: str, prompts: list[str], images: list, max_new_tokens: int) -> list[list[int]]:
    """HF's greedy tokens, float32, one prompt at a time (``images[i]``: prompt i's list, may
    be empty); EOS banned for all ``max_new_tokens``, as ``min_tokens`` does on our side."""
    import torch
    from transformers import AutoProcessor, Llama4ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for prompt, imgs in zip(prompts, images):
        if imgs:
            inputs = processor(text=prompt, images=imgs, return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].float()
        else:
            inputs = processor.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD)
        outs.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return outs
