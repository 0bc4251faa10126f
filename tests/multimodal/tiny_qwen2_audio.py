"""A tiny random Qwen2-Audio (a 2-layer Whisper-style encoder over 16 mel bins, 2 s windows; a
2-layer Qwen2 language model) with its tokenizer and ``Qwen2AudioProcessor`` (a
``WhisperFeatureExtractor`` with ``chunk_length=2``), built and saved offline, and HF
transformers' greedy tokens on it: the reference for tests/multimodal/test_qwen2_audio*.py.

A clip of ``s`` seconds at 16 kHz gives ``100 s`` mel frames (at most 200), ``50 s`` encoder
positions and about ``25 s`` placeholder tokens (at most 50): 0.6 s -> 15, 0.3 s -> 7.
"""

from __future__ import annotations

import numpy as np

from tests.tiny_tokenizer import bpe_tokenizer

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|audio_eos|>",
           "<|AUDIO|>"]
AUDIO_PAD = 5  # SPECIAL's ids are their indices
AUDIO = "<|audio_bos|><|AUDIO|><|audio_eos|>"
PROMPT = f"<|im_start|>user\nAudio 1: {AUDIO}\nWhat is this sound?<|im_end|>\n<|im_start|>assistant\n"
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SAMPLING_RATE = 16000


def _tokenizer():
    return bpe_tokenizer(["user What is this sound? assistant a dog barking Audio 1: 2:",
                          "Describe the audio."] * 20,
                         SPECIAL, 300, CHAT_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def config():
    import transformers

    text = dict(model_type="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=2, intermediate_size=128, vocab_size=320,
                max_position_embeddings=512, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    audio = dict(model_type="qwen2_audio_encoder", num_mel_bins=16, encoder_layers=2,
                 encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
                 max_source_positions=100, init_std=0.2)
    return transformers.Qwen2AudioConfig(audio_config=audio, text_config=text,
                                         audio_token_index=AUDIO_PAD,
                                         architectures=["Qwen2AudioForConditionalGeneration"])


def feature_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=16, sampling_rate=SAMPLING_RATE, hop_length=160,
                                   chunk_length=2, n_fft=400)


def make_tiny_qwen2_audio(path: str, seed: int = 0) -> str:
    """Saves config, float32 safetensors, tokenizer and the processor (feature extractor,
    chat template)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen2AudioForConditionalGeneration(config()).to(torch.float32)
    with torch.no_grad():  # larger projector weights: the audio visibly moves the logits
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(8.0)
    model.save_pretrained(path)
    tok = _tokenizer()
    transformers.Qwen2AudioProcessor(feature_extractor(), tok,
                                     chat_template=CHAT_TEMPLATE).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def clip(seed: int, seconds: float = 0.6, rate: int = SAMPLING_RATE) -> np.ndarray:
    """A random float32 waveform (a few tones and noise) of ``seconds`` at ``rate``."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = sum(rng.uniform(0.1, 0.5) * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) for _ in range(3))
    return (wave + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def hf_inputs(path: str, prompt: str, audios: list):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(path)
    if not audios:
        return dict(proc.tokenizer(prompt, return_tensors="pt"))
    return dict(proc(text=prompt, audio=audios, sampling_rate=SAMPLING_RATE, return_tensors="pt"))


def hf_greedy(path: str, prompts: list[str], audios: list, max_new_tokens: int) -> list[list[int]]:
    """HF generate, float32, one prompt at a time; ``audios[i]``: prompt i's list of 16 kHz clips."""
    import torch
    import transformers

    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for prompt, clips in zip(prompts, audios):
        inputs = hf_inputs(path, prompt, clips)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        outs.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return outs
