"""LLaVA-NeXT's placeholder count per image, tessellm's own (``llava_next.image_feature_size``:
the pinpoint choice, the unpadded patch grid, a newline per row, the base tile), equal to what
transformers' LlavaNextProcessor produces over grids of several tile and patch sizes and a
range of image sizes and aspect ratios; the front end uses it for LlavaNextProcessor, checks
that processor's settings against config.json, and keeps another processor class's own count."""

from __future__ import annotations

import itertools

import pytest

from tessellm.models.llava_next import best_pinpoint, image_feature_size
from tests.multimodal.tiny_llava import _tokenizer
from tests.multimodal.tiny_llava_next import PINPOINTS, PROMPT

# (tile, patch, pinpoints): the tiny test model's; llava-v1.6's (336 px, 24x24 patches); an odd
# patch side (384 / 14 = 27: the padding halves round down) with 1x3 and 3x1 grids.
GRIDS = [
    (28, 7, PINPOINTS),
    (336, 14, [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
    (384, 14, [[384, 384], [384, 768], [768, 384], [768, 768], [384, 1152], [1152, 384]]),
]
SIDES = [1, 7, 28, 30, 57, 100, 333, 336, 337, 500, 671, 1000, 2048]


def _config_and_processor(tile: int, patch: int, pinpoints, **processor_kwargs):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    config = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=tile, patch_size=patch),
                             text_config=LlamaConfig(), image_grid_pinpoints=pinpoints,
                             vision_feature_select_strategy="default")
    images = LlavaNextImageProcessor(size={"shortest_edge": tile},
                                     crop_size={"height": tile, "width": tile},
                                     image_grid_pinpoints=pinpoints)
    kwargs = dict(patch_size=patch, vision_feature_select_strategy="default",
                  num_additional_image_tokens=1)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=_tokenizer(),
                                   **{**kwargs, **processor_kwargs})
    return config, processor


@pytest.mark.parametrize("tile, patch, pinpoints", GRIDS, ids=["tiny-28", "v1.6-336", "odd-384"])
def test_count_equals_the_hf_processors(tile, patch, pinpoints):
    """169 sizes a grid (1 to 2048 px each side: every pinpoint chosen, padding on either axis,
    none): the count equals the processor's, and the pinpoint equals
    transformers' ``select_best_resolution``."""
    from transformers.image_processing_utils import select_best_resolution

    config, processor = _config_and_processor(tile, patch, pinpoints)
    sizes = [list(s) for s in itertools.product(SIDES, SIDES)]
    want = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    got = [image_feature_size(s, config) for s in sizes]
    assert got == want
    assert len(set(got)) > len(pinpoints)  # the sizes exercise the unpadding, not just the grids
    assert [best_pinpoint(s, pinpoints) for s in sizes] == [
        tuple(select_best_resolution(s, pinpoints)) for s in sizes]


def test_front_end_counts_match_the_processors_expansion(llava_next_dir):
    """A text prompt (the processor expands ``<image>`` itself) and a token-id prompt (tessellm
    expands it with its own count) give the same ids for images of four aspect ratios."""
    from tessellm.multimodal.processor import ImageProcessor
    from tests.multimodal.tiny_llava import image

    front = ImageProcessor(llava_next_dir, max_images=1)
    for size in [(30, 70), (80, 30), (50, 52), (11, 13)]:
        img = image(7, size=size)
        text_ids, _ = front.process(PROMPT, [img])
        plain = front.hf.tokenizer(PROMPT)["input_ids"]
        ids, feats = front.process(plain, [img])
        assert ids == text_ids
        assert front._anyres_count == "own"
        assert feats[0].length == image_feature_size(feats[0].image_size, front.config)


def test_processor_that_disagrees_with_the_config_is_refused(llava_next_dir):
    """Its <image> expansion would not be the model's feature count: refused naming the field."""
    from tessellm.multimodal.processor import ImageProcessor
    from tests.multimodal.tiny_llava import image

    front = ImageProcessor(llava_next_dir, max_images=1)
    _, other = _config_and_processor(28, 7, PINPOINTS[:2])
    front.__dict__["hf"] = other
    with pytest.raises(ValueError, match=r"LlavaNextProcessor does not match its config.json: "
                                         r"image_grid_pinpoints .*\[\[28, 28\], \[28, 56\]\]"):
        front.process(PROMPT, [image(7, size=(30, 70))])


def test_another_processor_class_keeps_its_own_count(llava_next_dir):
    """A processor of another class (here a subclass that counts one token more per image):
    tessellm takes its count rather than assuming LlavaNextProcessor's rule."""
    from transformers import AutoProcessor, LlavaNextProcessor

    from tessellm.multimodal.processor import ImageProcessor
    from tests.multimodal.tiny_llava import image

    class OtherProcessor(LlavaNextProcessor):
        def _get_number_of_features(self, *args):
            return super()._get_number_of_features(*args) + 1

    base = AutoProcessor.from_pretrained(llava_next_dir)
    other = OtherProcessor(image_processor=base.image_processor, tokenizer=base.tokenizer,
                           patch_size=base.patch_size, vision_feature_select_strategy="default",
                           num_additional_image_tokens=1)
    front = ImageProcessor(llava_next_dir, max_images=1)
    front.__dict__["hf"] = other
    img = image(7, size=(30, 70))
    ids, feats = front.process(PROMPT, [img])
    assert front._anyres_count == "processor"
    assert feats[0].length == image_feature_size((30, 70), front.config) + 1
    assert ids.count(front.image_token_id) == feats[0].length
