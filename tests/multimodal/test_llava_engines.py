"""Image requests on the other engine shapes: async scheduling (the GPU default: step N+1 is
scheduled while step N runs) and tensor parallelism (two CPU ranks over gloo: the images go
to every rank's runner through the step codec, the vision tower is replicated)."""

from __future__ import annotations

from tessellm import LLM, SamplingParams
from tests.multimodal.tiny_llava import PROMPT, hf_greedy, image

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
PROMPTS = [PROMPT, "USER: <image>\nDescribe the image. ASSISTANT:"]


def _generate(llm, images):
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(PROMPTS, images)],
                        GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_async_scheduling_with_chunked_images(llava_dir):
    images = [image(50), image(51)]
    with LLM(llava_dir, dtype="float32", num_kv_blocks=64, block_size=4, async_scheduling=True,
             max_num_batched_tokens=8) as llm:
        assert llm.engine.core.async_scheduling
        got = _generate(llm, images)
    assert got == hf_greedy(llava_dir, PROMPTS, images, MAX_NEW)


def test_tensor_parallel_two_ranks(llava_dir):
    images = [image(52), image(53)]
    with LLM(llava_dir, device="cpu", dtype="float32", num_kv_blocks=64, block_size=4,
             tensor_parallel_size=2) as llm:
        got = _generate(llm, images)
    assert got == hf_greedy(llava_dir, PROMPTS, images, MAX_NEW)
