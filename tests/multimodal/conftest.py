import pytest


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    from tests.multimodal.tiny_llava import make_tiny_llava

    return make_tiny_llava(str(tmp_path_factory.mktemp("tiny-llava")))


@pytest.fixture(scope="session")
def llava_next_dir(tmp_path_factory):
    from tests.multimodal.tiny_llava_next import make_tiny_llava_next

    return make_tiny_llava_next(str(tmp_path_factory.mktemp("tiny-llava-next")))


@pytest.fixture(scope="session")
def qwen2_vl_dir(tmp_path_factory):
    from tests.multimodal.tiny_qwen2_vl import make_tiny_qwen2_vl

    return make_tiny_qwen2_vl(str(tmp_path_factory.mktemp("tiny-qwen2-vl")))


@pytest.fixture(scope="session")
def qwen2_5_vl_dir(tmp_path_factory):
    from tests.multimodal.tiny_qwen2_vl import make_tiny_qwen2_vl

    return make_tiny_qwen2_vl(str(tmp_path_factory.mktemp("tiny-qwen2.5-vl")), kind="qwen2_5_vl", seed=1)


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory):
    from tests.multimodal.tiny_gemma3 import make_tiny_gemma3

    return make_tiny_gemma3(str(tmp_path_factory.mktemp("tiny-gemma3")))


@pytest.fixture(scope="session")
def mistral3_dir(tmp_path_factory):
    from tests.multimodal.tiny_mistral3 import make_tiny_mistral3

    return make_tiny_mistral3(str(tmp_path_factory.mktemp("tiny-mistral3")))


@pytest.fixture(scope="session")
def qwen3_vl_dir(tmp_path_factory):
    from tests.multimodal.tiny_qwen2_vl import make_tiny_qwen2_vl

    return make_tiny_qwen2_vl(str(tmp_path_factory.mktemp("tiny-qwen3-vl")), kind="qwen3_vl", seed=2)


@pytest.fixture(scope="session")
def llama4_dir(tmp_path_factory):
    from tests.multimodal.tiny_llama4 import make_tiny_llama4

    return make_tiny_llama4(str(tmp_path_factory.mktemp("tiny-llama4")))


@pytest.fixture(scope="session")
def ministral3_dir(tmp_path_factory):
    from tests.multimodal.tiny_mistral3 import make_tiny_mistral3

    return make_tiny_mistral3(str(tmp_path_factory.mktemp("tiny-ministral3")), seed=3,
                              text_type="ministral3")


@pytest.fixture(scope="session")
def pixtral_llava_dir(tmp_path_factory):
    from tests.multimodal.tiny_mistral3 import make_tiny_mistral3

    return make_tiny_mistral3(str(tmp_path_factory.mktemp("tiny-pixtral-llava")), seed=4,
                              text_type="pixtral_llava")


@pytest.fixture(scope="session")
def qwen3_vl_moe_dir(tmp_path_factory):
    from tests.multimodal.tiny_qwen2_vl import make_tiny_qwen2_vl

    return make_tiny_qwen2_vl(str(tmp_path_factory.mktemp("tiny-qwen3-vl-moe")), kind="qwen3_vl_moe",
                              seed=5)


@pytest.fixture(scope="session")
def qwen2_audio_dir(tmp_path_factory):
    from tests.multimodal.tiny_qwen2_audio import make_tiny_qwen2_audio

    return make_tiny_qwen2_audio(str(tmp_path_factory.mktemp("tiny-qwen2-audio")))
