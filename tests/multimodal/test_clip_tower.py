"""tessellm's CLIP vision tower against transformers' CLIPVisionModel (float32): the hidden
states LLaVA selects (one layer, or several concatenated), with weights copied by name."""

from __future__ import annotations

import pytest
import torch

from tessellm.models.clip import CLIPVisionTower


def _pair(layers, act="quick_gelu"):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=48, num_attention_heads=4, intermediate_size=96,
                              num_hidden_layers=4, image_size=42, patch_size=6, hidden_act=act)
    torch.manual_seed(7)
    hf = CLIPVisionModel(config).eval()
    ours = CLIPVisionTower(config, layers).eval()
    state = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
    missing = {n for n, _ in ours.named_parameters()} - set(state)
    assert not missing
    ours.load_state_dict({k: v for k, v in state.items() if k in dict(ours.named_parameters())})
    return hf, ours


@pytest.mark.parametrize("layers", [[-2], [-1], [0], [-3, -1]])
def test_selected_hidden_states_match_hf(layers):
    hf, ours = _pair(layers)
    pixels = torch.randn(3, 3, 42, 42)
    with torch.no_grad():
        states = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
        want = torch.cat([states[i] for i in layers], dim=-1)
        got = ours(pixels)
    assert got.shape == want.shape == (3, 50, 48 * len(layers))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_only_the_layers_needed_are_built():
    _, ours = _pair([-2])
    assert len(ours.encoder.layers) == 3  # layer 4's output is never read


def test_wrong_image_size_is_refused():
    _, ours = _pair([-2])
    with pytest.raises(ValueError, match="takes 42x42 images"):
        ours(torch.randn(1, 3, 40, 40))
