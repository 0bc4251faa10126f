import pytest


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    from tests.multimodal.tiny_llava import make_tiny_llava

    return make_tiny_llava(str(tmp_path_factory.mktemp("tiny-llava")))


@pytest.fixture(scope="session")
def llava_next_dir(tmp_path_factory):
    from tests.multimodal.tiny_llava_next import make_tiny_llava_next

    return make_tiny_llava_next(str(tmp_path_factory.mktemp("tiny-llava-next")))
