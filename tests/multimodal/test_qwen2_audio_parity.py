"""Qwen2-Audio greedy tokens equal HF transformers' (float32): clips of different lengths (so
different placeholder counts) and a text-only prompt in one batch, two clips in one prompt, a
clip at another sampling rate (resampled), prompts as token ids, chunked prefill splitting a
clip's placeholders, and the prefix cache over clips (the same clip hits, another misses)."""

from __future__ import annotations

import numpy as np
import pytest

from tessellm import LLM, SamplingParams
from tests.multimodal.tiny_qwen2_audio import AUDIO, AUDIO_PAD, PROMPT, SAMPLING_RATE, clip, hf_greedy

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
TWO = (f"<|im_start|>user\nAudio 1: {AUDIO}\nAudio 2: {AUDIO}\nCompare them.<|im_end|>\n"
       "<|im_start|>assistant\n")
TEXT = "<|im_start|>user\nDescribe the audio.<|im_end|>\n<|im_start|>assistant\n"
BS = 4


def _request(prompt, clips):
    if not clips:
        return prompt
    return {"prompt": prompt, "multi_modal_data": {"audio": [(c, SAMPLING_RATE) for c in clips]}}


def _generate(llm, prompts, clips, params=GREEDY):
    out = llm.generate([_request(p, c) for p, c in zip(prompts, clips)], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in out], out


@pytest.fixture(scope="module")
def llm(qwen2_audio_dir):
    with LLM(qwen2_audio_dir, dtype="float32", num_kv_blocks=128, block_size=BS,
             limit_mm_per_prompt={"audio": 2}) as llm:
        yield llm


def test_batch_of_lengths_two_clips_and_text_matches_hf(llm, qwen2_audio_dir):
    """One batch: two 0.6 s clips (15 placeholders each), a prompt with a 0.3 s (7) and a
    1.9 s (47) clip, and a text-only prompt."""
    prompts = [PROMPT, PROMPT, TWO, TEXT]
    clips = [[clip(1)], [clip(2)], [clip(3, 0.3), clip(4, 1.9)], []]
    got, out = _generate(llm, prompts, clips)
    assert [o.prompt_token_ids.count(AUDIO_PAD) for o in out] == [15, 15, 54, 0]
    want = hf_greedy(qwen2_audio_dir, prompts, clips, MAX_NEW)
    assert got == want
    assert want[0] != want[1]  # the clip decides the output (same text)


def test_clip_longer_than_the_window_is_cut_to_it(llm, qwen2_audio_dir):
    """A 3 s clip in the 2 s window: cut as HF's processor cuts it (50 placeholders)."""
    got, out = _generate(llm, [PROMPT], [[clip(5, 3.0)]])
    assert out[0].prompt_token_ids.count(AUDIO_PAD) == 50
    assert got == hf_greedy(qwen2_audio_dir, [PROMPT], [[clip(5, 3.0)]], MAX_NEW)


def test_other_sampling_rate_is_resampled(llm, qwen2_audio_dir):
    """A clip given at 8 kHz is resampled to 16 kHz (``scipy.signal.resample_poly``): the
    tokens are HF's on the same resampled clip, and differ from the 8 kHz samples read as 16 kHz."""
    from scipy.signal import resample_poly

    slow = clip(6, 0.6, rate=8000)
    out = llm.generate({"prompt": PROMPT, "multi_modal_data": {"audio": (slow, 8000)}}, GREEDY,
                       use_tqdm=False)[0]
    assert out.prompt_token_ids.count(AUDIO_PAD) == 15
    want = hf_greedy(qwen2_audio_dir, [PROMPT], [[resample_poly(slow, 2, 1).astype(np.float32)]], MAX_NEW)
    assert list(out.outputs[0].token_ids) == want[0]
    as_is, _ = _generate(llm, [PROMPT], [[slow]])
    assert as_is[0] != want[0]


def test_token_id_prompts_expand_to_the_text_prompts_ids(llm, qwen2_audio_dir):
    tok = llm.get_tokenizer()
    clips = [clip(7, 0.3), clip(8)]
    one_each = tok.encode(TWO)
    assert one_each.count(AUDIO_PAD) == 2
    got, out = _ids_generate(llm, one_each, clips)
    assert got == hf_greedy(qwen2_audio_dir, [TWO], [clips], MAX_NEW)[0]
    again, _ = _ids_generate(llm, out.prompt_token_ids, clips)  # expanded already
    assert again == got
    with pytest.raises(ValueError, match="3 audio placeholder tokens .* for 2 clip"):
        _ids_generate(llm, one_each + [AUDIO_PAD], clips)


def _ids_generate(llm, ids, clips):
    out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"audio": clips}}, GREEDY,
                       use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), out


def test_chunked_prefill_splits_a_clips_placeholders(qwen2_audio_dir):
    """8 tokens a step: the 47-token clip spans seven steps, the encoder runs once per clip."""
    prompts = [TWO, PROMPT]
    clips = [[clip(9, 1.9), clip(10, 0.3)], [clip(11)]]
    want = hf_greedy(qwen2_audio_dir, prompts, clips, MAX_NEW)
    with LLM(qwen2_audio_dir, dtype="float32", num_kv_blocks=128, block_size=BS,
             max_num_batched_tokens=8, enable_prefix_caching=False,
             limit_mm_per_prompt={"audio": 2}) as llm:
        got, _ = _generate(llm, prompts, clips)
        cache = llm.engine.core.runner.encoder_cache
        assert cache.num_encoded == 3 and not cache.features
    assert got == want


def test_prefix_cache_same_clip_hits_other_clip_misses(llm, qwen2_audio_dir):
    """The same clip again reuses its blocks without running the encoder; another clip of the
    same length shares only the blocks before its placeholders."""
    cache = llm.engine.core.runner.encoder_cache
    before = cache.num_encoded
    first, a = _generate(llm, [PROMPT], [[clip(12)]])
    assert cache.num_encoded == before + 1
    again, b = _generate(llm, [PROMPT], [[clip(12).copy()]])
    end = a[0].prompt_token_ids.index(AUDIO_PAD) + 15
    assert b[0].num_cached_tokens >= end and cache.num_encoded == before + 1
    other, c = _generate(llm, [PROMPT], [[clip(13)]])
    offset = a[0].prompt_token_ids.index(AUDIO_PAD)
    assert c[0].prompt_token_ids == a[0].prompt_token_ids
    assert c[0].num_cached_tokens == offset // BS * BS and cache.num_encoded == before + 2
    want = hf_greedy(qwen2_audio_dir, [PROMPT, PROMPT], [[clip(12)], [clip(13)]], MAX_NEW)
    assert [first[0], again[0], other[0]] == [want[0], want[0], want[1]]


@pytest.mark.parametrize("data, match", [
    ({"audio": [clip(1)] * 3}, "3 audio clips, over the limit of 2"),
    # counted before any clip is resampled (was: the rate's error, after resampling the others)
    ({"audio": [(clip(1), 44100)] * 2 + [(clip(1), 0)]}, "3 audio clips, over the limit of 2"),
    ({"audio": (clip(1), 0)}, "sampling rate 0"),
    ({"audio": np.zeros((2, 100), np.float32)}, "shape \\(2, 100\\)"),
    ({"audio": "loud.wav"}, "shape \\(\\)|is a str"),
    ({"audio": [np.array([np.nan], np.float32)]}, "NaN"),
    ({"image": [object()]}, "takes audio, not images"),
    # 20 ms at 16 kHz: 2 mel frames, no placeholder (an IndexError from the span search before)
    ({"audio": [(clip(1)[:320], SAMPLING_RATE)]}, "too short for the model: 320 samples .*at least 321"),
    ({"audio": [(clip(1)[:160], SAMPLING_RATE // 2)]}, "too short for the model: 320 samples"),
])
def test_bad_audio_is_refused_and_the_engine_keeps_serving(llm, data, match):
    with pytest.raises(ValueError, match=match):
        llm.generate({"prompt": PROMPT, "multi_modal_data": data}, GREEDY, use_tqdm=False)
    assert _generate(llm, [TEXT], [[]])[0][0]  # still serving


def test_mm_processor_kwargs_are_refused_by_name(llm):
    """Qwen2-Audio reads no per-request processor settings: refused, not silently ignored."""
    prompt = {"prompt": PROMPT, "multi_modal_data": {"audio": [clip(1)]},
              "mm_processor_kwargs": {"sampling_rate": 8000}}
    with pytest.raises(ValueError, match="mm_processor_kwargs 'sampling_rate' not supported"):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    # nor the image families' pixel keys, which the audio front end would not read
    prompt["mm_processor_kwargs"] = {"do_normalize": False}
    with pytest.raises(ValueError, match="mm_processor_kwargs 'do_normalize' not supported"):
        llm.generate(prompt, GREEDY, use_tqdm=False)


def test_placeholder_without_audio_is_refused(llm):
    with pytest.raises(ValueError, match="audio placeholder tokens"):
        llm.generate(PROMPT, GREEDY, use_tqdm=False)


def test_limit_mm_per_prompt_names_only_audio(qwen2_audio_dir):
    """An image limit for Qwen2-Audio, an audio limit for an image model: refused by name."""
    from types import SimpleNamespace

    import transformers

    from tessellm.multimodal.limits import model_mm_limits

    with pytest.raises(ValueError, match="takes audio only"):
        LLM(qwen2_audio_dir, dtype="float32", num_kv_blocks=32, limit_mm_per_prompt={"image": 1})
    llava = transformers.LlavaConfig(architectures=["LlavaForConditionalGeneration"])
    with pytest.raises(ValueError, match="names 'audio' but LlavaForConditionalGeneration takes no audio"):
        model_mm_limits(llava, SimpleNamespace(limit_mm_per_prompt={"audio": 1}))
    assert model_mm_limits(llava, SimpleNamespace(limit_mm_per_prompt={"audio": 0})) == {"image": 1}


def test_tensor_parallel_two_ranks_with_async_scheduling(qwen2_audio_dir):
    """The encoder replicated on two CPU ranks (the language model split), steps scheduled
    ahead, 8-token chunks through the clips: HF's tokens."""
    prompts, clips = [TWO], [[clip(14, 1.1), clip(15, 0.3)]]
    with LLM(qwen2_audio_dir, device="cpu", dtype="float32", num_kv_blocks=64, block_size=BS,
             tensor_parallel_size=2, async_scheduling=True, max_num_batched_tokens=8,
             limit_mm_per_prompt={"audio": 2}) as llm:
        got, _ = _generate(llm, prompts, clips)
    assert got == hf_greedy(qwen2_audio_dir, prompts, clips, MAX_NEW)


def test_audio_to_a_text_only_model_is_refused_by_name(tiny_model_dir):
    with LLM(tiny_model_dir("llama"), dtype="float32", num_kv_blocks=16) as llm:
        with pytest.raises(ValueError, match="text-only: it does not take images or audio"):
            llm.generate({"prompt_token_ids": [1, 2, 3], "multi_modal_data": {"audio": clip(1)}}, GREEDY,
                         use_tqdm=False)
        assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_shortest_clip_gives_one_placeholder_as_hf_counts(llm):
    """321 samples: 3 mel frames, 1 placeholder (HF's count); the engine runs it."""
    got, out = _generate(llm, [PROMPT], [[clip(1)[:321]]])
    assert out[0].prompt_token_ids.count(AUDIO_PAD) == 1 and len(got[0]) == MAX_NEW


def test_resampling_reads_only_the_window():
    """A clip at another rate is cut to what the window's samples read before resampling: the
    window's samples equal the whole clip's, and a header claiming 1 Hz (16000x upsampling)
    stays small. A prime rate's ratio is approximated (a small filter), within 1e-6."""
    from fractions import Fraction

    from scipy.signal import resample_poly

    from tessellm.multimodal.audio import MAX_RATIO_TERM, resample

    wave_ = clip(30, 1.0, 8000)
    whole = resample(wave_, 8000, SAMPLING_RATE)
    cut = resample(wave_, 8000, SAMPLING_RATE, max_samples=4000)
    assert len(whole) == 16000 and 4000 <= len(cut) < 4200
    np.testing.assert_array_equal(cut[:4000], whole[:4000])
    for rate in (44100, 48000, 22050):
        w = clip(31, 1.0, rate)
        np.testing.assert_array_equal(resample(w, rate, SAMPLING_RATE, max_samples=3200)[:3200],
                                      resample(w, rate, SAMPLING_RATE)[:3200])
    tiny = resample(np.ones(5000, np.float32), 1, SAMPLING_RATE, max_samples=32000)
    assert len(tiny) < 32000 + 16 * SAMPLING_RATE  # not 5000 * 16000 samples
    prime = resample(clip(32, 0.01, 999983), 999983, SAMPLING_RATE)
    ratio = Fraction(len(prime), 9999)  # 9999 input samples
    assert abs(float(ratio) * 999983 / SAMPLING_RATE - 1) < 1e-3 and MAX_RATIO_TERM < 999983
    want = resample_poly(clip(32, 0.01, 999983), 16000, 999983)
    np.testing.assert_allclose(prime[:len(want) - 1], want[:len(want) - 1], atol=5e-3)


def test_float16_encoder_layer_clamps_as_hf():
    """A float16 encoder layer whose output overflows: clamped to the finite range as HF's
    ``Qwen2AudioEncoderLayer`` (inf before)."""
    import torch
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoderLayer

    from tessellm.models.qwen2_audio import AudioEncoderLayer
    from tests.multimodal.tiny_qwen2_audio import config

    cfg = config().audio_config
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = Qwen2AudioEncoderLayer(cfg).eval()
    with torch.no_grad():
        hf.fc2.bias.fill_(60000.0)  # with a residual of ~10000: past float16's 65504
    ours = AudioEncoderLayer(cfg)
    ours.load_state_dict(hf.state_dict())
    hf, ours = hf.half(), ours.half()
    x = (torch.randn(1, 8, cfg.d_model) + 10000).half()
    with torch.no_grad():
        want = hf(x, None)
        want = want[0] if isinstance(want, tuple) else want
        got = ours(x, torch.ones(1, 1, 1, 8, dtype=torch.bool))
    assert torch.isfinite(want).all() and want.max() == torch.finfo(torch.float16).max - 1000
    torch.testing.assert_close(got, want, atol=32, rtol=1e-3)


def test_preemption_with_chunked_prefill_recomputes_the_clips(llm, qwen2_audio_dir):
    """A KV pool too small for four clip prompts at once, 16-token chunks: requests are
    preempted and recomputed (their clips encoded again), each output the one it has alone."""
    reqs = [_request(PROMPT, [clip(40 + i, 0.3 + 0.2 * i)]) for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=40, min_tokens=40, ignore_eos=True)
    alone = [llm.generate([r], params, use_tqdm=False)[0].outputs[0].token_ids for r in reqs]
    with LLM(qwen2_audio_dir, dtype="float32", num_kv_blocks=40, block_size=BS,
             max_num_batched_tokens=16) as tight:
        out = tight.generate(reqs, params, use_tqdm=False)
        assert tight.engine.core.scheduler.num_preemptions_total > 0
        assert not tight.engine.core.runner.encoder_cache.features  # nothing held after
    assert [o.outputs[0].token_ids for o in out] == alone
