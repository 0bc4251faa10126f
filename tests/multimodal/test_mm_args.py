"""The engine arguments about images, checked before anything loads, and what an image model
does not combine with yet (refused by name at start-up)."""

from __future__ import annotations

import pytest

from tessellm.config import EngineArgs
from tessellm.multimodal.limits import parse_mm_limits


@pytest.mark.parametrize("value,want", [(None, {}), ({"image": 2}, {"image": 2}),
                                        ('{"image": 3}', {"image": 3}), ("image=4", {"image": 4})])
def test_limit_mm_per_prompt_forms(value, want):
    assert parse_mm_limits(value) == want


@pytest.mark.parametrize("kwargs,match", [
    ({"limit_mm_per_prompt": '{"image": 2'}, "not valid JSON"),
    ({"limit_mm_per_prompt": {"speech": 1}}, "names 'speech'"),
    ({"limit_mm_per_prompt": {"image": -1}}, "count >= 0"),
    ({"allowed_local_media_path": "/no/such/dir"}, "is not a directory"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(**kwargs).validate()


@pytest.mark.parametrize("kwargs,name", [
    ({"runner": "pooling"}, "runner='pooling'"),
])
def test_image_model_refuses_what_it_does_not_support_yet(llava_dir, kwargs, name):
    from tessellm import LLM

    with pytest.raises(ValueError, match=f"{name} does not combine with an image model"):
        LLM(llava_dir, dtype="float32", num_kv_blocks=16, **kwargs)
