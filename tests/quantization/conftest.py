"""Quantization tests run kernels on a GPU when there is one, else through Triton's interpreter.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, so it is set here, before any
test module imports triton or a kernel module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def bundled_model() -> str:
    """Path of the bundled SmolLM2 Q4_1 GGUF; skips where it is not installed (device machines)."""
    from tessellm.loader.default_model import default_model_path

    pytest.importorskip("gguf")
    try:
        return default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
