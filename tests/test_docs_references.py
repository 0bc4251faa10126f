"""Keeps the command-line flags and repository paths that README.md and docs/ name honest.

Checks on the text only (nothing is run):
  * a ``--flag`` given to ``tessellm serve|generate|bench ...|backends`` in a command (a code
    block line or an inline code span) is an option of that very sub-command's parser, and every
    flag in the README's ``tessellm serve`` flag table is a ``serve`` option;
  * any other ``--flag`` in the docs is a tessellm option, a ``"--flag"`` literal of a script in
    the repository (benchmarks/, ci/, examples/, tessellm/), or a flag of an outside tool
    (pip, pytest, docker, ray) listed below;
  * a repository path the docs name (``tests/...``, ``tessellm/...``, ``benchmarks/...``, ...;
    globs aside) and every relative markdown link exist, its ``#anchor`` a heading of the
    target (GitHub's slugs).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from tessellm.entrypoints.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
# Flags of tools that are not tessellm's: pip, pytest (pytest-xdist's --dist), docker,
# `ray start`, XLA_FLAGS.
FOREIGN = {"--no-deps", "--pyargs", "--dist", "--build-arg", "--address", "--xla"}
# `tessellm bench throughput|latency|serve --launch`: the flags go to the last alternative
COMMAND = re.compile(r"tessellm\s+(serve|generate|backends|bench\s+(?:(?:throughput|latency|serve)\|)*"
                     r"(?:throughput|latency|serve))\b")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    out: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    key = f"{prefix} {name}".strip()
                    out[key] = sub
                    walk(sub, key)

    walk(build_parser(), "")
    return out


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _command_spans(text: str):
    """(line number, command text) for each code-block line and inline code span (a span may
    run over a line break inside its paragraph)."""
    in_block = False
    pending = ""
    para: list[tuple[int, str]] = []

    def spans():
        joined = " ".join(line for _, line in para)
        for m in re.finditer(r"`([^`]+)`", joined):
            yield para[0][0] + _line_of(para, m.start()), m.group(1)

    for lineno, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```") or not line.strip():
            yield from spans()
            para = []
        if line.lstrip().startswith("```"):
            in_block = not in_block
            pending = ""
            continue
        if in_block:
            body = line.split(" #", 1)[0]
            if body.rstrip().endswith("\\"):
                pending += body.rstrip()[:-1] + " "
                continue
            yield lineno, pending + body
            pending = ""
        elif line.strip():
            para.append((lineno, line))
    yield from spans()


def _line_of(para: list[tuple[int, str]], offset: int) -> int:
    """Lines past the paragraph's first for a character offset in its lines joined by spaces."""
    for i, (_, line) in enumerate(para):
        if offset <= len(line):
            return i
        offset -= len(line) + 1
    return len(para) - 1


def _invocations(text: str):
    """(line number, sub-command, its argument text) for each tessellm invocation."""
    for lineno, span in _command_spans(text):
        for m in COMMAND.finditer(span):
            rest = span[m.end():]
            rest = re.split(r"&&|\|\||;|\s\|\s|\$\(", rest)[0]
            nxt = COMMAND.search(rest)
            if nxt:
                rest = rest[: nxt.start()]
            words = m.group(1).split()
            yield lineno, " ".join([words[0], *(w.rsplit("|", 1)[-1] for w in words[1:])]), rest


def test_tessellm_command_flags_exist_in_their_parser():
    subs = _subparsers()
    bad = []
    for path in DOCS:
        for lineno, cmd, args in _invocations(path.read_text()):
            opts = _options(subs[cmd])
            bad += [f"{path.name}:{lineno}: tessellm {cmd} {f}" for f in FLAG.findall(args) if f not in opts]
    assert not bad, "flags the docs give to a tessellm command that its parser lacks:\n" + "\n".join(bad)


def test_readme_serve_flag_table():
    serve = _options(_subparsers()["serve"])
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("Flags of `tessellm serve"))
    rows = []
    for line in lines[start:]:
        if line.startswith("| `--"):
            rows.append(line)
        elif rows and not line.startswith("|"):
            break
    assert len(rows) > 20, "the README's serve flag table was not found"
    bad = [f for row in rows for f in FLAG.findall(row.split("|")[1]) if f not in serve]
    assert not bad, f"README flag table names flags `tessellm serve` lacks: {bad}"


def test_every_documented_flag_exists_somewhere():
    known = set().union(*(_options(p) for p in _subparsers().values()), FOREIGN)
    sources = [p for d in ("benchmarks", "ci", "examples", "tessellm") for p in (ROOT / d).rglob("*.py")]
    literals = set()
    for src in sources:
        literals.update(re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", src.read_text(errors="replace")))
    bad = []
    for path in DOCS:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            bad += [f"{path.name}:{lineno}: {f}" for f in FLAG.findall(line) if f not in known and f not in literals]
    assert not bad, "flags named in the docs that no parser or script defines:\n" + "\n".join(bad)


PATH = re.compile(r"(?<![\w./-])((?:tessellm|tests|benchmarks|examples|deploy|ci|docs|\.ci)/[\w./-]*[\w/])")
LINK = re.compile(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)")


def test_repository_paths_named_in_docs_exist():
    bad = []
    for path in DOCS:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for m in PATH.finditer(line):
                if line[m.end():m.end() + 1] in ("*", "{"):  # a glob: tests/models/test_x*.py
                    continue
                name = m.group(1).split("::")[0]
                if not (ROOT / name).exists() and not (path.parent / name).exists():
                    bad.append(f"{path.name}:{lineno}: {name}")
            for m in LINK.finditer(line):
                if m.group(1) != "..." and not (path.parent / m.group(1)).exists():
                    bad.append(f"{path.name}:{lineno}: link {m.group(1)}")
    assert not bad, "paths named in the docs that do not exist:\n" + "\n".join(bad)


ANCHOR = re.compile(r"\]\(([^)\s:]*)#([^)\s]+)\)")


def _slugs(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but - and _ dropped, spaces as -."""
    out, seen, fence = set(), {}, False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_markdown_link_anchors_exist():
    bad, found = [], 0
    for path in DOCS:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for m in ANCHOR.finditer(line):
                target = path.parent / m.group(1) if m.group(1) else path
                if target.suffix == ".md" and target.exists():
                    found += 1
                    if m.group(2) not in _slugs(target):
                        bad.append(f"{path.name}:{lineno}: {m.group(1)}#{m.group(2)}")
    assert found > 10, "no anchored links found: the pattern is broken"
    assert not bad, "links to headings that do not exist:\n" + "\n".join(bad)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
