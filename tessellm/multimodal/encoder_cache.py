"""The runner's encoder cache: image features computed when a step first reaches an image,
kept until the request's steps have consumed all of its placeholders.

Invariant: a request's image ``j`` has an entry exactly while some of its placeholders are
still to be computed and a step has already reached it. Chunked prefill may split a span::

    placeholders of image j:     [offset ................................ end)
    step 1 computes [c, c+n):    [offset ....... c+n)                          encode; rows 0..k
    step 2:                                      [c+n ............ end)        rows k..; free

so the vision tower runs once per image even when a span crosses steps (as vLLM's encoder
cache). Equal images (the same content hash) of requests in the cache together are encoded
once and share the features tensor. A prefix-cache hit that ends inside a span starts in its middle: the features are
computed whole, the rows already in the KV cache are skipped. Preemption drops the runner's
state for the request (``drop``); on resume it comes back as new and the features are
recomputed from its pixels, which travel with it (``NewRequestData.mm_features``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


class EncoderCache:
    def __init__(self, model, device: torch.device):
        self.model = model  # encode_images(pixels [N, ...], sizes) -> per image [tokens, hidden]
        self.device = device
        self.features: dict[tuple[str, int], torch.Tensor] = {}  # (request id, image) -> [tokens, hidden]
        self.identifiers: dict[tuple[str, int], str] = {}  # the same keys -> content hash
        self.num_encoded = 0  # images run through the vision tower (tests, stats)

    def drop(self, request_ids) -> None:
        """Forget the features of requests the runner no longer holds (finished, preempted)."""
        if not self.features or not request_ids:
            return
        ids = set(request_ids)
        for key in [k for k in self.features if k[0] in ids]:
            self._forget(key)

    def step_embeds(self, states: Sequence, counts: Sequence[int],
                    query_start_loc: np.ndarray) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(token rows, their features) for the placeholders this step computes; None when it
        computes none. ``states[i]`` computes ``counts[i]`` tokens from its
        ``num_computed_tokens``, at rows ``query_start_loc[i]`` on."""
        spans = []  # (key, feature, first feature index, last + 1, first row)
        for i, (st, n) in enumerate(zip(states, counts)):
            c = st.num_computed_tokens
            for j, f in enumerate(st.mm_features):
                lo, hi = max(c, f.offset), min(c + n, f.offset + f.length)
                if lo < hi:
                    spans.append(((st.request_id, j), f, lo - f.offset, hi - f.offset,
                                  int(query_start_loc[i]) + lo - c))
        if not spans:
            return None
        self._encode([(key, f) for key, f, *_ in spans if key not in self.features])
        rows, feats = [], []
        for key, f, lo, hi, row in spans:
            rows.append(np.arange(row, row + hi - lo))
            feats.append(self.features[key][lo:hi])
            if hi == f.length:  # its last placeholders: consumed
                self._forget(key)
        rows_t = torch.from_numpy(np.concatenate(rows)).to(self.device)
        return rows_t, torch.cat(feats)

    def profile(self, num_tokens: int) -> None:
        """Run the vision tower on as many blank images as a step of ``num_tokens`` prompt
        tokens covers whole, so its activations count in the memory profile before the KV
        cache is sized (``ModelRunner.profile_run``)."""
        self.model.encode_images(*self.model.dummy_images(num_tokens, self.device))

    def _hold(self, key: tuple[str, int], identifier: str, feats: torch.Tensor) -> None:
        self.features[key] = feats
        self.identifiers[key] = identifier

    def _forget(self, key: tuple[str, int]) -> None:
        del self.features[key]
        del self.identifiers[key]

    def _encode(self, items: list) -> None:
        """Features for ``items`` (key, feature): taken from an entry with the same content
        hash where one is held, else one vision-tower call per pixel shape (one for
        LLaVA-1.5 and Qwen2-Audio, whose clips pass their frame counts; per tile count for
        LLaVA-NeXT; one for all images of a
        ``variable_resolution`` tower, their patches concatenated, or of a ``tiled_images``
        one, their tiles concatenated) over the distinct images."""
        held = {self.identifiers[k]: t for k, t in self.features.items()}
        ragged = getattr(self.model, "variable_resolution", False)
        tiled = getattr(self.model, "tiled_images", False)  # Llama 4: [tiles, 3, S, S] each
        todo: dict[str, list] = {}  # content hash -> the keys that want it
        firsts: dict[tuple, list] = {}  # image shape -> one feature per content hash
        for key, f in items:
            if f.identifier in held:
                self._hold(key, f.identifier, held[f.identifier])
                continue
            if f.identifier not in todo:
                firsts.setdefault(() if ragged or tiled else tuple(f.shape), []).append(f)
            todo.setdefault(f.identifier, []).append(key)
        for group in firsts.values():
            if ragged:  # [patches of all, values] and each image's (t, h, w) grid
                pixels = torch.from_numpy(np.concatenate([f.pixels() for f in group])).to(self.device)
                out = self.model.encode_images(pixels, [f.grid_thw for f in group])
            elif tiled:  # [tiles of all, 3, S, S] and each image's (rows, cols)
                pixels = torch.from_numpy(np.concatenate([f.pixels() for f in group])).to(self.device)
                out = self.model.encode_images(pixels, [f.tile_grid for f in group])
            else:
                pixels = torch.from_numpy(np.stack([f.pixels() for f in group])).to(self.device)
                out = self.model.encode_images(pixels, [f.image_size if f.audio_frames is None
                                                        else f.audio_frames for f in group])
            for f, feats in zip(group, out):
                if feats.shape[0] != f.length:
                    raise ValueError(f"An image has {f.length} placeholder tokens but the vision "
                                     f"encoder gives {feats.shape[0]} features; the prompt's image "
                                     "tokens do not match the model.")
                for key in todo[f.identifier]:
                    self._hold(key, f.identifier, feats)
            self.num_encoded += len(group)
