"""Quantization tests run kernels on a GPU when there is one, else through Triton's interpreter.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, so it is set here, before any
test module imports triton or a kernel module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
