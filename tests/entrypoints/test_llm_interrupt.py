"""Ctrl-C in ``LLM.generate`` where the program goes on (a notebook's interrupt, a REPL, a script
that catches ``KeyboardInterrupt``): the call raises ``KeyboardInterrupt`` between two steps, its
requests are aborted, and the same ``LLM`` then serves the next call with the same tokens."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from tessellm import LLM, SamplingParams
from tessellm.entrypoints.interrupt import sigint_between_steps

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8, 9]}]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), dtype="float32")
    yield llm
    llm.shutdown()


def _interrupt_after(seconds: float, returned: threading.Event) -> threading.Thread:
    """A real SIGINT to this process (as a terminal's Ctrl-C or a notebook's interrupt), unless
    the call ``returned`` first (a fast device: then the test fails, not the session)."""
    def send():
        if not returned.wait(seconds):
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def _generate(llm, prompts, params, returned: threading.Event):
    try:
        return llm.generate(prompts, params, use_tqdm=False)
    finally:
        returned.set()


def test_an_interrupted_generate_leaves_the_llm_serving(llm):
    before = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    for _ in range(3):  # wherever in a step the signal lands
        returned = threading.Event()
        thread = _interrupt_after(0.3, returned)
        with pytest.raises(KeyboardInterrupt):
            _generate(llm, PROMPTS * 32, LONG, returned)
        thread.join()
        assert not llm.llm_engine.has_unfinished_requests()  # its requests aborted
        after = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        assert after == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the program's again


def test_a_program_that_ignores_sigint_keeps_its_handler(llm):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        returned = threading.Event()
        thread = _interrupt_after(0.05, returned)
        outs = _generate(llm, PROMPTS * 8, LONG, returned)  # not interrupted
        thread.join()
        assert len(outs) == 16 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_programs_own_handler_is_called_once_the_step_ends(llm):
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        returned = threading.Event()
        thread = _interrupt_after(0.05, returned)
        outs = _generate(llm, PROMPTS, LONG, returned)
        thread.join()
        assert len(outs) == 2 and seen == [signal.SIGINT]  # its handler ran; the call went on
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_sigint_during_a_step_interrupts_at_once():
    with sigint_between_steps() as interrupt:
        interrupt(signal.SIGINT, None)  # noted: the step goes on
        with pytest.raises(KeyboardInterrupt):
            interrupt(signal.SIGINT, None)  # a step that does not end: the program's handler now
        interrupt.step_ended()  # nothing left to deliver
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_the_handler_is_left_alone():
    seen = []

    def steps():
        with sigint_between_steps() as interrupt:
            seen.append(signal.getsignal(signal.SIGINT))
            interrupt.step_ended()

    thread = threading.Thread(target=steps)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]
