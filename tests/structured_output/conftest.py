"""Fixtures of the structured-output tests."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def tiny_llm_args(tiny_model_dir, tmp_path_factory) -> dict:
    """``LLM(**tiny_llm_args)``: a tiny random llama with a small byte-level BPE tokenizer
    (tests/pooling/conftest.py), small and eager on the cpu: fast, and it takes text."""
    from tests.pooling.conftest import save_tokenizer

    path = str(tmp_path_factory.mktemp("structured") / "llama")
    shutil.copytree(tiny_model_dir("llama"), path)
    save_tokenizer(path)
    return dict(model=path, device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64,
                enforce_eager=True)
