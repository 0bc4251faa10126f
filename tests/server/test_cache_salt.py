"""vLLM's ``cache_salt`` through the server: a salted request shares prefix-cache blocks only
with requests of the same salt (the engine's prefix-cache hit counters show it), at
/v1/completions, /v1/chat/completions and /v1/responses; an empty salt is a 400 naming the field."""

from __future__ import annotations

import random

import pytest

from conftest import MODEL


def _hits(server) -> int:
    return server.stats()["stats"]["prefix_cache_hits"]


@pytest.fixture()
def prompt():
    """A prompt of several full blocks that no other test sends (no earlier hits)."""
    rng = random.Random()
    return " ".join(rng.choice(["red", "green", "blue", "cat", "dog", "sun"]) for _ in range(80))


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/responses"])
def test_salted_prompts_share_blocks_only_within_their_salt(server, http, prompt, path):
    body = {"model": MODEL, "max_tokens": 1, "temperature": 0}
    # chat: the prompt as the system message, so the template's default system prompt (which the
    # server's other unsalted chat requests share) is not the first block
    body |= {"prompt": prompt} if path == "/v1/completions" else {
        "messages": [{"role": "system", "content": prompt}, {"role": "user", "content": "Go on."}]}
    if path == "/v1/responses":  # the same conversation: instructions are the system message
        body = {"model": MODEL, "max_output_tokens": 1, "temperature": 0, "instructions": prompt,
                "input": "Go on."}

    def hits_of(**extra) -> int:
        before = _hits(server)
        r = http.post(path, json={**body, **extra})
        assert r.status_code == 200, r.text
        return _hits(server) - before

    assert hits_of(cache_salt="tenant-a") == 0  # first of its kind
    assert hits_of(cache_salt="tenant-b") == 0  # same prompt, other salt: nothing shared
    assert hits_of() == 0  # unsalted: nothing shared with the salted ones
    assert hits_of(cache_salt="tenant-a") >= 3 * 16  # same salt: its full blocks are hits
    assert hits_of() >= 3 * 16  # and unsalted ones share among themselves


def test_empty_cache_salt_is_refused(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1, "cache_salt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt", r.text
