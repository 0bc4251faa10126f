"""Qwen2-VL's front end without the engine: the grid is part of an image's identity (hash,
and what travels between processes), placeholder counts are checked per image, and the
encoder budget comes from the image processor's max_pixels."""

from __future__ import annotations

import numpy as np
import pytest

from tessellm.multimodal.encoder_budget import encoder_budget_args, max_tokens_per_image
from tessellm.multimodal.inputs import MultiModalFeature, decode_features, encode_features
from tessellm.multimodal.processor import image_processor
from tests.multimodal.tiny_qwen2_vl import IMAGE_PAD, PROMPT, image


def test_grid_is_hashed_and_travels():
    patches = np.arange(12 * 4, dtype=np.float32).reshape(12, 4)
    wide = MultiModalFeature.from_pixels(patches, 3, 3, grid_thw=[1, 2, 6])
    tall = MultiModalFeature.from_pixels(patches, 3, 3, grid_thw=[1, 6, 2])
    assert wide.identifier != tall.identifier  # same bytes, other image
    assert decode_features(encode_features([wide]))[0] == wide


def test_placeholder_counts_are_checked_per_image(qwen2_vl_dir):
    processor = image_processor(qwen2_vl_dir, 2)
    ids, features = processor.process(PROMPT, [image(1)])
    assert [(f.length, f.grid_thw) for f in features] == [(30, [1, 10, 12])]
    assert ids.count(IMAGE_PAD) == 30 and ids[features[0].offset - 1] == 3  # <|vision_start|>
    with pytest.raises(ValueError, match=r"1 image placeholder tokens .* for 2 image\(s\).*"
                                         r"42 \(each image's own count: 12, 30\)"):
        processor.process(PROMPT, [image(2, (24, 32)), image(3)])


def test_encoder_budget_from_max_pixels(qwen2_vl_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(qwen2_vl_dir)
    assert max_tokens_per_image(config, qwen2_vl_dir) == 4096 // 8 // 8  # max_pixels / (4 * 2)^2
    assert encoder_budget_args(config, 16, model_path=qwen2_vl_dir)["encoder_cache_size"] == 64
    with pytest.raises(ValueError, match="takes images of 64 placeholder tokens"):
        encoder_budget_args(config, 32, disable_chunked_mm_input=True, model_path=qwen2_vl_dir)
