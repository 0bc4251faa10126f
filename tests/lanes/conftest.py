import pytest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from tessellm.testing.harness import save_tiny_llama

    return save_tiny_llama(str(tmp_path_factory.mktemp("lanes-llama")))
