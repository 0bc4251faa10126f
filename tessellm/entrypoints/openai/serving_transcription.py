"""POST /v1/audio/transcriptions (OpenAI's and vLLM's form) for an audio-language model
(Qwen2-Audio): a ``multipart/form-data`` upload -> the transcript.

Form fields: ``file`` (the audio: WAV, or what ``soundfile`` reads when installed), ``model``,
``language`` (ISO 639-1, e.g. ``en``; none: the model detects it), ``prompt`` (text written
before the audio, as context), ``temperature`` (default 0: greedy), vLLM's sampling fields
(``seed``, ``top_p``, ``top_k``, ``min_p``, the three penalties), ``response_format``
(``json``: ``{"text": ..., "usage": {"type": "duration", "seconds": N}}`` as vLLM's,
default; ``text``: the bare transcript), and vLLM's
``max_completion_tokens``. The prompt is Qwen2-Audio's speech-recognition instruction::

    {prompt}<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>

A clip longer than the model's window (30 s) is cut, as vLLM cuts it, into pieces of at most a
window, each at the quietest 10 ms of the second before the limit; each piece is one request
with that prompt and their transcripts are joined with spaces (``max_completion_tokens``
applies to each piece; at most ``MAX_PIECES`` (64) windows, 32 minutes). Streaming,
``timestamp_granularities`` and the ``verbose_json`` / ``srt`` / ``vtt`` formats are refused,
naming the field. The body is parsed with the standard library's ``email`` parser
(no python-multipart).
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import math
import re
from typing import Optional

from fastapi import Request
from fastapi.responses import PlainTextResponse

from tessellm.core.sampling_params import SamplingParams
from tessellm.entrypoints.async_llm import AsyncLLM
from tessellm.entrypoints.openai.errors import bad_request, prompt_error
from tessellm.entrypoints.openai.sampling import check_model
from tessellm.entrypoints.openai.server_config import ServerConfig
from tessellm.entrypoints.openai.serving import collect, random_id, submit

# vLLM's TranscriptionRequest sampling fields: name -> type (SamplingParams checks the range)
SAMPLING = {"seed": int, "top_p": float, "top_k": int, "min_p": float, "frequency_penalty": float,
            "presence_penalty": float, "repetition_penalty": float}
FIELDS = ("file", "model", "language", "prompt", "temperature", "response_format",
          "max_completion_tokens", *SAMPLING, "stream", "timestamp_granularities[]",
          "timestamp_granularities")
INSTRUCTION = "Detect the language and recognize the speech:"
MAX_PIECES = 64  # windows one upload may fill (64 x 30 s: 32 minutes), one request each


def parse_form(body: bytes, content_type: str) -> dict[str, object]:
    """``multipart/form-data`` -> {field: str, or bytes for ``file``}."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise bad_request("/v1/audio/transcriptions takes multipart/form-data (a 'file' field with "
                          "the audio, and 'model'); send the upload as a form.", "file")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise bad_request("The multipart/form-data body could not be parsed; check its boundary.")
    fields: dict[str, object] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        if not isinstance(name, str):  # an RFC 2231 name*= parameter: (charset, language, value)
            name = email.utils.collapse_rfc2231_value(name)
        if name not in FIELDS:
            raise bad_request(f"Unknown form field {name!r}; /v1/audio/transcriptions takes "
                              f"{', '.join(FIELDS[:7 + len(SAMPLING)])}.", name,
                              "unsupported_parameter")
        if name in fields:
            raise bad_request(f"The form has more than one {name!r} field; send one (one audio "
                              "file per request).", name)
        data = part.get_payload(decode=True) or b""
        if name != "file":
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                raise bad_request(f"The form field {name!r} is not UTF-8 text; send it as UTF-8.",
                                  name) from None
        fields[name] = data
    return fields


def transcription_prompt(language: Optional[str], prompt: Optional[str]) -> str:
    tag = f" <|{language}|>" if language else ""
    return f"{prompt or ''}<|audio_bos|><|AUDIO|><|audio_eos|>{INSTRUCTION}{tag}"


async def create_transcription(engine: AsyncLLM, config: ServerConfig, request: Request):
    from tessellm.multimodal.audio import decode_audio, split_audio
    from tessellm.multimodal.processor import get_processor

    fields = parse_form(await request.body(), request.headers.get("content-type", ""))
    lora = check_model(fields.get("model") or None, config)
    if "audio" not in engine.info.mm_limits:
        raise bad_request(f"The served model ({config.model_name}) takes no audio, so it cannot "
                          "transcribe; serve an audio-language model (Qwen2-Audio).", "model")
    for name in ("stream",):
        if str(fields.get(name, "false")).lower() not in ("false", "0", ""):
            raise bad_request("stream is not supported for transcriptions yet; leave it out.", name,
                              "unsupported_parameter")
    for name in ("timestamp_granularities[]", "timestamp_granularities"):
        if fields.get(name):
            raise bad_request("timestamp_granularities is not supported (no timestamps); leave it out.",
                              name, "unsupported_parameter")
    audio = fields.get("file")
    if not audio:
        raise bad_request("The form has no 'file' (the audio to transcribe); add it.", "file")
    fmt = fields.get("response_format") or "json"
    if fmt not in ("json", "text"):
        raise bad_request(f"response_format {fmt!r} is not supported; use 'json' or 'text'.",
                          "response_format")
    language = fields.get("language") or None
    if language is not None and not re.fullmatch(r"[a-z]{2,3}", language):
        raise bad_request(f"language {language!r} is not an ISO 639-1 code such as 'en'.", "language")
    temperature = _number(fields, "temperature", 0.0, float)
    if not temperature <= 2.0:  # vLLM's bound (SamplingParams'), here a 400 naming the field
        raise bad_request(f"temperature must be in [0, 2], got {fields['temperature']!r}.",
                          "temperature")
    max_tokens = _number(fields, "max_completion_tokens", None, int)
    sampling = {}
    for name, kind in SAMPLING.items():
        value = fields.get(name)
        if value in (None, ""):
            continue
        try:
            sampling[name] = kind(value)
        except ValueError:
            raise bad_request(f"{name} {value!r} is not {'an integer' if kind is int else 'a number'}.",
                              name) from None
        try:  # the range, as the other routes check it
            SamplingParams(**{name: sampling[name]})
        except ValueError as exc:
            raise bad_request(str(exc), name) from None
    try:
        wave, rate = decode_audio(audio, "The uploaded file")
        processor = get_processor(engine.info)
        window = processor.feature_extractor.n_samples * rate // processor.sampling_rate
        if len(wave) > MAX_PIECES * window:  # (a header claiming 1 Hz: a window of 30 samples)
            raise ValueError(f"The uploaded file is {len(wave) / rate:g} s of audio at {rate} Hz, "
                             f"over {MAX_PIECES} windows of {window / rate:g} s; send at most "
                             f"{MAX_PIECES * window / rate:g} s per request.")
        prompt = transcription_prompt(language, fields.get("prompt"))
        processed = [await engine.process_prompt_async(
            {"prompt": prompt, "multi_modal_data": {"audio": [(piece, rate)]}})
            for piece in split_audio(wave, rate, window)]  # vLLM's: one request per window
    except ValueError as exc:
        raise prompt_error(exc, "file") from None
    params = []
    for p in processed:
        room = engine.info.max_model_len - len(p.prompt_token_ids)
        params.append(SamplingParams(temperature=temperature, max_tokens=min(max_tokens or room, room),
                                     **sampling))
    sub = submit(engine, random_id("trsc"), processed, params, lora)
    outs = await collect(engine, sub, request, config.sse_keepalive_s)
    text = " ".join(t for t in (o.outputs[0].text.strip() for o in outs) if t)
    if fmt == "text":
        return PlainTextResponse(text)
    # vLLM's (and OpenAI whisper-1's) usage: the clip's duration in whole seconds, rounded up
    return {"text": text, "usage": {"type": "duration", "seconds": math.ceil(len(wave) / rate)}}


def _number(fields: dict, name: str, default, kind):
    value = fields.get(name)
    if value in (None, ""):
        return default
    try:
        number = kind(value)
    except ValueError:
        raise bad_request(f"{name} {value!r} is not a number.", name) from None
    if not math.isfinite(number) or number < 0 or (kind is int and number == 0):
        raise bad_request(f"{name} must be {'positive' if kind is int else '>= 0'}, got {value!r}.", name)
    return number
