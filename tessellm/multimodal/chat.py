"""Chat messages with images, videos and audio: OpenAI content parts (``image_url``; offline
also ``image_pil``; ``video_url``, vLLM's, for the models that take videos; ``input_audio``
and vLLM's ``audio_url`` for Qwen2-Audio) -> the chat-template
prompt with one placeholder per image / video, and the images and videos in order, for
``multi_modal_data``.

Templates take images in one of two ways (as vLLM's "content formats"):
* parts: ``content`` is a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}``
  (llava-hf's templates);
* string: ``content`` is text, the placeholder written in it (``<image>\\n`` before the text).
The parts form is tried first; when the rendered prompt does not hold one placeholder per
image, the string form is used; when neither does, the request is refused.
"""

from __future__ import annotations

from typing import Callable, Optional

IMAGE_PARTS = ("image_url", "image_pil")
VIDEO_PARTS = ("video_url",)
AUDIO_PARTS = ("input_audio", "audio_url")  # OpenAI's and vLLM's (Qwen2-Audio)


def is_image_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PARTS


def is_video_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") in VIDEO_PARTS


def is_audio_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") in AUDIO_PARTS


def _count(conversation: list[dict], test) -> int:
    return sum(1 for m in conversation if isinstance(m.get("content"), list)
               for p in m["content"] if test(p))


def count_images(conversation: list[dict]) -> int:
    """Image, video and audio parts: whether the conversation needs the multimodal path."""
    return _count(conversation, lambda p: is_image_part(p) or is_video_part(p) or is_audio_part(p))


def collect_images(conversation: list[dict], load_url: Callable[[str], object],
                   load_video_url: Optional[Callable[[str], object]] = None):
    """(conversation with each image part as ``{"type": "image"}`` and each video part as
    ``{"type": "video"}``, the images in order, the videos in order)."""
    images, videos, out = [], [], []
    for i, message in enumerate(conversation):
        content = message.get("content")
        if not isinstance(content, list) or not any(is_image_part(p) or is_video_part(p)
                                                    for p in content):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            if is_image_part(part):
                images.append(_image_of(part, load_url, i, j))
                parts.append({"type": "image"})
            elif is_video_part(part):
                videos.append(_video_of(part, load_video_url, i, j))
                parts.append({"type": "video"})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out, images, videos


def _video_of(part: dict, load_video_url, i: int, j: int):
    try:
        spec = part.get("video_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        return load_video_url(url)
    except ValueError as exc:
        raise ValueError(f"messages[{i}].content[{j}]: {exc}") from None


def _image_of(part: dict, load_url, i: int, j: int):
    try:
        if part["type"] == "image_pil":
            return part["image_pil"]
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        return load_url(url)
    except ValueError as exc:
        raise ValueError(f"messages[{i}].content[{j}]: {exc}") from None


def _as_string_content(conversation: list[dict], image_token: str,
                       video_token: Optional[str] = None) -> list[dict]:
    out = []
    for m in conversation:
        content = m.get("content")
        if isinstance(content, list):
            def n(kind):
                return sum(1 for p in content if isinstance(p, dict) and p.get("type") == kind)

            text = "\n".join(p.get("text") or "" for p in content
                             if isinstance(p, dict) and p.get("type") == "text")
            m = {**m, "content": f"{image_token}\n" * n("image")
                 + f"{video_token}\n" * (n("video") if video_token else 0) + text}
        out.append(m)
    return out


def render_with_images(render: Callable[[list[dict]], list[int]], conversation: list[dict],
                       num_images: int, image_token: str, image_token_id: int,
                       num_videos: int = 0, video_token: Optional[str] = None,
                       video_token_id: Optional[int] = None) -> list[int]:
    """Token ids of the conversation (image parts already ``{"type": "image"}``, video parts
    ``{"type": "video"}``) with one placeholder per image and per video; ``render``: the
    conversation through the chat template."""
    errors: list[Exception] = []
    for form in (conversation, _as_string_content(conversation, image_token, video_token)):
        try:
            ids = render(form)
        except Exception as exc:  # noqa: BLE001 - the other form may render
            errors.append(exc)
            continue
        if ids.count(image_token_id) == num_images and (
                not num_videos or ids.count(video_token_id) == num_videos):
            return ids
    if len(errors) == 2:  # neither form rendered: the template's own error (or none at all)
        raise ValueError(f"The chat template could not render these messages: {errors[-1]}")
    videos = f" and {num_videos} video(s) ({video_token})" if num_videos else ""
    raise ValueError(f"The chat template does not place the {num_images} image(s) ({image_token})"
                     f"{videos} of these messages, one placeholder each in the prompt; pass a "
                     "chat template that renders image and video parts.")


def image_urls(conversation: list[dict], kinds: tuple = ("image_url",)) -> list[str]:
    """The ``image_url`` (``kinds``) URLs of the conversation, in order (malformed parts left
    out)."""
    urls = []
    for m in conversation:
        for p in m.get("content") if isinstance(m.get("content"), list) else ():
            kind = p.get("type") if isinstance(p, dict) else None
            spec = p.get(kind) if kind in kinds else None
            url = spec.get("url") if isinstance(spec, dict) else spec
            if isinstance(url, str):
                urls.append(url)
    return urls


def load_chat_images(conversation: list[dict], info, allowed_local_media_path: Optional[str],
                     allowed_media_domains=None, fetched: Optional[dict] = None):
    """Check and load the conversation's images and videos for the engine ``info`` describes:
    (the conversation with ``{"type": "image"}`` / ``{"type": "video"}`` parts, the images,
    the videos, the image processor). A text-only model, too many images or videos, a model
    without videos, no video decoder, or a bad URL: ValueError naming it."""
    from tessellm.multimodal.media import load_image_url
    from tessellm.multimodal.processor import get_processor
    from tessellm.multimodal.video import load_video_url

    processor = get_processor(info)
    processor.check_count(_count(conversation, is_image_part))
    processor.check_video_count(_count(conversation, is_video_part))
    conversation, images, videos = collect_images(
        conversation,
        lambda url: load_image_url(url, allowed_local_media_path, allowed_media_domains, fetched),
        lambda url: load_video_url(url, allowed_local_media_path, allowed_media_domains, fetched))
    return conversation, images, videos, processor


def chat_prompt_with_images(conversation: list[dict], info, tokenizer,
                            render: Callable[[list[dict]], list[int]],
                            allowed_local_media_path: Optional[str] = None,
                            allowed_media_domains=None, fetched: Optional[dict] = None) -> Optional[dict]:
    """The prompt (``{"prompt_token_ids", "multi_modal_data"}``) of a conversation with
    images; None when it has none (render it as text). ``fetched``: its http(s) images,
    fetched already (``fetch.prefetch``); any other is fetched here, blocking."""
    if not count_images(conversation):
        return None
    if "audio" in info.mm_limits or _count(conversation, is_audio_part):
        return _chat_prompt_with_audio(conversation, info, tokenizer, render,
                                       allowed_local_media_path, allowed_media_domains, fetched)
    conversation, images, videos, processor = load_chat_images(
        conversation, info, allowed_local_media_path, allowed_media_domains, fetched)
    token_id = processor.placeholder_token_id
    video_id = getattr(processor, "video_token_id", None) if videos else None
    ids = render_with_images(render, conversation, len(images),
                             tokenizer.convert_ids_to_tokens(token_id), token_id, len(videos),
                             None if video_id is None else tokenizer.convert_ids_to_tokens(video_id),
                             video_id)
    ids = processor.expand_chat_ids(ids, tokenizer)
    data = {"image": images}
    if videos:
        data["video"] = videos
    return {"prompt_token_ids": ids, "multi_modal_data": data}


def _chat_prompt_with_audio(conversation: list[dict], info, tokenizer, render,
                            allowed_local_media_path, allowed_media_domains, fetched) -> dict:
    """Qwen2-Audio: ``input_audio`` / ``audio_url`` parts -> ``{"type": "audio"}`` for the
    template (or, for a template that prints ``content`` as text, ``Audio k:
    <|audio_bos|><|AUDIO|><|audio_eos|>`` before the message's text: vLLM's string form)."""
    from tessellm.multimodal.audio import load_audio_url, load_input_audio
    from tessellm.multimodal.processor import get_processor

    if not info.mm_limits:
        raise ValueError(f"The model {info.model_path} is text-only: it does not take audio. "
                         "Remove the input_audio / audio_url parts, or serve an audio-language "
                         "model (Qwen2-Audio).")
    processor = get_processor(info)
    processor.check_count(_count(conversation, lambda p: is_image_part(p) or is_video_part(p)))
    processor.check_audio_count(_count(conversation, is_audio_part))
    clips, parts_form = [], []
    for i, message in enumerate(conversation):
        content = message.get("content")
        if not isinstance(content, list):
            parts_form.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            if not is_audio_part(part):
                parts.append(part)
                continue
            try:
                if part["type"] == "input_audio":
                    clips.append(load_input_audio(part.get("input_audio")))
                else:
                    spec = part.get("audio_url")
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    clips.append(load_audio_url(url, allowed_local_media_path,
                                                allowed_media_domains, fetched))
            except ValueError as exc:
                raise ValueError(f"messages[{i}].content[{j}]: {exc}") from None
            parts.append({"type": "audio"})
        parts_form.append({**message, "content": parts})
    token_id = processor.placeholder_token_id
    errors: list[Exception] = []
    for form in (parts_form, _audio_as_string_content(parts_form)):
        try:
            ids = render(form)
        except Exception as exc:  # noqa: BLE001 - the other form may render
            errors.append(exc)
            continue
        if ids.count(token_id) == len(clips):
            return {"prompt_token_ids": ids, "multi_modal_data": {"audio": clips}}
    if len(errors) == 2:
        raise ValueError(f"The chat template could not render these messages: {errors[-1]}")
    raise ValueError(f"The chat template does not place the {len(clips)} audio clip(s) "
                     "(<|AUDIO|>) of these messages, one placeholder each in the prompt; pass "
                     "a chat template that renders audio parts.")


def _audio_as_string_content(conversation: list[dict]) -> list[dict]:
    out, k = [], 0
    for m in conversation:
        content = m.get("content")
        if isinstance(content, list):
            head = ""
            for p in content:
                if isinstance(p, dict) and p.get("type") == "audio":
                    k += 1
                    head += f"Audio {k}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
            text = "\n".join(p.get("text") or "" for p in content
                             if isinstance(p, dict) and p.get("type") == "text")
            m = {**m, "content": head + text}
        out.append(m)
    return out


def media_items(data: dict) -> list:
    """A ``multi_modal_data`` dict's images, videos and audio clips as one list (``media_data``
    splits it again: a video is a ``video.Video``, a clip an ``audio.AudioClip``)."""
    return list(data.get("image") or ()) + list(data.get("video") or ()) + list(data.get("audio") or ())


def media_data(items: list) -> dict:
    from tessellm.multimodal.audio import AudioClip
    from tessellm.multimodal.video import Video

    clips = [x for x in items if isinstance(x, AudioClip)]
    if clips:
        return {"audio": clips}
    videos = [x for x in items if isinstance(x, Video)]
    data = {"image": [x for x in items if not isinstance(x, Video)]}
    if videos:
        data["video"] = videos
    return data


async def fetch_chat_images(conversation: list[dict], engine) -> dict:
    """The conversation's http(s) images, fetched concurrently off the event loop and off the
    tokenizer threads (``fetch.prefetch``); none when the request will be refused for its
    image count anyway (the count is checked again, with its message, when they load)."""
    from tessellm.multimodal.fetch import FetchPolicy, prefetch
    from tessellm.multimodal.video import decoder_name

    limits = engine.info.mm_limits
    if (_count(conversation, is_image_part) > limits.get("image", 0)
            or _count(conversation, is_video_part) > limits.get("video", 0)
            or _count(conversation, is_audio_part) > limits.get("audio", 0)):
        return {}
    kinds = ("image_url", "video_url") if decoder_name() else ("image_url",)
    kinds += ("audio_url",)
    urls = [(url, kind.removesuffix("_url")) for kind in kinds for url in image_urls(conversation, (kind,))]
    return await prefetch(urls, FetchPolicy.from_env(engine.args.allowed_media_domains))
