"""The Llama 4 vision model and projector against HF's (``get_image_features``) on random tiles,
float32; the span layout against HF's ``Llama4Processor._prompt_split_image``; the biggest
image's span for the encoder budget; vision configs that do not compose, refused by name."""

from __future__ import annotations

import pytest
import torch

from tessellm.models.llama4_vision import Llama4VisionModel, check_vision_config, pixel_shuffle
from tessellm.multimodal.llama4_inputs import span_kinds


def _vision(**overrides):
    return {**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=128, image_size=16, patch_size=4, pixel_shuffle_ratio=0.5,
                   vision_output_dim=48, projector_input_dim=48, projector_output_dim=48),
            **overrides}


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_tower_and_projector_match_hf(theta):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from tessellm.models.llama4_mm import Llama4MultiModalProjector

    config = Llama4Config(vision_config=_vision(rope_parameters={"rope_type": "default",
                                                                 "rope_theta": theta}),
                          text_config=dict(hidden_size=64, num_hidden_layers=1, vocab_size=64,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=16, intermediate_size=32,
                                           intermediate_size_mlp=48, num_local_experts=2))
    torch.manual_seed(0)
    hf = Llama4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        hf.vision_model.class_embedding.normal_()
        hf.vision_model.positional_embedding_vlm.normal_()
    tower, projector = Llama4VisionModel(config.vision_config), Llama4MultiModalProjector(config)
    state = hf.state_dict()
    tower.load_state_dict({k[len("vision_model."):]: v for k, v in state.items()
                           if k.startswith("vision_model.")}, strict=False)
    projector.load_state_dict({"linear_1.weight": state["multi_modal_projector.linear_1.weight"]})
    tiles = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        want = hf.get_image_features(pixel_values=tiles).pooler_output
        got = projector(tower(tiles))
    assert got.shape == (5, 4, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_pixel_shuffle_is_hfs():
    from transformers.models.llama4.modeling_llama4 import pixel_shuffle as hf_shuffle

    x = torch.randn(3, 64, 12)
    torch.testing.assert_close(pixel_shuffle(x, 0.5), hf_shuffle(x, 0.5))


@pytest.mark.parametrize("grid", [(1, 1), (1, 3), (2, 1), (2, 2), (3, 2)])
def test_span_layout_is_the_processors(grid):
    """From the first ``<|patch|>`` to the last, the tokens HF's processor writes."""
    from transformers import Llama4Processor

    text = Llama4Processor._prompt_split_image(None, grid, 3)
    names = {"<|patch|>": "P", "<|tile_x_separator|>": "X", "<|tile_y_separator|>": "Y",
             "<|image|>": "I", "<|image_start|>": "S", "<|image_end|>": "E"}
    kinds = [names[t + "|>"] for t in text.split("|>") if t]
    first, last = kinds.index("P"), len(kinds) - 1 - kinds[::-1].index("P")
    assert span_kinds(grid, 3) == kinds[first:last + 1]


def test_biggest_image_sets_the_encoder_budget(llama4_dir):
    from transformers import AutoConfig

    from tessellm.multimodal.encoder_budget import max_tokens_per_image

    # 4 tiles in a row and the global view: 5 x 4 patches, 3 X, 1 Y, <|image|>
    assert max_tokens_per_image(AutoConfig.from_pretrained(llama4_dir), llama4_dir) == 25


@pytest.mark.parametrize("overrides, match", [
    (dict(intermediate_size=64), "intermediate_size=64"),
    (dict(image_size=18), "image_size=18"),
    (dict(pixel_shuffle_ratio=0.3), "pixel_shuffle_ratio=0.3"),
    (dict(projector_input_dim=40), "projector_input_dim=40"),
])
def test_vision_configs_that_do_not_compose_are_refused(overrides, match):
    from transformers import Llama4VisionConfig

    with pytest.raises(ValueError, match=match):
        check_vision_config(Llama4VisionConfig(**_vision(**overrides)))
