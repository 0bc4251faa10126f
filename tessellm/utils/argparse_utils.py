"""vLLM's ``FlexibleArgumentParser`` (``vllm.utils.argparse_utils``, earlier ``vllm.utils``), the
parser vLLM's example scripts build with ``EngineArgs.add_cli_args(parser)``."""

from __future__ import annotations

import argparse
import sys

from tessellm.entrypoints.vllm_args import flexible_argv


class FlexibleArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` taking vLLM's command-line conventions: ``--flag_name`` for
    ``--flag-name``, and ``--config FILE.yaml`` (a mapping of flag names to values; flags on the
    command line win)."""

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        known = {s for action in self._actions for s in action.option_strings}
        return super().parse_known_args(flexible_argv(argv, known), namespace)
