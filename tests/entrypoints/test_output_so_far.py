"""``RequestSoFar``: a stream's DELTA outputs folded into the whole output (what the server's
renderers keep for the parsers, usage and logging): text and token ids joined per sample in
order, the prompt's logprobs from the first output that had them, the last output's finish."""

from __future__ import annotations

from tessellm.core.outputs import CompletionOutput, Logprob, RequestOutput
from tessellm.entrypoints.openai.output_so_far import RequestSoFar


def _delta(pieces: dict[int, tuple[str, list[int]]], finished=False, prompt_logprobs=None) -> RequestOutput:
    outputs = [CompletionOutput(i, text, ids, logprobs=[{t: Logprob(-1.0)} for t in ids],
                                finish_reason="stop" if finished else None, stop_reason="!" if finished else None)
               for i, (text, ids) in pieces.items()]
    return RequestOutput("r", "p", [1, 2], outputs, finished, prompt_logprobs, num_cached_tokens=2)


def test_deltas_fold_into_the_whole_output():
    prompt_logprobs = [None, {2: Logprob(-0.5)}]
    whole = RequestSoFar()
    whole.add(_delta({0: ("He", [5]), 1: ("", [])}, prompt_logprobs=prompt_logprobs))
    whole.add(_delta({0: ("llo", [6, 7]), 1: ("Hi", [8])}))
    assert not whole.finished and whole.choice(0).text == "Hello" and whole.choice(1).token_ids == [8]
    whole.add(_delta({0: (" you", [9]), 1: ("", [])}, finished=True))
    assert whole.finished
    out = whole.output()
    assert [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in out.outputs] == [
        (0, "Hello you", [5, 6, 7, 9], "stop", "!"), (1, "Hi", [8], "stop", "!")]
    assert out.prompt_logprobs is prompt_logprobs and out.num_cached_tokens == 2 and out.finished
    assert all(c.logprobs is None for c in out.outputs)  # the chunks carried them
    whole.choice(0).token_ids.append(10)  # the output is a copy: what is kept may still grow
    assert out.outputs[0].token_ids == [5, 6, 7, 9]
