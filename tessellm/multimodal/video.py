"""Video inputs: ``multi_modal_data["video"]`` (frames given by the caller) and ``video_url``
chat parts (decoded here when a decoder is installed) -> a list of videos, each ``[T, H, W, 3]``
uint8 RGB frames and its frame rate.

Forms a caller may give, as vLLM takes them::

    one video    np.ndarray [T, H, W, 3] | list of PIL images | (frames, {"fps": 2.0})
    several      a list of those (or an ndarray [N, T, H, W, 3])

Frames are used as given: no sampling (decode or sample a clip's frames before sending it, as
``do_sample_frames=False``, transformers' default for Qwen2-VL). ``fps`` says how far apart the
given frames are (default 2.0, Qwen's); Qwen2.5-VL's temporal positions depend on it.

A ``video_url`` (data:video/...;base64, file:// under ``--allowed-local-media-path``, http(s))
needs a decoder: PyAV (``pip install av``) or OpenCV (``pip install opencv-python-headless``);
without one it is refused with one sentence naming them. Every frame of the file is decoded
and at most ``MAX_DECODED_FRAMES`` kept, evenly spread over the clip beyond that; decoding holds
at most twice that many (``keep_spread``), however long the clip (a 20 MiB file may hold hours).
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np

DEFAULT_FPS = 2.0
MAX_DECODED_FRAMES = 32  # frames kept of a decoded video_url (evenly spaced)


@dataclass
class Video:
    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    fps: float = DEFAULT_FPS  # frames per second of ``frames`` (after any sampling)


def as_video_list(videos) -> list[Video]:
    """``multi_modal_data["video"]`` -> its videos (forms in the module docstring)."""
    if isinstance(videos, np.ndarray) and videos.ndim == 5:
        return [_video(v, f"[{i}]") for i, v in enumerate(videos)]
    if isinstance(videos, (list, tuple)) and videos and not _is_one_video(videos):
        return [_video(v, f"[{i}]") for i, v in enumerate(videos)]
    return [_video(videos, "")]


def _is_one_video(items) -> bool:
    """A list of PIL frames, or a (frames, metadata) pair, is one video."""
    if any(isinstance(x, Video) for x in items):
        return False
    if isinstance(items, tuple) and len(items) == 2 and isinstance(items[1], dict):
        return True
    try:
        from PIL import Image
    except ImportError:
        return False
    return all(isinstance(x, Image.Image) for x in items)


def _video(item, where: str) -> Video:
    if isinstance(item, Video):  # decoded from a video_url
        return item
    name = f"multi_modal_data['video']{where}"
    fps = DEFAULT_FPS
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict):
        item, meta = item
        fps = meta.get("fps", DEFAULT_FPS)
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not fps > 0:
            raise ValueError(f"{name}'s metadata fps must be a number > 0, got {fps!r}.")
    if isinstance(item, (list, tuple)):
        frames = [_frame(f, f"{name}[{k}]") for k, f in enumerate(item)]
        if not frames:
            raise ValueError(f"{name} has no frames; give at least one.")
        if len({f.shape for f in frames}) > 1:
            raise ValueError(f"The frames of {name} differ in size; give frames of one size.")
        arr = np.stack(frames)
    else:
        arr = np.asarray(item) if hasattr(item, "__array__") else None
        if arr is None or arr.ndim != 4 or arr.shape[-1] != 3 or 0 in arr.shape:
            shape = getattr(arr, "shape", None)
            raise ValueError(f"{name} must be frames [T, H, W, 3] (RGB, 0..255) as a numpy "
                             f"array or a list of PIL images, got "
                             f"{type(item).__name__}{'' if shape is None else ' ' + str(list(shape))}.")
        arr = _uint8(arr, name)
    return Video(np.ascontiguousarray(arr), float(fps))


def _frame(frame, name: str) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None and isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    arr = np.asarray(frame) if hasattr(frame, "__array__") else None
    if arr is None or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"{name} must be a PIL image or an [H, W, 3] RGB array.")
    return _uint8(arr, name)


def _uint8(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if (not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all() or arr.min() < 0
            or arr.max() > 255):
        raise ValueError(f"{name} must hold RGB values in 0..255 (uint8), got {arr.dtype} "
                         "values outside that range (or not finite).")
    return np.round(arr).astype(np.uint8)


# -- decoding (video_url) ----------------------------------------------------------------------


def decoder_name() -> Optional[str]:
    """The installed video decoder ("av" or "cv2"), None when neither is."""
    for module in ("av", "cv2"):
        try:
            __import__(module)
            return module
        except ImportError:
            continue
    return None


def no_decoder_error() -> ValueError:
    return ValueError("Video URLs need a video decoder and none is installed; pip install av "
                      "(PyAV) or opencv-python-headless on the server, or send the frames "
                      "(offline: multi_modal_data={'video': frames}).")


def decode_video(data: bytes, what: str) -> Video:
    """A video file's bytes -> its frames (at most ``MAX_DECODED_FRAMES``, evenly spaced) and
    their frame rate."""
    name = decoder_name()
    if name is None:
        raise no_decoder_error()
    try:
        decoded = _decode_av(data) if name == "av" else _decode_cv2(data)
        frames, stride = keep_spread(decoded, MAX_DECODED_FRAMES)
        fps = decoded.fps
    except Exception:  # noqa: BLE001 - whatever the decoder says (PyAV's are ValueErrors too),
        # the bytes are not a video it can read
        raise ValueError(f"{what} is not a video the decoder ({name}) can read (mp4, webm, "
                         "...).") from None
    if not frames:
        raise ValueError(f"{what} has no frames.")
    keep = _spread(len(frames), MAX_DECODED_FRAMES)
    step = stride * len(frames) / len(keep)  # decoded frames between two kept ones
    return Video(np.stack([frames[i] for i in keep]), float(fps) / step if fps else DEFAULT_FPS)


def _spread(n: int, most: int) -> list[int]:
    if n <= most:
        return list(range(n))
    return [int(i * n / most) for i in range(most)]


def keep_spread(frames, most: int) -> tuple[list, int]:
    """Frames of a stream of unknown length, evenly spaced, holding at most ``2 * most`` at a
    time: every ``stride``-th frame is kept; when ``2 * most`` are held, every other one is
    dropped and the stride doubles. Returns the kept frames (``most`` to ``2 * most - 1`` of
    them once the stream is longer than that; all of a shorter one) and their stride::

        most 2, 9 frames:  f0 f1 f2 f3 -> f0 f2 (stride 2) -> f0 f2 f4 f6 -> f0 f4 (stride 4) -> f0 f4 f8
    """
    kept, stride = [], 1
    for i, frame in enumerate(frames):
        if i % stride:
            continue
        kept.append(frame)
        if len(kept) == 2 * most:
            kept, stride = kept[::2], stride * 2
    return kept, stride


class _Frames:
    """A decoder's frames, one at a time, with the stream's frame rate (``fps``, None unknown)."""

    def __init__(self, fps: Optional[float], frames):
        self.fps, self._frames = fps, frames

    def __iter__(self):
        return self._frames


def _decode_av(data: bytes) -> _Frames:
    import av

    def frames():
        with container:
            for f in container.decode(stream):
                yield f.to_ndarray(format="rgb24")

    container = av.open(io.BytesIO(data))
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else None
    except Exception:
        container.close()
        raise
    return _Frames(fps, frames())


def _decode_cv2(data: bytes) -> _Frames:
    import cv2

    f = tempfile.NamedTemporaryFile(suffix=".video")  # OpenCV reads files, not bytes
    f.write(data)
    f.flush()
    cap = cv2.VideoCapture(f.name)

    def frames():
        with f:
            try:
                while True:
                    ok, frame = cap.read()
                    if not ok:
                        break
                    yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            finally:
                cap.release()

    return _Frames(cap.get(cv2.CAP_PROP_FPS) or None, frames())


def load_video_url(url: str, allowed_local_media_path: Optional[str] = None,
                   allowed_media_domains=None, fetched: Optional[dict] = None) -> Video:
    """A ``video_url`` part's URL -> its video (data:, file://, http(s), as images' URLs);
    refused first when no decoder is installed."""
    from tessellm.multimodal.media import data_url_bytes, local_file

    if not isinstance(url, str) or not url:
        raise ValueError("video_url.url is missing; give a data:video/...;base64 URL, an http(s) "
                         "URL, or file:// under --allowed-local-media-path.")
    if decoder_name() is None:
        raise no_decoder_error()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_video(data_url_bytes(url, "video"), "The data: URL")
    if scheme == "file":
        return decode_video(local_file(url, allowed_local_media_path, "video"), "The file:// video")
    if scheme in ("http", "https"):
        from tessellm.multimodal.fetch import FetchPolicy, fetch_url, shown_url

        got = (fetched or {}).get(url)
        if isinstance(got, ValueError):
            raise got
        data, _ = got or fetch_url(url, FetchPolicy.from_env(allowed_media_domains), "video")
        return decode_video(data, f"The video at {shown_url(url)}")
    raise ValueError(f"video_url scheme {scheme or url[:16]!r} is not supported; use an "
                     "http(s) URL, a data:video/...;base64 URL or file:// under "
                     "--allowed-local-media-path.")
