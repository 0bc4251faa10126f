"""docs/plugins.md's tutorial, followed word for word: its code blocks become the files of
``tessellm-plugin-mine``, pip-installed into a fresh venv (``--system-site-packages``, so torch
is not reinstalled), where the conformance suite must pass. Slow (a venv, an install and the
whole suite in a fresh interpreter: minutes on 2 shared cores), so ``-m slow``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(REPO, "docs", "plugins.md")


def tutorial_files() -> dict[str, str]:
    """The files section 1 of docs/plugins.md tells the reader to write, from its code blocks."""
    text = open(DOC).read()
    text = text[text.index("## 1. Tutorial"):text.index("### 1.4")]
    blocks = re.findall(r"```(\w+)\n(.*?)```", text, re.S)
    toml = next(body for lang, body in blocks if lang == "toml")
    python = [body for lang, body in blocks if lang == "python"]
    return {"pyproject.toml": toml, "tessellm_mine/__init__.py": "",
            "tessellm_mine/plugin.py": python[0],  # 1.2 Register a backend
            "tessellm_mine/attention.py": python[1]}  # 1.3 the simplest correct kernel


def test_tutorial_files_are_complete():
    files = tutorial_files()
    assert 'mine = "tessellm_mine.plugin"' in files["pyproject.toml"]
    assert "def tessellm_register_backends" in files["tessellm_mine/plugin.py"]
    assert "class MyAttentionKernel" in files["tessellm_mine/attention.py"]


@pytest.mark.slow
def test_tutorial_plugin_passes_conformance_in_a_fresh_venv(tmp_path):
    pkg = tmp_path / "tessellm-plugin-mine"
    for rel, body in tutorial_files().items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(body)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = str(env_dir / "bin" / "python")
    env = dict(os.environ, PYTHONPATH=REPO)
    # the tutorial's `pip install -e tessellm-plugin-mine`, offline, into the venv only
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-e", str(pkg)], check=True, env=env, timeout=300)
    proc = subprocess.run([python, "-m", "tessellm.testing", "--backend", "mine", "-q"],
                          capture_output=True, text=True, env=env, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
    assert sys.prefix not in python  # it ran in the venv, not in this interpreter


def test_versioning_section_names_the_current_api():
    """docs/plugins.md section 2.1 states the contract's version and what each one added, up
    to the one spec.py declares (it said "now 6" at API 14)."""
    from tessellm.backends import spec

    text = open(DOC).read()
    n = spec.TESSELLM_PLUGIN_API
    assert f"`TESSELLM_PLUGIN_API` (now {n})" in text
    for version in range(2, n + 1):
        assert f"API {version} added" in text, version
    assert f"\n{n} = " in spec.__doc__ or f" {n} = " in spec.__doc__
