"""``python -m tessellm.testing --backend NAME [--emulate] [pytest args...]``."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    try:
        import pytest
    except ModuleNotFoundError:
        print("error: the tessellm conformance suite runs under pytest, which is not installed; "
              'install it with: pip install "tessellm[conformance]"', file=sys.stderr)
        return 4
    __import__("os").environ.setdefault("TESSELLM_VALIDATE_PLUGINS", "1")

    if "--emulate" in argv and "TRITON_INTERPRET" not in __import__("os").environ:
        __import__("os").environ["TRITON_INTERPRET"] = "1"  # before any kernel module imports
    return pytest.main(["-p", "tessellm.testing.plugin", "--pyargs",
                        "tessellm.testing.conformance", "-p", "no:cacheprovider", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
