"""The image parity tests' requests: a prompt with its images (a text-only prompt as it is),
and one batch of them generated (Gemma 3, Mistral 3, Qwen2-VL, Qwen3-VL)."""

from __future__ import annotations


def image_request(prompt, images):
    """``prompt`` with its images for ``LLM.generate``; without images, the prompt alone."""
    return {"prompt": prompt, "multi_modal_data": {"image": images}} if images else prompt


def generate(llm, prompts, images, params):
    """Per prompt its generated token ids, and the outputs (``images[i]``: prompt i's list)."""
    out = llm.generate([image_request(p, im) for p, im in zip(prompts, images)], params,
                       use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in out], out
