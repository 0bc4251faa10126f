"""Pipeline parallelism with images (two stages, gloo on CPU ranks): the vision tower runs on
the first stage, which embeds the prompt; the second gets hidden states. Greedy tokens equal
HF transformers' (float32) for image prompts and text in one batch; the models whose images
do not pipeline yet are refused by name."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)


def _requests(prompt, images, text):
    return [{"prompt": prompt, "multi_modal_data": {"image": im}} for im in images] + [text]


@pytest.mark.parametrize("kind", ["llava", "llava_next", "qwen2_vl", "mistral3", "llama4",
                                  "gemma3", "qwen3_vl"])
def test_two_stages_with_images_match_hf(kind, request):
    """Gemma 3 (four layers: the second stage's first layer feeds image rows to its second):
    the second stage's image rows see their whole image too (key limits from the requests'
    image spans, without an encoder cache there)."""
    if kind == "qwen3_vl":  # four layers: both DeepStack layers on the first stage
        from tests.multimodal import tiny_qwen2_vl as tiny

        path = tiny.make_tiny_qwen2_vl(str(request.getfixturevalue("tmp_path") / "q4"),
                                       kind="qwen3_vl", seed=2, num_layers=4)
        text = "<|im_start|>user\nDescribe a cat.<|im_end|>\n<|im_start|>assistant\n"
        images = [tiny.image(51), tiny.image(52, (24, 32))]
        want = tiny.hf_greedy(path, [tiny.PROMPT] * 2, [[im] for im in images], MAX_NEW,
                              kind="qwen3_vl")
    elif kind in ("mistral3", "llama4", "gemma3"):
        import importlib

        tiny = importlib.import_module(f"tests.multimodal.tiny_{kind}")
        path = request.getfixturevalue(f"{kind}_dir") if kind != "gemma3" else \
            tiny.make_tiny_gemma3(str(request.getfixturevalue("tmp_path") / "g4"), num_layers=4)
        text = getattr(tiny, "TEXT", "<s>[INST]Describe a cat.[/INST]")
        images = [tiny.image(51, (12, 14) if kind == "llama4" else (40, 52)),
                  tiny.image(52, (14, 40) if kind == "llama4" else (24, 32))]
        if kind == "gemma3":
            from tests.multimodal.tiny_llava import hf_greedy

            text = "<start_of_turn>user\nDescribe a cat.<end_of_turn>\n<start_of_turn>model\n"
            want = hf_greedy(path, [tiny.PROMPT] * 2, [[im] for im in images], MAX_NEW,
                             architecture="Gemma3ForConditionalGeneration")
        else:
            want = tiny.hf_greedy(path, [tiny.PROMPT] * 2, [[im] for im in images], MAX_NEW)
    elif kind == "llava_next":
        from tests.multimodal import tiny_llava_next as tiny
        from tests.multimodal.tiny_llava import image

        path, text = request.getfixturevalue("llava_next_dir"), "USER: Describe a cat. ASSISTANT:"
        images = [image(51, size=(30, 70)), image(52, size=(80, 30))]  # other tile grids
        want = tiny.hf_greedy(path, [tiny.PROMPT] * 2, images, MAX_NEW)
    elif kind == "llava":
        llava_dir = request.getfixturevalue("llava_dir")
        from tests.multimodal import tiny_llava as tiny

        path, text = llava_dir, "USER: Describe a cat. ASSISTANT:"
        images = [tiny.image(51), tiny.image(52)]
        want = tiny.hf_greedy(path, [tiny.PROMPT] * 2, images, MAX_NEW)
    else:
        from tests.multimodal import tiny_qwen2_vl as tiny

        qwen2_vl_dir = request.getfixturevalue("qwen2_vl_dir")
        path, text = qwen2_vl_dir, "<|im_start|>user\nDescribe a cat.<|im_end|>\n<|im_start|>assistant\n"
        images = [tiny.image(51), tiny.image(52, (24, 32))]
        want = tiny.hf_greedy(path, [tiny.PROMPT] * 2, [[im] for im in images], MAX_NEW)
    with LLM(path, dtype="float32", num_kv_blocks=64, block_size=4, device="cpu",
             pipeline_parallel_size=2) as llm:
        out = llm.generate(_requests(tiny.PROMPT, images, text), GREEDY, use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in out]
    assert got[:2] == want and want[0] != want[1]
    assert len(got[2]) == MAX_NEW


def test_deepstack_layers_off_the_first_stage_are_refused(qwen3_vl_dir):
    """Qwen3-VL of two layers: its two DeepStack layers would span both stages."""
    with pytest.raises(Exception, match="needs its 2 DeepStack layers on the first stage, which "
                                        "holds 1"):
        LLM(qwen3_vl_dir, dtype="float32", num_kv_blocks=16, device="cpu",
            pipeline_parallel_size=2)
