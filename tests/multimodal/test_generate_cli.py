"""``tessellm generate --image FILE``: the chat prompt with the image (or ``<image>`` in a
plain prompt), the same text as ``LLM.chat`` / ``LLM.generate`` give."""

from __future__ import annotations

import os
import subprocess
import sys

from tessellm import LLM, SamplingParams
from tests.multimodal.tiny_llava import PROMPT, image

ARGS = ["--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "32", "--block-size", "4", "--max-tokens", "6"]


def _cli(llava_dir, *args):
    out = subprocess.run([sys.executable, "-m", "tessellm.entrypoints.cli", "generate", *args,
                          "--model", llava_dir, *ARGS], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_generate_with_an_image_file(llava_dir, tmp_path):
    path = tmp_path / "cat.png"
    image(70).save(path)
    chat = _cli(llava_dir, "What is this?", "--image", str(path))
    plain = _cli(llava_dir, PROMPT, "--image", str(path), "--no-chat")
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    with LLM(llava_dir, dtype="float32", num_kv_blocks=32, block_size=4) as llm:
        want_chat = llm.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": image(70)},
                                                           {"type": "text", "text": "What is this?"}]}],
                             greedy)[0].outputs[0].text
        want_plain = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": image(70)}},
                                  greedy)[0].outputs[0].text
    assert chat == want_chat + "\n"
    assert plain == want_plain + "\n"
