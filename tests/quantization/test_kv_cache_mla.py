"""An fp8 KV cache with multi-head latent attention (DeepSeek-V2/V3's latent cache): no MLA
kernel stores latent rows in fp8, so ``kv_cache_dtype='fp8'`` is refused at load with one
sentence naming the option, MLA and the backend (before, emulated cuda blamed MLA itself and
pointed at the cpu backend, which cannot do it either, and the cpu named no MLA at all)."""

from __future__ import annotations

import pytest

from tessellm import LLM
from tessellm.quantization.support import UnsupportedQuantizationError
from tests.models.test_deepseek import deepseek_config


@pytest.mark.parametrize("engine", [dict(device="cpu"), dict(device="cuda", emulate=True)],
                         ids=["cpu", "emulated-cuda"])
def test_fp8_kv_cache_refused_for_mla(engine, tmp_path):
    config = deepseek_config(True, q_lora_rank=24)
    config.architectures = ["DeepseekV3ForCausalLM"]
    config.save_pretrained(tmp_path)
    backend = engine["device"]
    with pytest.raises(UnsupportedQuantizationError,
                       match=rf"kv_cache_dtype='fp8' is not supported with multi-head latent "
                             rf"attention .* on backend '{backend}'.* use kv_cache_dtype='auto'"):
        LLM(str(tmp_path), load_format="dummy", dtype="float32", kv_cache_dtype="fp8", **engine)
