"""The ``gpu`` mark for tests that run on either device: on cuda tensors (or the cuda backend on
the GPU) where a GPU is visible, else on the CPU (Triton's interpreter, the cpu backend).

The suite's GPU set is ``-m gpu`` (ci/matrix.yaml's cuda lane, benchmarks/gputests_device.sh);
the CPU suite is ``-m "not gpu"`` on a machine without one. Such a test belongs to both, so it
is marked ``gpu`` only where a GPU is visible: the CPU suite keeps it as it was, and a GPU
machine's ``-m gpu`` runs it on the device (tests/conftest.py: gpu-marked tests keep the real
``device="auto"``). Tests that only ever run on a GPU carry a plain ``@pytest.mark.gpu``.

    pytestmark = GPU_WHEN_PRESENT             # a module of such tests
    @gpu_when_present                         # one test
    pytest.param("cuda", marks=GPU_WHEN_PRESENT)  # one parameter
"""

from __future__ import annotations

import pytest
import torch

ON_GPU = torch.cuda.is_available()
GPU_WHEN_PRESENT = [pytest.mark.gpu] if ON_GPU else []


def gpu_when_present(test):
    """``test`` marked ``gpu`` where a GPU is visible; unchanged otherwise."""
    return pytest.mark.gpu(test) if ON_GPU else test
