"""The scheduler's encoder budget: how much vision-encoder work one step may start, and how
many image features the runner's encoder cache may hold, in placeholder tokens (vLLM's
``max_num_encoder_input_tokens`` and ``encoder_cache_size``; both default to the larger of
``max_num_batched_tokens`` and the biggest image the model takes).

Plain Python, no torch: the scheduler asks it, per request, how far the request's chunk may
go this step.

Invariants
----------
* The runner (``encoder_cache.py``) encodes an image in the step that first computes one of
  its placeholders, and holds its features until the step that computes its last one. So at
  the start of a step it holds exactly the images of running requests whose span contains
  their next position ``p`` (``offset < p < end``); a request the runner does not hold yet
  (new, or resumed after preemption) holds none. Nothing else needs tracking.
* Per step: the placeholder tokens of the images encoded <= ``max_num_encoder_input_tokens``,
  and held + encoded <= ``encoder_cache_size``. An image already held (by any request: equal
  content hashes share one encoding) or encoded earlier in the same step costs nothing.
* A chunk that reaches an image the budget cannot take stops just before that image's first
  placeholder (possibly 0 tokens: the request waits for a later step). A chunk may end inside
  an image's span: the features stay cached until the rest is computed; with
  ``disable_chunked_mm_input`` it may not (``end_outside_images``).

::

    prompt:       text ... [ image 0 placeholders ] text [ image 1 placeholders ] text
    p (next):                      ^ held (no cost)
    chunk wanted:                  |---------------------------------|
    image 1 over the budget:       |----------------------|            cut at image 1's offset

Every image must fit both limits alone, or its request could never run: ``check_fits``.
"""

from __future__ import annotations

from typing import Iterable, Optional


def default_encoder_budget(max_num_batched_tokens: int, max_tokens_per_image: int) -> int:
    """vLLM's default for both limits: a step's token budget, but at least one whole image."""
    return max(max_num_batched_tokens, max_tokens_per_image)


def max_tokens_per_image(hf_config, model_path: Optional[str] = None) -> int:
    """Placeholder tokens of the model's biggest image (0: a text-only model). Qwen2-VL's
    depend on its image processor's ``max_pixels``, read from ``model_path``."""
    from tessellm.multimodal.limits import takes_audio, takes_images
    from tessellm.multimodal.qwen2_vl_inputs import is_qwen2_vl, max_image_tokens

    if takes_audio(hf_config):  # Qwen2-Audio: a whole window's clip
        from tessellm.models.qwen2_audio import max_audio_tokens

        return max_audio_tokens(hf_config)
    if not takes_images(hf_config):
        return 0
    if is_qwen2_vl(hf_config):
        if model_path is None:
            raise ValueError("Qwen2-VL's image size limit is in its preprocessor_config.json; "
                             "give the model's path.")
        return max_image_tokens(model_path)
    from tessellm.multimodal.mistral3_inputs import is_mistral3, max_image_tokens as mistral3_size

    if is_mistral3(hf_config):
        if model_path is None:
            raise ValueError("Mistral 3's image size limit is in its preprocessor_config.json; "
                             "give the model's path.")
        return mistral3_size(model_path, hf_config)
    from tessellm.multimodal.gemma3_inputs import image_feature_size as gemma3_size, is_gemma3_mm

    if is_gemma3_mm(hf_config):
        return gemma3_size(hf_config)
    from tessellm.multimodal.llama4_inputs import is_llama4_mm, max_image_tokens as llama4_size

    if is_llama4_mm(hf_config):
        if model_path is None:
            raise ValueError("Llama 4's image size limit (max_patches) is in its processor "
                             "config; give the model's path.")
        return llama4_size(hf_config, model_path)
    if getattr(hf_config, "image_grid_pinpoints", None):  # LLaVA-NeXT: by image size
        from tessellm.models.llava_next import max_image_feature_size

        return max_image_feature_size(hf_config)
    from tessellm.models.llava import image_feature_size

    return image_feature_size(hf_config)


def encoder_budget_args(hf_config, max_num_batched_tokens: int,
                        disable_chunked_mm_input: bool = False, model_path: Optional[str] = None) -> dict:
    """SchedulerConfig's encoder fields for the model (none for a text-only model). A model
    whose image tokens attend to the whole image (Gemma 3: ``whole_images``) always keeps
    each image in one prefill chunk, as ``disable_chunked_mm_input`` does."""
    biggest = max_tokens_per_image(hf_config, model_path)
    if not biggest:
        return {}
    whole = whole_images(hf_config)
    disable_chunked_mm_input = disable_chunked_mm_input or whole
    if disable_chunked_mm_input and biggest > max_num_batched_tokens:
        why = ("its image tokens attend to the whole image, so each image is computed in one "
               f"step ({hf_config.architectures[0]})" if whole
               else "disable_chunked_mm_input computes each image in one step")
        raise ValueError(f"The model takes images of {biggest} placeholder tokens and "
                         f"max_num_batched_tokens is {max_num_batched_tokens}, but {why}; raise "
                         f"max_num_batched_tokens to at least {biggest}.")
    budget = default_encoder_budget(max_num_batched_tokens, biggest)
    return {"max_num_encoder_input_tokens": budget, "encoder_cache_size": budget,
            "disable_chunked_mm_input": disable_chunked_mm_input}


def whole_images(hf_config) -> bool:
    """Whether the model's image tokens see their whole image in the attention (Gemma 3): a
    prefill chunk may then never end inside an image (a token would miss later keys)."""
    from tessellm.multimodal.gemma3_inputs import is_gemma3_mm

    return is_gemma3_mm(hf_config)


def end_outside_images(features, start: int, num_new: int) -> int:
    """The chunk ``[start, start + num_new)`` cut so that it does not end inside an image
    (vLLM's ``disable_chunked_mm_input``): it stops before the first image it would enter
    without reaching its end (0 when it starts at or inside one: the request waits for a
    step with room for the rest)::

        prompt:        text [ image placeholders ] text
        chunk wanted:  |-----------|                      ends inside the image
        chunk taken:   |---|                              stops at the image's offset

    vLLM lets a chunk that starts exactly at an image's first placeholder split it; this does
    not. Each image fits ``max_num_batched_tokens`` (``encoder_budget_args``), so the step
    with room comes once the requests ahead of this one leave it the budget."""
    end = start + num_new
    for f in features:
        if f.offset < end < f.end:
            return max(0, f.offset - start)
    return num_new


class EncoderBudget:
    """One step's encoder accounting (``begin``, then ``fit`` and ``take`` per request)."""

    def __init__(self, max_num_encoder_input_tokens: int, encoder_cache_size: int):
        self.max_input_tokens = max_num_encoder_input_tokens
        self.cache_size = encoder_cache_size
        self.compute_left = 0  # encoder input tokens this step may still start
        self.held: dict[str, int] = {}  # content hash -> placeholder tokens, held or encoded this step
        self.encoded: dict[str, list[int]] = {}  # this step: request id -> images it encodes

    def check_fits(self, features: Iterable) -> None:
        limit = min(self.max_input_tokens, self.cache_size)
        for f in features:
            if f.length > limit:
                what = getattr(f, "modality", "image")
                fewer = "; or send fewer or smaller frames" if what == "video" else ""
                raise ValueError(f"A{'n' if what == 'image' else ''} {what} of {f.length} "
                                 f"placeholder tokens exceeds the encoder budget of {limit} "
                                 "tokens per step; raise max_num_batched_tokens to at least "
                                 f"the {what}'s size{fewer}.")

    def begin(self, running: Iterable, position) -> None:
        """A new step: ``running`` requests, ``position(req)`` their next token to compute
        (computed plus scheduled in flight)."""
        self.compute_left = self.max_input_tokens
        self.encoded = {}
        self.held = {}
        for req in running:
            p = position(req)
            for f in req.mm_features:
                if f.offset < p < f.end:
                    self.held[f.identifier] = f.length

    @property
    def cache_used(self) -> int:
        return sum(self.held.values())

    def fit(self, req, start: int, num_new: int, held_by_runner: bool,
            whole: bool = False) -> tuple[int, list]:
        """(tokens the chunk ``[start, start + num_new)`` may compute, the images it encodes).
        ``held_by_runner``: the runner has the request's state (its images before ``start``
        are cached there). ``whole``: the chunk is all or nothing (chunked prefill off)."""
        todo, cost = [], {}
        for j, f in enumerate(req.mm_features):
            if f.offset >= start + num_new:
                break
            if f.end <= start or (held_by_runner and f.offset < start):
                continue  # computed already, or its features are in the runner's cache
            if f.identifier in self.held or f.identifier in cost:
                todo.append(j)
                continue  # shared with an image held or encoded this step
            if (sum(cost.values()) + f.length > self.compute_left
                    or self.cache_used + sum(cost.values()) + f.length > self.cache_size):
                cut = max(0, f.offset - start)
                return (0, []) if whole else (cut, todo)
            cost[f.identifier] = f.length
            todo.append(j)
        return num_new, todo

    def take(self, req, images: list) -> None:
        """``req`` is scheduled with the chunk ``fit`` allowed: its images count now."""
        if not images:
            return
        for j in images:
            f = req.mm_features[j]
            if f.identifier not in self.held:
                self.held[f.identifier] = f.length
                self.compute_left -= f.length
        self.encoded[req.request_id] = list(images)


def make_encoder_budget(config) -> Optional[EncoderBudget]:
    """The scheduler's budget from its config (None: a text-only engine)."""
    if not config.encoder_cache_size:
        return None
    return EncoderBudget(config.max_num_encoder_input_tokens, config.encoder_cache_size)
