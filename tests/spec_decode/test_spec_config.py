"""SpeculativeConfig parsing: good configs fill defaults, bad ones give one clear ValueError."""

from __future__ import annotations

import pytest

from tessellm.config import EngineArgs
from tessellm.spec_decode.config import parse_speculative_config


def test_json_and_dict_give_the_same_config():
    a = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 3}')
    b = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3})
    assert a == b and (a.prompt_lookup_min, a.prompt_lookup_max) == (2, 5)
    assert a.num_lookahead_tokens == 0 and a.disable_by_batch_size == 16
    assert parse_speculative_config(None) is None


def test_load_policy_turns_drafts_off_at_the_batch_size():
    c = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": 8})
    assert [c.num_drafts(b) for b in (1, 7, 8, 64)] == [4, 4, 0, 0]
    never = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": 0})
    assert never.num_drafts(10_000) == 4


@pytest.mark.parametrize("value, words", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "method 'medusa' is not supported"),
    ({"method": "ngram"}, "needs \"num_speculative_tokens\""),
    ({"method": "ngram", "num_speculative_tokens": 0}, "from 1 to 16"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "swap them"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "needs \"model\""),
    ({"method": "replay", "num_speculative_tokens": 2}, "replay_path"),
    ({"method": "ngram", "num_speculative_tokens": 2, "k": 1}, "unknown field(s) ['k']"),
    ({"method": "ngram", "num_speculative_tokens": 2, "force_accept": True}, "replay method only"),
    ({"method": "replay", "num_speculative_tokens": 2, "replay_records": [], "force_accept": 1},
     "true or false"),
])
def test_bad_config_is_one_clear_error(value, words):
    with pytest.raises(ValueError) as e:
        parse_speculative_config(value)
    assert words in str(e.value)


def test_engine_args_refuse_bad_config_and_pipeline_stages():
    with pytest.raises(ValueError, match="not supported"):
        EngineArgs(speculative_config={"method": "x", "num_speculative_tokens": 1}).validate()
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        EngineArgs(speculative_config={"method": "ngram", "num_speculative_tokens": 1},
                   pipeline_parallel_size=2).validate()
    # async scheduling combines (tessellm/core/spec_ahead.py)
    EngineArgs(speculative_config={"method": "ngram", "num_speculative_tokens": 1},
               async_scheduling=True).validate()
