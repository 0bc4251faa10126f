"""Front end of Qwen2-Audio: a prompt and its clips -> token ids with each ``<|AUDIO|>``
expanded to its clip's placeholder count, and one ``MultiModalFeature`` (modality "audio") per
clip: its log-mel features, span, frame count and hash.

The checkpoint's ``Qwen2AudioProcessor`` (``WhisperFeatureExtractor``: the waveform padded
with silence to the window, ``chunk_length`` seconds; a log-mel spectrogram of
``feature_size`` bins every ``hop_length`` samples) gives the features, as transformers
feeds them to the model; a clip of ``L`` real frames (``feature_attention_mask``) takes
``((L - 1) // 2 + 1 - 2) // 2 + 1`` placeholders (HF's count). Clips longer than the window are cut to
it, as HF's processor does; a clip too short for one placeholder (20 ms or less at 16 kHz:
under 3 frames) is refused, as vLLM refuses it. A text prompt is expanded by the processor; a
token-id prompt may hold ``<|AUDIO|>`` once per clip (expanded here) or already expanded.
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import numpy as np

from tessellm.multimodal.audio import as_audio_list, audio_items
from tessellm.multimodal.inputs import MultiModalFeature
from tessellm.multimodal.processor import ImageProcessor

ARCHITECTURES = ("Qwen2AudioForConditionalGeneration",)


def is_qwen2_audio(hf_config) -> bool:
    return any(a in ARCHITECTURES for a in getattr(hf_config, "architectures", None) or ())


class Qwen2AudioInputs(ImageProcessor):
    """The audio front end; it keeps ``ImageProcessor``'s interface (``process``,
    ``check_without_images``, ``chat_template``, ...) so the input processor and chat code
    take it as they take an image front end."""

    modality = "audio"
    mm_kwargs_keys = ()  # none read (the base's pixel keys would be accepted and ignored)

    def __init__(self, model_path: str, max_audios: int):
        super().__init__(model_path, max_images=0)
        self.max_audios = max_audios

    def _read_config(self, config) -> None:
        from tessellm.models.qwen2_audio import audio_token_id

        self.image_token_id = audio_token_id(config)  # the placeholder _expand / _spans look for
        self.num_frames = 2 * config.audio_config.max_source_positions

    @functools.cached_property
    def feature_extractor(self):
        fe = getattr(self.hf, "feature_extractor", None)
        if fe is None:
            raise ValueError(f"The model at {self.model_path} has no audio feature extractor in "
                             "its processor config; save it with Qwen2AudioProcessor.")
        return fe

    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    def check_without_images(self, ids: Sequence[int]) -> None:
        if self.image_token_id in ids:
            raise ValueError(f"The prompt has audio placeholder tokens (<|AUDIO|>, id "
                             f"{self.image_token_id}) but no audio; pass the clips in "
                             "multi_modal_data['audio'] (or input_audio parts), or drop them.")

    def check_count(self, num_images: int) -> None:
        if num_images:
            raise ValueError(f"The model at {self.model_path} takes audio, not images; send "
                             "audio (multi_modal_data['audio'], input_audio / audio_url parts).")

    def check_audio_count(self, num_audios: int) -> None:
        if num_audios > self.max_audios:
            raise ValueError(f"The prompt has {num_audios} audio clips, over the limit of "
                             f"{self.max_audios} per prompt; raise it with "
                             f"--limit-mm-per-prompt '{{\"audio\": {num_audios}}}'.")

    def process(self, prompt: Union[str, Sequence[int]], audios) -> tuple[list[int], list[MultiModalFeature]]:
        fe = self.feature_extractor
        items = audio_items(audios)
        self.check_audio_count(len(items))  # before any clip is converted or resampled
        clips = as_audio_list(items, self.sampling_rate, int(getattr(fe, "n_samples", 0)) or None)
        fe_args = dict(sampling_rate=self.sampling_rate, return_tensors="np")
        if isinstance(prompt, str):
            out = self._run(lambda: self.hf(text=prompt, audio=clips, **fe_args))
            ids = [int(t) for t in out["input_ids"][0]]
            mask = out["feature_attention_mask"]
        else:
            out = self._run(lambda: self.feature_extractor(
                clips, padding="max_length", return_attention_mask=True, **fe_args))
            ids, mask = None, out["attention_mask"]
        from tessellm.models.qwen2_audio import audio_output_length

        features = np.asarray(out["input_features"], dtype=np.float32)
        if features.shape[-1] != self.num_frames:
            raise ValueError(f"The model's feature extractor gives {features.shape[-1]} mel frames "
                             f"but its audio encoder takes {self.num_frames}; the checkpoint's "
                             "processor config does not match its config.json.")
        frames = [int(n) for n in np.asarray(mask).sum(-1)]
        lengths = [audio_output_length(n) for n in frames]
        for i, (clip, n) in enumerate(zip(clips, lengths)):
            if n < 1:  # vLLM: "too short to be represented inside the model"
                shortest = self._shortest_clip()
                raise ValueError(f"Audio clip {i} is too short for the model: {len(clip)} samples "
                                 f"({1000 * len(clip) / self.sampling_rate:g} ms at "
                                 f"{self.sampling_rate} Hz) give no audio token; send at least "
                                 f"{shortest} samples ({1000 * shortest / self.sampling_rate:g} ms).")
        if ids is None:
            ids = self._expand(list(prompt), lengths)
        spans = self._spans(ids, lengths)
        return ids, [MultiModalFeature.from_pixels(f, start, n, modality="audio", audio_frames=k)
                     for f, start, n, k in zip(features, spans, lengths, frames)]

    def _shortest_clip(self) -> int:
        """Samples of the shortest clip that gives one placeholder (321 at 16 kHz: 3 frames)."""
        from tessellm.models.qwen2_audio import audio_output_length

        frames = next(n for n in range(1, 64) if audio_output_length(n) >= 1)
        return (frames - 1) * int(self.feature_extractor.hop_length) + 1

    @staticmethod
    def _run(call):
        try:
            return call()
        except ValueError as exc:
            raise ValueError(f"The audio processor could not process the input: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a bad clip or prompt: the caller's error
            raise ValueError(f"The audio processor could not process the input: {exc}") from None

    def _count_error(self, count: int, lengths: list[int]) -> str:
        return (f"The prompt has {count} audio placeholder tokens (<|AUDIO|>, id "
                f"{self.image_token_id}) for {len(lengths)} clip(s); put one <|AUDIO|> per clip "
                f"in the prompt, or {sum(lengths)} (each clip's count: "
                f"{', '.join(map(str, lengths))}) when passing expanded token ids.")

    def _spans(self, ids, lengths, token_id=None):
        try:
            return super()._spans(ids, lengths, token_id)
        except ValueError as exc:
            raise ValueError(str(exc).replace("image", "audio clip")) from None


@functools.lru_cache(maxsize=4)
def audio_processor(model_path: str, max_audios: int) -> Qwen2AudioInputs:
    return Qwen2AudioInputs(model_path, max_audios)
