"""Audio clips as the front end takes them: ``multi_modal_data["audio"]`` items checked and
resampled, and audio files (chat ``input_audio`` / ``audio_url`` parts) decoded.

* An item is ``(waveform, sampling_rate)`` (vLLM's form) or a bare waveform, taken to be at
  the model's rate: a 1-D float array (numpy, or anything ``np.asarray`` takes).
* Resampling: ``scipy.signal.resample_poly`` (polyphase, the rates' ratio reduced by their
  gcd) to the feature extractor's rate (16 kHz for Qwen2-Audio); vLLM uses librosa's
  resampler, so a clip at another rate may differ from vLLM's features in the last digits.
  Only the part of a clip the model's window can hold (``max_samples`` at the target rate,
  plus the filter's reach) is resampled: the rest is cut by the feature extractor anyway,
  and a tiny claimed rate (a WAV header saying 1 Hz) would otherwise turn a small upload
  into gigabytes of samples. A ratio whose reduced terms exceed ``MAX_RATIO_TERM`` (a prime
  rate such as 999983 Hz) is approximated by the nearest fraction whose down term is under
  it (a rate error below 1e-6), so the filter stays small.
* Decoding: WAV (PCM 8/16/24/32-bit, float 32/64-bit, plain or WAVE_FORMAT_EXTENSIBLE, any
  channel count, mixed down to mono by the mean), its RIFF chunks read here; other formats
  (mp3, flac, ogg, a-law WAV) only when the optional ``soundfile`` package is installed, else
  refused in one sentence.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import wave
from typing import NamedTuple, Optional

import numpy as np

MAX_RATIO_TERM = 1 << 14  # the largest down term of a polyphase resampling (44.1 kHz: 160/441)


class AudioClip(NamedTuple):
    """A decoded clip (chat parts): ``multi_modal_data["audio"]`` takes it as (waveform, rate)."""

    waveform: np.ndarray
    sampling_rate: int


def as_audio_list(items, target_rate: int, max_samples: Optional[int] = None) -> list[np.ndarray]:
    """``multi_modal_data["audio"]``: one clip or a list of them -> float32 mono waveforms at
    ``target_rate``; a clip resampled is first cut to what ``max_samples`` (at the target
    rate; None: no cut) needs."""
    return [_clip(item, i, target_rate, max_samples) for i, item in enumerate(audio_items(items))]


def audio_items(items) -> list:
    """``multi_modal_data["audio"]`` as a list of its clips (one clip or a list), unchecked:
    counted against the limit before any is resampled."""
    if isinstance(items, tuple) and len(items) == 2 and np.isscalar(items[1]):
        return [items]  # one (waveform, rate) pair
    return list(items) if isinstance(items, (list, tuple)) else [items]


def _clip(item, i: int, target_rate: int, max_samples: Optional[int] = None) -> np.ndarray:
    where = f"multi_modal_data['audio'][{i}]"
    rate = target_rate
    if isinstance(item, tuple):
        if len(item) != 2:
            raise ValueError(f"{where} is a tuple of {len(item)}; give (waveform, sampling_rate).")
        item, rate = item
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) \
                or not rate > 0 or int(rate) != rate:
            raise ValueError(f"{where} has sampling rate {rate!r}; give a positive integer (Hz).")
    try:
        wave_ = np.asarray(item, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{where} is a {type(item).__name__}; give a 1-D float waveform (numpy "
                         "array) or (waveform, sampling_rate).") from None
    if wave_.ndim != 1 or wave_.size == 0:
        raise ValueError(f"{where} has shape {tuple(wave_.shape)}; give a non-empty 1-D (mono) "
                         "waveform (mix channels down first).")
    if not np.isfinite(wave_).all():
        raise ValueError(f"{where} holds NaN or infinite samples; give finite values.")
    return resample(wave_, int(rate), target_rate, max_samples)


def resample(wave_: np.ndarray, rate: int, target_rate: int,
             max_samples: Optional[int] = None) -> np.ndarray:
    """``wave_`` at ``rate`` -> at ``target_rate``; with ``max_samples``, only the input that
    the first ``max_samples`` outputs read (their filter's reach included) is resampled, so
    those outputs equal the whole clip's."""
    if rate == target_rate:
        return wave_
    from fractions import Fraction

    from scipy.signal import resample_poly

    ratio = Fraction(target_rate, rate)
    if ratio.denominator > MAX_RATIO_TERM:  # (the numerator is at most target_rate)
        ratio = ratio.limit_denominator(MAX_RATIO_TERM)
    up, down = ratio.numerator, ratio.denominator
    if max_samples is not None:
        reach = 10 * max(up, down) // up + 2  # resample_poly's filter: 10 * max(up, down) taps a side
        wave_ = wave_[:math.ceil(max_samples * down / up) + reach]
    return resample_poly(wave_, up, down).astype(np.float32)


def split_audio(wave_: np.ndarray, rate: int, max_samples: int) -> list[np.ndarray]:
    """A clip longer than ``max_samples`` cut into pieces of at most that many, each cut at
    the quietest 10 ms of the second before the limit (vLLM's transcription splitting: cut
    in a pause rather than mid-word); a last piece under 50 ms is joined to the one before
    (the feature extractor trims those few milliseconds)."""
    pieces, start = [], 0
    hop = max(1, rate // 100)
    search = max(hop, min(rate, max_samples // 4))
    while len(wave_) - start > max_samples:
        end = start + max_samples
        seg = wave_[end - search:end]
        energy = np.add.reduceat(seg.astype(np.float64) ** 2, np.arange(0, len(seg) - hop + 1, hop))
        cut = end - search + hop * int(np.argmin(energy))
        pieces.append(wave_[start:cut])
        start = cut
    rest = wave_[start:]
    if pieces and len(rest) < rate // 20:
        pieces[-1] = np.concatenate([pieces[-1], rest])
    else:
        pieces.append(rest)
    return pieces


def decode_audio(data: bytes, what: str = "The audio") -> tuple[np.ndarray, int]:
    """An audio file's bytes -> (float32 mono waveform, sampling rate)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        try:
            return _decode_wav(data)
        except ValueError as exc:
            if _soundfile() is None:
                raise ValueError(f"{what} is a WAV file tessellm cannot read ({exc}); send 8/16/24/"
                                 "32-bit PCM or float WAV, or install soundfile for other "
                                 "encodings.") from None
    sf = _soundfile()
    if sf is None:
        raise ValueError(f"{what} is not a WAV file; send WAV (PCM), or install the soundfile "
                         "package for other formats (flac, ogg, mp3).")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the caller's bad audio
        raise ValueError(f"{what} could not be decoded: {exc}") from None
    return _mono(samples), int(rate)


PCM, IEEE_FLOAT, EXTENSIBLE = 1, 3, 0xFFFE  # WAV format tags (EXTENSIBLE: the tag is its GUID's)


def _decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """A RIFF/WAVE file's chunks read here (not ``wave``: Python 3.11's takes neither
    WAVE_FORMAT_EXTENSIBLE, which sox / ffmpeg write for 24-bit and multichannel files, nor
    float samples): PCM 8 (unsigned) / 16 / 24 / 32-bit and float 32 / 64-bit, plain or
    EXTENSIBLE. A data chunk that claims more bytes than the file holds (a truncated file, a
    stream's 0xFFFFFFFF) gives the whole frames present; nothing is allocated beyond them."""
    fmt, raw, pos = None, None, 12
    while pos + 8 <= len(data) and raw is None:
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise ValueError("its fmt chunk is cut short")
            fmt = body
        elif cid == b"data":
            raw = body
        pos += 8 + size + (size & 1)
    if fmt is None:
        raise ValueError("it has no fmt chunk before its data" if raw is not None else "it has no fmt chunk")
    tag, channels, rate = (int.from_bytes(fmt[0:2], "little"), int.from_bytes(fmt[2:4], "little"),
                           int.from_bytes(fmt[4:8], "little"))
    bits = int.from_bytes(fmt[14:16], "little")
    if tag == EXTENSIBLE and len(fmt) >= 26:
        tag = int.from_bytes(fmt[24:26], "little")  # the sub-format GUID's first two bytes
    if channels < 1:
        raise ValueError("its header gives 0 channels")
    if rate <= 0:
        raise ValueError(f"its header gives a sampling rate of {rate} Hz")
    width = (bits + 7) // 8
    if tag not in (PCM, IEEE_FLOAT) or (tag == PCM and width not in (1, 2, 3, 4)) \
            or (tag == IEEE_FLOAT and width not in (4, 8)):
        raise ValueError(f"format tag {tag} with {bits}-bit samples (tessellm reads PCM 8-32 bit "
                         "and float 32/64 bit)")
    frames = len(raw or b"") // (width * channels)
    if frames == 0:
        raise ValueError("it has no samples")
    raw = raw[:frames * width * channels]
    if tag == IEEE_FLOAT:
        samples = np.frombuffer(raw, "<f4" if width == 4 else "<f8").astype(np.float32)
        if not np.isfinite(samples).all():
            raise ValueError("it holds NaN or infinite samples")
    elif width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        samples = (np.where(ints >= 1 << 23, ints - (1 << 24), ints)).astype(np.float32) / float(1 << 23)
    else:
        samples = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    return _mono(samples.reshape(-1, channels)), rate


def _mono(samples: np.ndarray) -> np.ndarray:
    return samples.mean(axis=1).astype(np.float32) if samples.shape[1] > 1 else samples[:, 0].copy()


def encode_wav(wave_: np.ndarray, rate: int) -> bytes:
    """A float waveform as 16-bit PCM mono WAV bytes (tests, examples)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(wave_, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def _soundfile() -> Optional[object]:
    try:
        import soundfile
    except ImportError:
        return None
    return soundfile


def load_input_audio(spec) -> AudioClip:
    """An OpenAI ``input_audio`` part's object: ``{"data": base64 bytes, "format": "wav"}``."""
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), str) or not spec["data"]:
        raise ValueError("input_audio needs {\"data\": <base64 audio>, \"format\": \"wav\"}.")
    fmt = spec.get("format") or "wav"
    if not isinstance(fmt, str):
        raise ValueError("input_audio.format must be a string such as \"wav\".")
    try:
        data = base64.b64decode(spec["data"].strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("input_audio.data is not valid base64.") from None
    if fmt.lower() == "wav" and not (data[:4] == b"RIFF" and data[8:12] == b"WAVE"):
        raise ValueError("input_audio.data is not a WAV file (no RIFF/WAVE header) though format "
                         "is \"wav\"; send the WAV file's bytes, base64-encoded.")
    return AudioClip(*decode_audio(data, f"The input_audio ({fmt})"))


def load_audio_url(url, allowed_local_media_path: Optional[str] = None,
                   allowed_media_domains=None, fetched: Optional[dict] = None) -> AudioClip:
    """An ``audio_url`` part's URL (vLLM's): data:audio/...;base64, file:// under
    ``allowed_local_media_path``, or http(s) (fetched as images are)."""
    from tessellm.multimodal.media import data_url_bytes, local_file

    if not isinstance(url, str) or not url:
        raise ValueError("audio_url.url is missing; give a data:audio/wav;base64 URL, an http(s) "
                         "URL, or file:// under --allowed-local-media-path.")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return AudioClip(*decode_audio(data_url_bytes(url, "audio"), "The data: URL"))
    if scheme == "file":
        return AudioClip(*decode_audio(local_file(url, allowed_local_media_path, "audio"),
                                       "The file:// audio"))
    if scheme in ("http", "https"):
        from tessellm.multimodal.fetch import FetchPolicy, fetch_url, shown_url

        got = (fetched or {}).get(url)
        if isinstance(got, ValueError):
            raise got
        data, _ = got or fetch_url(url, FetchPolicy.from_env(allowed_media_domains), "audio")
        return AudioClip(*decode_audio(data, f"The audio at {shown_url(url)}"))
    raise ValueError(f"audio_url scheme {scheme or url[:16]!r} is not supported; use an http(s) "
                     "URL, a data:audio/...;base64 URL or file:// under --allowed-local-media-path.")
