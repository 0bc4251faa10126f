"""Fixtures for registry tests: fake plugin modules built in the test, and a real entry-point
distribution written to a temporary site directory (importlib.metadata discovers it)."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "examples", "tessellm-plugin-example")


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """Install a distribution with ``tessellm.backends`` entry points into a temp sys.path dir:
    ``fake_site(dist, {ep_name: "module"}, {module: source})``."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def install(dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
        info = tmp_path / f"{dist}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[tessellm.backends]\n{eps}\n")
        for mod, src in modules.items():
            (tmp_path / f"{mod}.py").write_text(textwrap.dedent(src))

    yield install
    for mod in [m for m in sys.modules if m.startswith("fakeplug_")]:
        del sys.modules[mod]


def example_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("tessellm-plugin-example")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="session")
def example_plugin():
    """pip-install examples/tessellm-plugin-example (editable, offline) once; idempotent."""
    import subprocess

    if not example_installed():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "--no-index", "-e", EXAMPLE], check=True)
    assert example_installed()
    return EXAMPLE


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from tessellm.testing.harness import save_tiny_llama

    return save_tiny_llama(str(tmp_path_factory.mktemp("backends-llama")))
