"""A model-configs folder as a pre-quantized bitsandbytes NF4 checkpoint's (for
``--load-format dummy``: the weights drawn in 4-bit, nothing quantized on load).

    python3 benchmarks/bnb_prequantized_config.py benchmarks/model-configs/qwen3-30b-a3b /tmp/q3-bnb
"""

import json
import shutil
import sys
from pathlib import Path


def main(src: str, dst: str) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    path = Path(dst) / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
                                     "bnb_4bit_compute_dtype": "bfloat16"}
    path.write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
