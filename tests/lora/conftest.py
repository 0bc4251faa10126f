from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.lora.adapters")  # its shared checks report as a test's do

from tests.lora.adapters import make_adapters  # noqa: E402
# The factory, and its autouse fixture that stops a module's servers when the module ends
# (without it here, the factory's servers of tests/lora would live to the session's end).
from tests.server.conftest import _stop_the_modules_servers, server_factory  # noqa: F401 (fixtures)


@pytest.fixture(scope="session")
def lora_setup(tiny_model_dir, tmp_path_factory):
    """(model dir, {adapter name: dir}) for the tiny sharp Llama and three random adapters."""
    model = tiny_model_dir("llama-sharp")
    return model, make_adapters(model, str(tmp_path_factory.mktemp("adapters")))
