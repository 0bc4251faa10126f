"""Chat messages with images: OpenAI content parts (``image_url``; offline also
``image_pil``) -> the chat-template prompt with one image placeholder per image, and the
images in order, for ``multi_modal_data``.

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


def is_image_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PARTS


def count_images(conversation: list[dict]) -> int:
    return sum(1 for m in conversation if isinstance(m.get("content"), list)
               for p in m["content"] if is_image_part(p))


def collect_images(conversation: list[dict], load_url: Callable[[str], object]):
    """(conversation with each image part as ``{"type": "image"}``, the images in order)."""
    images, out = [], []
    for i, message in enumerate(conversation):
        content = message.get("content")
        if not isinstance(content, list) or not any(is_image_part(p) for p in content):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            if not is_image_part(part):
                parts.append(part)
                continue
            images.append(_image_of(part, load_url, i, j))
            parts.append({"type": "image"})
        out.append({**message, "content": parts})
    return out, images


def _image_of(part: dict, load_url, i: int, j: int):
    try:
        if part["type"] == "image_pil":
            return part["image_pil"]
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        return load_url(url)
    except ValueError as exc:
        raise ValueError(f"messages[{i}].content[{j}]: {exc}") from None


def _as_string_content(conversation: list[dict], image_token: str) -> list[dict]:
    out = []
    for m in conversation:
        content = m.get("content")
        if isinstance(content, list):
            n = sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image")
            text = "\n".join(p.get("text") or "" for p in content
                             if isinstance(p, dict) and p.get("type") == "text")
            m = {**m, "content": f"{image_token}\n" * n + text}
        out.append(m)
    return out


def render_with_images(render: Callable[[list[dict]], list[int]], conversation: list[dict],
                       num_images: int, image_token: str, image_token_id: int) -> list[int]:
    """Token ids of the conversation (image parts already ``{"type": "image"}``) with one
    placeholder per image; ``render``: the conversation through the chat template."""
    errors: list[Exception] = []
    for form in (conversation, _as_string_content(conversation, image_token)):
        try:
            ids = render(form)
        except Exception as exc:  # noqa: BLE001 - the other form may render
            errors.append(exc)
            continue
        if ids.count(image_token_id) == num_images:
            return ids
    if len(errors) == 2:  # neither form rendered: the template's own error (or none at all)
        raise ValueError(f"The chat template could not render these messages: {errors[-1]}")
    raise ValueError(f"The chat template does not place the {num_images} image(s) of these "
                     f"messages (one {image_token} each in the prompt); pass a chat template "
                     "that renders image parts.")


def image_urls(conversation: list[dict]) -> list[str]:
    """The ``image_url`` URLs of the conversation, in order (malformed parts left out)."""
    urls = []
    for m in conversation:
        for p in m.get("content") if isinstance(m.get("content"), list) else ():
            spec = p.get("image_url") if isinstance(p, dict) and p.get("type") == "image_url" else None
            url = spec.get("url") if isinstance(spec, dict) else spec
            if isinstance(url, str):
                urls.append(url)
    return urls


def load_chat_images(conversation: list[dict], info, allowed_local_media_path: Optional[str],
                     allowed_media_domains=None, fetched: Optional[dict] = None):
    """Check and load the conversation's images for the engine ``info`` describes: (the
    conversation with ``{"type": "image"}`` parts, the images, the image processor). A
    text-only model, too many images, or a bad URL: ValueError naming it."""
    from tessellm.multimodal.media import load_image_url
    from tessellm.multimodal.processor import get_processor

    processor = get_processor(info)
    processor.check_count(count_images(conversation))
    conversation, images = collect_images(
        conversation, lambda url: load_image_url(url, allowed_local_media_path, allowed_media_domains,
                                                 fetched))
    return conversation, images, processor


def chat_prompt_with_images(conversation: list[dict], info, tokenizer,
                            render: Callable[[list[dict]], list[int]],
                            allowed_local_media_path: Optional[str] = None,
                            allowed_media_domains=None, fetched: Optional[dict] = None) -> Optional[dict]:
    """The prompt (``{"prompt_token_ids", "multi_modal_data"}``) of a conversation with
    images; None when it has none (render it as text). ``fetched``: its http(s) images,
    fetched already (``fetch.prefetch``); any other is fetched here, blocking."""
    if not count_images(conversation):
        return None
    conversation, images, processor = load_chat_images(conversation, info, allowed_local_media_path,
                                                       allowed_media_domains, fetched)
    token_id = processor.placeholder_token_id
    ids = render_with_images(render, conversation, len(images),
                             tokenizer.convert_ids_to_tokens(token_id), token_id)
    ids = processor.expand_chat_ids(ids, tokenizer)
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": images}}


async def fetch_chat_images(conversation: list[dict], engine) -> dict:
    """The conversation's http(s) images, fetched concurrently off the event loop and off the
    tokenizer threads (``fetch.prefetch``); none when the request will be refused for its
    image count anyway (the count is checked again, with its message, when they load)."""
    from tessellm.multimodal.fetch import FetchPolicy, prefetch

    if count_images(conversation) > engine.info.mm_limits.get("image", 0):
        return {}
    return await prefetch(image_urls(conversation), FetchPolicy.from_env(engine.args.allowed_media_domains))
