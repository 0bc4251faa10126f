"""Seeded randomized scenarios over the real Scheduler + BlockManager (see scheduler_fuzz.py)."""

from __future__ import annotations

import pytest

from tests.fuzz.scheduler_fuzz import run_scenario


@pytest.mark.parametrize("chunk", range(4))
def test_scheduler_random_scenarios(chunk):
    for seed in range(chunk * 50, chunk * 50 + 50):
        run_scenario(seed)


@pytest.mark.slow
def test_scheduler_random_scenarios_many():
    for seed in range(1000, 4000):
        run_scenario(seed, num_events=300)
