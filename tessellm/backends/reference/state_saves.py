"""States saved inside a prefill step (``MambaBatch.state_saves``): the reference composes
them from any recurrent op run once per piece between the saves (the layers' way for ops
that do not declare ``mamba_state_saves``, and the oracle of those that do). Plain torch; it
lives in ``kernels/recurrent_pieces.py`` so the Triton ops use it too (no Triton in it)."""

from tessellm.kernels.recurrent_pieces import plan, run_with_saves, save_conv_states

__all__ = ["plan", "run_with_saves", "save_conv_states"]
