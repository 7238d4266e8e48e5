"""ruff, configured in pyproject.toml, finds nothing: the same check for every developer and CI;
and comments and docstrings say why, never when or which issue."""
import ast
import io
import re
import shutil
import subprocess
import sys
import tokenize

import pytest


def test_ruff_finds_nothing(repo_root):
    try:
        import ruff  # noqa: F401  (the test extra installs it)
        command = [sys.executable, "-m", "ruff"]
    except ImportError:
        if shutil.which("ruff") is None:
            pytest.skip("ruff is not installed (pip install -e '.[test]')")
        command = ["ruff"]
    run = subprocess.run([*command, "check", "--output-format", "concise", "."], cwd=repo_root, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


# What a comment or docstring must not carry: a reason is still true when the issue is closed
# and the day forgotten; "see issue N" or a date only says when, and goes stale.
HISTORY = re.compile(r"\bissues? \d+|(?<![\w&])#\d+\b|\b20\d\d-\d\d-\d\d\b", re.IGNORECASE)
PYTHON_SOURCES = ("reference", "cuda_kernels", "bridges", "models", "bench", "science", "imagenet", "tests")


def _python_sources(root):
    """The project's own Python files: each layer's folder, alignscan's own modules (not its links
    to the layers) and the tests."""
    yield from sorted(p for p in (root / "alignscan").glob("*.py") if not p.is_symlink())
    for folder in PYTHON_SOURCES:
        yield from sorted(p for p in (root / folder).rglob("*.py") if not p.is_symlink())


def _comments(source):
    """(line, text) of every # comment, read by the tokenizer, so that a # inside a string is not one."""
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string.lstrip("#")


def _docstrings(source):
    """(line, text) of every line of every module, class and function docstring; other string
    literals are data and are not read."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                for offset, line in enumerate(first.value.value.splitlines()):
                    yield first.lineno + offset, line


def test_comments_and_docstrings_say_why_not_when_or_which_issue(repo_root):
    """No comment or docstring in the project's Python cites an issue by number or a calendar
    date: they say why the code is as it is; the history lives in git and the issue tracker."""
    hits = []
    for path in _python_sources(repo_root):
        source = path.read_text()
        for line, text in [*_comments(source), *_docstrings(source)]:
            if HISTORY.search(text):
                hits.append(f"{path.relative_to(repo_root)}:{line}: {text.strip()}")
    assert not hits, f"{len(hits)} comments or docstrings say when or which issue:\n" + "\n".join(hits)
