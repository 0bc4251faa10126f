"""Fixtures of the engine-level speculation tests (the batch itself: spec_cases.py)."""

from __future__ import annotations

import pytest

from tessellm import LLM

from spec_cases import ENGINE, generate


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def want(model):
    """Greedy tokens of spec_cases.PROMPTS without speculation."""
    with LLM(model, **ENGINE) as llm:
        return generate(llm)
