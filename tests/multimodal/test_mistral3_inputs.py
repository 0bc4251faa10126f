"""Mistral 3's front end: the placeholder layout of each image (rows of [IMG] closed by
[IMG_BREAK], the last by [IMG_END]) from the HF image processor's sizes, spans over whole
layouts, refusals that name the fix, and the encoder budget's biggest image."""

from __future__ import annotations

import pytest

from tessellm.multimodal.encoder_budget import max_tokens_per_image
from tessellm.multimodal.mistral3_inputs import Mistral3ImageInputs
from tests.multimodal.tiny_mistral3 import IMG, IMG_BREAK, IMG_END, hf_inputs, image


@pytest.fixture(scope="module")
def inputs(mistral3_dir):
    return Mistral3ImageInputs(mistral3_dir, 2)


def test_layout_and_span_of_each_image(inputs, mistral3_dir):
    """A 24x32 image is 3 x 4 merged patches: 3 rows of 4 [IMG] and a break (the last an end),
    15 tokens from its first [IMG]; its pixels are cut back from the batch's padding."""
    images = [image(1, (24, 32)), image(2)]
    ids, feats = inputs.process("<s>[INST][IMG] and [IMG]?[/INST]", images)
    assert ids == hf_inputs(mistral3_dir, "<s>[INST][IMG] and [IMG]?[/INST]", images)["input_ids"][0].tolist()
    first = feats[0]
    assert ids[first.offset:first.end] == ([IMG] * 4 + [IMG_BREAK]) * 2 + [IMG] * 4 + [IMG_END]
    assert first.image_size == [24, 32] and first.shape == [3, 24, 32]
    second = feats[1]
    assert ids[second.end - 1] == IMG_END and second.offset > first.end
    assert second.length == 5 * 8 and second.shape == [3, 40, 56]


def test_refusals_name_the_fix(inputs):
    ids, _ = inputs.process([1, 3, IMG, 4], [image(3, (24, 32))])
    broken = list(ids)
    broken[ids.index(IMG_BREAK)] = IMG  # the right [IMG] count, the wrong layout
    broken[ids.index(IMG)] = IMG_BREAK
    with pytest.raises(ValueError, match=r"not its 3 rows of 4 \[IMG\]"):
        inputs.process(broken, [image(3, (24, 32))])
    with pytest.raises(ValueError, match=r"2 \[IMG\] tokens .* for 1 image"):
        inputs.process([1, IMG, IMG, 4], [image(3)])
    with pytest.raises(ValueError, match="but no image"):
        inputs.check_without_images([1, IMG, 4])
    with pytest.raises(ValueError, match="over the limit of 2"):
        inputs.process([IMG] * 3, [image(i) for i in range(3)])


def test_encoder_budget_biggest_image(mistral3_dir):
    """The processor's longest edge (64 px) in 8 px merged patches: 8 rows of 8 and a break."""
    from transformers import AutoConfig

    assert max_tokens_per_image(AutoConfig.from_pretrained(mistral3_dir), mistral3_dir) == 8 * 9
