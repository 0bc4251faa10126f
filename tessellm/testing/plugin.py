"""pytest plugin of the conformance suite: the ``--backend``/``--emulate`` options and the
fixtures every conformance test uses. Load it with ``-p tessellm.testing.plugin``."""

from __future__ import annotations

import os

import pytest

from tessellm.testing.harness import ConformanceTarget


def pytest_addoption(parser):
    group = parser.getgroup("tessellm", "tessellm backend conformance")
    group.addoption("--backend", dest="tessellm_backend", default="cpu",
                    help="backend (the --device name) the conformance suite checks; default cpu")
    group.addoption("--emulate", dest="tessellm_emulate", action="store_true",
                    help="run a backend whose device is absent on CPU tensors (kernel-level "
                         "tests only; Triton kernels need TRITON_INTERPRET=1)")


def pytest_configure(config):
    # Every call of the plugin's kernel and ops is checked (backends/checked.py), not only the
    # first steps: a wrong shape, dtype or layout fails with the plugin's name.
    os.environ.setdefault("TESSELLM_VALIDATE_PLUGINS", "1")


def pytest_report_header(config):
    return (f"tessellm conformance: backend={config.getoption('tessellm_backend', 'cpu')} "
            f"emulate={config.getoption('tessellm_emulate', False)} "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")


@pytest.fixture(scope="session")
def target(request) -> ConformanceTarget:
    """The backend under test, the registry it came from, and the device tensors go to."""
    name = request.config.getoption("tessellm_backend", default="cpu")
    emulate = request.config.getoption("tessellm_emulate", default=False)
    try:
        return ConformanceTarget.resolve(name, emulate)
    except Exception as exc:  # noqa: BLE001 - one clear message instead of N errors
        pytest.exit(f"tessellm conformance: {exc}", returncode=4)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A tiny random Llama (config.json + model.safetensors), built here, never downloaded."""
    from tessellm.testing.harness import save_tiny_llama

    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))
