"""Qwen2-Audio chat: OpenAI ``input_audio`` parts (base64 WAV) and vLLM's ``audio_url`` parts
(data: URLs) in ``LLM.chat`` and ``/v1/chat/completions`` give HF transformers' greedy tokens
on the chat template's prompt with the decoded clips; bad audio is one clear error (a 400 at
the server) and the engine goes on serving. WAV decoding (stdlib ``wave``) checked against the
samples written."""

from __future__ import annotations

import asyncio
import base64
import io
import wave

import numpy as np
import pytest

from tessellm import LLM, SamplingParams
from tessellm.config import EngineArgs
from tessellm.multimodal.audio import decode_audio, encode_wav, split_audio
from tests.multimodal.serve_app import MAX_NEW, chat_body, serve
from tests.multimodal.tiny_qwen2_audio import AUDIO_PAD, SAMPLING_RATE, clip, hf_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
TEXT = {"type": "text", "text": "What is this sound?"}


def input_audio(wave_: np.ndarray, rate: int = SAMPLING_RATE) -> dict:
    return {"type": "input_audio",
            "input_audio": {"data": base64.b64encode(encode_wav(wave_, rate)).decode(), "format": "wav"}}


def audio_url(wave_: np.ndarray, rate: int = SAMPLING_RATE) -> dict:
    b64 = base64.b64encode(encode_wav(wave_, rate)).decode()
    return {"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{b64}"}}


def decoded(wave_: np.ndarray) -> np.ndarray:
    """The clip as the server sees it (16-bit PCM)."""
    return decode_audio(encode_wav(wave_, SAMPLING_RATE))[0]


def template_prompt(path: str, n: int) -> str:
    from transformers import AutoTokenizer

    content = [{"type": "audio"}] * n + [TEXT]
    return AutoTokenizer.from_pretrained(path).apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def llm(qwen2_audio_dir):
    with LLM(qwen2_audio_dir, dtype="float32", num_kv_blocks=128, block_size=4,
             limit_mm_per_prompt={"audio": 2}) as llm:
        yield llm


def test_llm_chat_input_audio_and_audio_url_match_hf(llm, qwen2_audio_dir):
    a, b = clip(20), clip(21, 0.3)
    out = llm.chat([{"role": "user", "content": [input_audio(a), audio_url(b), TEXT]}], GREEDY,
                   use_tqdm=False)[0]
    assert out.prompt_token_ids.count(AUDIO_PAD) == 15 + 7
    want = hf_greedy(qwen2_audio_dir, [template_prompt(qwen2_audio_dir, 2)], [[decoded(a), decoded(b)]],
                     MAX_NEW)[0]
    assert list(out.outputs[0].token_ids) == want


@pytest.mark.parametrize("part, match", [
    ({"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}, "not valid base64"),
    ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"ID3 mp3").decode(),
                                             "format": "wav"}}, "not a WAV file"),
    ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"ID3 mp3").decode(),
                                             "format": "mp3"}}, "soundfile|could not be decoded"),
    ({"type": "audio_url", "audio_url": {"url": "data:image/png;base64,AAAA"}}, "media type 'image/png'"),
    ({"type": "audio_url", "audio_url": {"url": "file:///etc/passwd"}}, "--allowed-local-media-path"),
])
def test_bad_audio_parts_are_refused_by_name(llm, part, match):
    with pytest.raises(ValueError, match=match):
        llm.chat([{"role": "user", "content": [part, TEXT]}], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="3 audio clips, over the limit of 2"):
        llm.chat([{"role": "user", "content": [input_audio(clip(1))] * 3 + [TEXT]}], GREEDY, use_tqdm=False)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_wav_decoding_of_pcm_widths_and_channels(width):
    """8/16/24/32-bit PCM, two channels: decoded to the mean of the channels, in [-1, 1)."""
    rng = np.random.default_rng(width)
    bits = 8 * width
    ints = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=(50, 2), dtype=np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints.ravel())
    else:
        raw = ints.astype(f"<i{width}").tobytes()
    out = io.BytesIO()
    with wave.open(out, "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(width)
        f.setframerate(8000)
        f.writeframes(raw)
    samples, rate = decode_audio(out.getvalue())
    assert rate == 8000 and samples.dtype == np.float32
    np.testing.assert_allclose(samples, (ints / float(1 << (bits - 1))).mean(axis=1), atol=1e-6)


def _riff(fmt: bytes, data: bytes) -> bytes:
    chunks = b"fmt " + len(fmt).to_bytes(4, "little") + fmt + b"data" + len(data).to_bytes(4, "little") + data
    return b"RIFF" + (4 + len(chunks)).to_bytes(4, "little") + b"WAVE" + chunks


def test_wav_extensible_and_float_files_decode():
    """WAVE_FORMAT_EXTENSIBLE (sox / ffmpeg's 24-bit and multichannel files) and float WAV
    (scipy.io.wavfile's float32): decoded (Python 3.11's ``wave`` refused both: 'unknown
    format'); a data chunk claiming more than the file holds gives the frames present."""
    import struct

    from scipy.io import wavfile

    rng = np.random.default_rng(5)
    ints = rng.integers(-(1 << 23), 1 << 23, size=(40, 3), dtype=np.int64)
    raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints.ravel())
    guid_pcm = struct.pack("<H", 1) + bytes.fromhex("000000001000800000aa00389b71")
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 3, 22050, 22050 * 9, 9, 24, 22, 24, 0) + guid_pcm
    samples, rate = decode_audio(_riff(fmt, raw))
    assert rate == 22050
    np.testing.assert_allclose(samples, (ints / float(1 << 23)).mean(axis=1), atol=1e-6)
    wave_ = clip(6, 0.1)
    out = io.BytesIO()
    wavfile.write(out, SAMPLING_RATE, np.stack([wave_, -wave_ / 2], axis=1))
    samples, rate = decode_audio(out.getvalue())
    assert rate == SAMPLING_RATE
    np.testing.assert_allclose(samples, wave_ / 4, atol=1e-7)
    cut = bytearray(encode_wav(wave_, SAMPLING_RATE))[:-101]  # truncated mid-sample
    samples, _ = decode_audio(bytes(cut))
    assert len(samples) == len(wave_) - 51
    with pytest.raises(ValueError, match="0 channels"):
        decode_audio(_riff(struct.pack("<HHIIHH", 1, 0, 16000, 32000, 2, 16), b"\0" * 8))
    with pytest.raises(ValueError, match="format tag 6"):  # a-law: soundfile's
        decode_audio(_riff(struct.pack("<HHIIHH", 6, 1, 8000, 8000, 1, 8), b"\0" * 8))


def test_wav_header_with_rate_zero_is_refused_by_decoding():
    """A WAV header claiming 0 Hz: refused when decoded, naming the header (was accepted, and
    refused later as "multi_modal_data['audio'][0] has sampling rate 0" for a chat part)."""
    wav = bytearray(encode_wav(clip(1), SAMPLING_RATE))
    wav[24:28] = (0).to_bytes(4, "little")  # the fmt chunk's sample rate
    with pytest.raises(ValueError, match="header gives a sampling rate of 0 Hz"):
        decode_audio(bytes(wav))


async def _requests(c):
    a = clip(22)
    ok = await c.post("/v1/chat/completions", json=chat_body(input_audio(a), TEXT, return_token_ids=True))
    url = await c.post("/v1/chat/completions", json=chat_body(audio_url(a), TEXT, return_token_ids=True))
    bad = await c.post("/v1/chat/completions", json=chat_body(
        {"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}, TEXT))
    many = await c.post("/v1/chat/completions", json=chat_body(input_audio(a), input_audio(a), TEXT))
    placeholder = await c.post("/v1/chat/completions", json=chat_body(
        {"type": "text", "text": "<|AUDIO|> what?"}))
    tokens = await c.post("/tokenize", json={"model": "m", "messages": [
        {"role": "user", "content": [input_audio(a), TEXT]}]})
    assert tokens.status_code == 200, tokens.text
    assert tokens.json()["tokens"] == ok.json()["prompt_token_ids"]  # expanded, as the model sees it
    return ok, url, (bad, many, placeholder)


def test_chat_server_input_audio_matches_hf_and_bad_audio_is_a_400(qwen2_audio_dir):
    args = EngineArgs(model=qwen2_audio_dir, dtype="float32", num_kv_blocks=64, block_size=4)
    ok, url, bad = asyncio.run(serve(args, _requests))
    assert ok.status_code == 200, ok.text
    assert ok.json()["prompt_token_ids"].count(AUDIO_PAD) == 15
    want = hf_greedy(qwen2_audio_dir, [template_prompt(qwen2_audio_dir, 1)], [[decoded(clip(22))]],
                     MAX_NEW)[0]
    assert ok.json()["choices"][0]["token_ids"] == want
    assert url.status_code == 200 and url.json()["choices"][0]["token_ids"] == want
    matches = ["not valid base64", "2 audio clips, over the limit of 1", "audio placeholder tokens"]
    for r, match in zip(bad, matches):
        assert r.status_code == 400, r.text
        assert match in r.json()["error"]["message"]


async def _transcriptions(c):
    wav = encode_wav(clip(23), SAMPLING_RATE)

    def post(files=(("file", ("a.wav", wav, "audio/wav")),), **data):
        return c.post("/v1/audio/transcriptions", files=dict(files), data={"model": "m", **data})

    async def raw(parts):  # a form built by hand: repeated fields, raw bytes
        body = b"".join(b'--B\r\nContent-Disposition: form-data; name="%s"%s\r\n\r\n%s\r\n'
                        % (name, b'; filename="a.wav"' if name == b"file" else b"", value)
                        for name, value in parts) + b"--B--\r\n"
        return await c.post("/v1/audio/transcriptions", content=body,
                            headers={"content-type": "multipart/form-data; boundary=B"})

    ok = await post(language="en", max_completion_tokens="5")
    text = await post(language="en", max_completion_tokens="5", response_format="text")
    top_k = await post(language="en", max_completion_tokens="5", temperature="1", top_k="1", seed="7")
    long = await post(files=(("file", ("b.wav", encode_wav(clip(26, 5.0), SAMPLING_RATE), "audio/wav")),),
                      language="en", max_completion_tokens="4")
    short = encode_wav(clip(23)[:320], SAMPLING_RATE)
    bad = [await post(files=(("file", ("a.mp3", b"ID3 not audio", "audio/mpeg")),)),
           await post(response_format="srt"),
           await post(files=()),
           await post(language="english"),
           await c.post("/v1/audio/transcriptions", json={"model": "m"}),
           # these were 500s (SamplingParams' ValueError; an IndexError for the short clip)
           await post(temperature="nan"),
           await post(temperature="3"),
           await post(files=(("file", ("a.wav", short, "audio/wav")),)),
           # these were accepted: the last file won, bytes became U+FFFD
           await raw([(b"file", wav), (b"file", b"RIFF junk"), (b"model", b"m")]),
           await raw([(b"file", wav), (b"model", b"m"), (b"prompt", b"\xff\xfe hi")]),
           await post(top_p="2"),
           # 20000 samples claiming 1 Hz: 20000 s, over 64 windows (was 10000 requests of 2 samples)
           await post(files=(("file", ("c.wav", encode_wav(clip(27, 1.25), 1), "audio/wav")),)),
           await post(seed="x")]
    return ok, (text, top_k, long), bad


def test_transcriptions_endpoint_runs_the_asr_prompt(qwen2_audio_dir):
    """The form's clip under Qwen2-Audio's recognition prompt: HF's greedy tokens on that
    prompt, as json and as text; bad uploads and fields are 400s naming the field."""
    from transformers import AutoTokenizer

    from tessellm.entrypoints.openai.serving_transcription import transcription_prompt

    args = EngineArgs(model=qwen2_audio_dir, dtype="float32", num_kv_blocks=64, block_size=4)
    ok, (text, top_k, long), bad = asyncio.run(serve(args, _transcriptions))
    assert ok.status_code == 200, ok.text
    want = hf_greedy(qwen2_audio_dir, [transcription_prompt("en", None)], [[decoded(clip(23))]], 5)[0]
    tok = AutoTokenizer.from_pretrained(qwen2_audio_dir)
    assert ok.json()["text"] == tok.decode(want, skip_special_tokens=True).strip()
    assert ok.json()["usage"] == {"type": "duration", "seconds": 1}  # vLLM's: 0.6 s, rounded up
    assert text.status_code == 200 and text.text == ok.json()["text"]
    assert top_k.status_code == 200 and top_k.json()["text"] == ok.json()["text"]  # vLLM's field
    # 5 s in a 2 s window: three pieces cut in pauses, each transcribed (only the first 2 s before)
    pieces = split_audio(decoded(clip(26, 5.0)), SAMPLING_RATE, 2 * SAMPLING_RATE)
    assert len(pieces) == 3 and sum(map(len, pieces)) == 5 * SAMPLING_RATE
    want = [tok.decode(t, skip_special_tokens=True).strip() for t in hf_greedy(
        qwen2_audio_dir, [transcription_prompt("en", None)] * 3, [[p] for p in pieces], 4)]
    assert long.status_code == 200, long.text
    assert long.json() == {"text": " ".join(w for w in want if w), "usage": {"type": "duration", "seconds": 5}}
    params = ["file", "response_format", "file", "language", "file", "temperature", "temperature",
              "file", "file", "prompt", "top_p", "file", "seed"]
    assert len(bad) == len(params)
    for r, param in zip(bad, params):
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.json()
    assert "too short" in bad[7].json()["error"]["message"]
    assert "more than one 'file'" in bad[8].json()["error"]["message"]
    assert "not UTF-8" in bad[9].json()["error"]["message"]
    assert "over 64 windows of 2 s" in bad[11].json()["error"]["message"]


def test_generate_cli_with_an_audio_file(llm, qwen2_audio_dir, tmp_path):
    """``tessellm generate --audio FILE``: the chat prompt with the clip, as ``LLM.chat`` gives it."""
    import os
    import subprocess
    import sys

    path = tmp_path / "a.wav"
    path.write_bytes(encode_wav(clip(24), SAMPLING_RATE))
    out = subprocess.run([sys.executable, "-m", "tessellm.entrypoints.cli", "generate", "What is this sound?",
                          "--audio", str(path), "--model", qwen2_audio_dir, "--device", "cpu", "--dtype",
                          "float32", "--num-kv-blocks", "32", "--block-size", "4", "--max-tokens", "6"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    want = llm.chat([{"role": "user", "content": [input_audio(clip(24)), TEXT]}], greedy,
                    use_tqdm=False)[0].outputs[0].text
    assert out.stdout == want + "\n"


def test_http_audio_url_is_fetched_under_the_image_rules(monkeypatch):
    """An http(s) audio_url: fetched with the image fetcher's rules (size cap, status), its
    problems named as the audio's (the messages said "The image URL" before), asked for with
    ``Accept: audio/*``."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tessellm.multimodal.audio import load_audio_url

    wav = encode_wav(clip(25), SAMPLING_RATE)
    accepts = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            accepts.append(self.headers.get("Accept"))
            body, code = {"/a.wav": (wav, 200), "/big.wav": (wav * 4, 200)}.get(self.path, (b"no", 404))
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        monkeypatch.setenv("TESSELLM_IMAGE_FETCH_MAX_MB", str(2 * len(wav) / (1 << 20)))
        got = load_audio_url(f"{base}/a.wav")
        np.testing.assert_array_equal(got.waveform, decoded(clip(25)))
        with pytest.raises(ValueError, match=f"The audio URL {base}/gone.wav answered HTTP 404"):
            load_audio_url(f"{base}/gone.wav")
        with pytest.raises(ValueError, match=f"The audio at {base}/big.wav is larger than"):
            load_audio_url(f"{base}/big.wav")
        assert accepts == ["audio/*"] * 3  # asked for audio, not images
    finally:
        httpd.shutdown()
        httpd.server_close()
