"""The README and the guide in docs/ say only what runs: every python block is executed,
every shell line that calls the command line parses with the command line's own parser,
every pip extra exists, every relative link and anchor resolves.

Python blocks run page by page (a page's blocks in order, in one namespace) in a temporary
folder holding the files the snippets name, as a user would have them: the released ViM-T
checkpoint's file name (written in the official layout from a randomly initialised model),
an ImageNet-style folder of generated images, and a copy of docs/results.
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil

import numpy as np
import pytest

from tests import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
PAGE_IDS = [str(p.relative_to(REPO)) for p in PAGES]

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
SHELL = ("bash", "sh", "shell", "console")
LANGUAGES = ("python", *SHELL, "bibtex", "text")

# Shell commands the pages may show besides the project's command line and pip, as the words
# they start with. A new kind of command goes here knowingly.
ALLOWED = {
    ("python", "-m", "pytest"): "the tests",
    ("pytest",): "the tests",
    ("python", "-c"): "a one-line check, e.g. torch.version.cuda",
    ("python", "-m", "alignscan.bench.gpu_run"): "the one command for a lent GPU machine",
    ("python", "-m", "alignscan.models.timm_models"): "timm's own scripts with the names registered",
}


def _blocks_of(text, languages):
    """(language, code, first line number of the code) of each fenced block in ``languages``."""
    for match in FENCE.finditer(text):
        if match.group(1) in languages:
            yield match.group(1), match.group(2), text.count("\n", 0, match.start(2)) + 1


def _blocks(page, languages):
    return _blocks_of(page.read_text(), languages)


# --- python blocks -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The files the snippets name, where a user would have them."""
    import torch
    from PIL import Image

    from alignscan import models
    from alignscan.models.checkpoints import write_checkpoint

    root = tmp_path_factory.mktemp("docs_workspace")
    torch.manual_seed(0)
    write_checkpoint(root / "vim_t_midclstok_76p1acc.pth", "vim_tiny", models.create("vim_tiny").state_dict(), {})
    rng = np.random.default_rng(0)
    for synset in ("n01440764", "n01443537"):
        folder = root / "imagenet" / "val" / synset
        folder.mkdir(parents=True)
        for k in range(2):
            pixels = (rng.random((240, 256, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"ILSVRC2012_val_{k}.JPEG")
    shutil.copytree(REPO / "docs" / "results", root / "docs" / "results")
    return root


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_python_block_runs(page, workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    namespace = {"__name__": "__main__"}
    for _, code, line in _blocks(page, ("python",)):
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)


def test_the_readme_shows_the_op_a_pruned_model_timm_and_imagenet():
    python = "".join(code for _, code, _ in _blocks(README, ("python",)))
    shell = "".join(code for _, code, _ in _blocks(README, SHELL))
    for needed in ("selective_scan_fn", "alignscan.create(", "models.paper_preset(", "models.load_checkpoint(",
                   "timm.create_model("):
        assert needed in python, f"the README's quickstart lost {needed}"
    assert "python -m alignscan evaluate" in shell and "torchrun" in shell and "-m alignscan evaluate" in shell


def test_the_readme_names_the_two_commands_and_ci_runs_them():
    text = README.read_text()
    assert ('pip install torch==2.13.0 torchvision==0.28.0 && pip install -e ".[all,ptx]" && python -m alignscan bench'
            in text)
    assert "python -m pytest" in text
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install --quiet torch==2.13.0 torchvision==0.28.0" in ci
    assert 'pip install --quiet -e ".[all,ptx]"' in ci and "python -m pytest" in ci


# --- shell blocks --------------------------------------------------------------------------

def _command_lines(code, language):
    """(line offset, logical line) of a shell block: continuations joined, console prompts only."""
    pending, start = "", 0
    for offset, raw in enumerate(code.splitlines()):
        if language == "console":
            if not raw.startswith("$ "):
                continue
            raw = raw[2:]
        if not pending:
            start = offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        yield start, pending + raw
        pending = ""
    if pending:
        yield start, pending


def _commands(line):
    """The simple commands of one line, as word lists (split at && || ; |), without comments,
    leading VAR=value assignments, and with python3 spelled python."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words, command = list(lexer), []
    for word in [*words, ";"]:
        if word in ("&&", "||", ";", "|", "&"):
            while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):
                command.pop(0)
            if command:
                yield ["python" if w == "python3" and i == 0 else w for i, w in enumerate(command)]
            command = []
        else:
            command.append(word)


def _cli_arguments(words):
    """The arguments given to the project's command line, or None when ``words`` is another command."""
    if words[0] == "alignscan":
        return words[1:]
    if words[:3] == ["python", "-m", "alignscan"]:
        return words[3:]
    if words[0] == "torchrun" and "-m" in words:
        at = words.index("-m")
        if words[at + 1:at + 2] == ["alignscan"]:
            return words[at + 2:]
    return None


def _parse_error(arguments):
    """None when the command line's parser accepts ``arguments``, else its message."""
    from alignscan.cli import build_parser
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(arguments)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else f"exit {exc.code}"
    return None


def _extras():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return set(project.get("optional-dependencies", {}))


def _pip_extras(words):
    for word in words:
        match = re.fullmatch(r"(?:\.|alignscan)\[([^\]]*)\]", word)
        if match:
            yield from (e.strip() for e in match.group(1).split(",") if e.strip())


def _shell_problems(name, text, extras):
    for language, code, first in _blocks_of(text, SHELL):
        for offset, line in _command_lines(code, language):
            where = f"{name}:{first + offset}: {line.strip()}"
            try:
                commands = list(_commands(line))
            except ValueError as exc:          # unbalanced quotes
                yield f"{where}\n    cannot be split into words: {exc}"
                continue
            for words in commands:
                arguments = _cli_arguments(words)
                if arguments is not None:
                    error = _parse_error(arguments)
                    if error:
                        yield f"{where}\n    alignscan.cli rejects {shlex.join(arguments)!r}: {error}"
                elif words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
                    unknown = [e for e in _pip_extras(words) if e not in extras]
                    if unknown:
                        yield f"{where}\n    extras not in pyproject.toml: {unknown} (known: {sorted(extras)})"
                elif not any(tuple(words[:len(start)]) == start for start in ALLOWED):
                    yield f"{where}\n    {words[0]!r}: a new kind of command; add it to ALLOWED in tests/test_docs.py"


def test_every_shell_line_parses_or_is_allowed():
    extras = _extras()
    problems = [p for page, name in zip(PAGES, PAGE_IDS) for p in _shell_problems(name, page.read_text(), extras)]
    assert not problems, "\n".join(problems)


def test_the_shell_check_catches_what_it_should():
    """The checker itself: a bad option, an unknown extra and an unlisted command are reported."""
    text = ("Text.\n```bash\npython -m alignscan evaluate --no-such-option\n"
            "torchrun --nproc_per_node 2 -m alignscan \\\n    zero-shot --jobs two\n"
            "pip install -e \".[torch,no-such-extra]\"\nmake docs\n"
            "CI=true python -m pytest -q  # allowed\n```\n")
    problems = list(_shell_problems("probe.md", text, _extras()))
    assert len(problems) == 4, problems
    assert "--no-such-option" in problems[0] and "probe.md:3:" in problems[0]
    assert "--jobs" in problems[1] and "probe.md:4:" in problems[1]
    assert "no-such-extra" in problems[2] and "'make'" in problems[3]


# --- links ---------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page):
    text = FENCE.sub("", page.read_text())
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        text = FENCE.sub("", page.read_text())
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_spec_section_the_pages_cite_exists():
    sections = set(re.findall(r"^## (\d+)\. ", (REPO / "docs" / "SPEC.md").read_text(), re.M))
    cited = {(page.name, n) for page in PAGES for n in re.findall(r"SPEC §(\d+)", page.read_text())}
    assert cited and not [c for c in cited if c[1] not in sections], cited


def test_every_fenced_block_names_a_known_language():
    unknown = [(page.name, m.group(1) or "(none)") for page in PAGES for m in FENCE.finditer(page.read_text())
               if m.group(1) not in LANGUAGES]
    assert not unknown, f"label each block with one of {LANGUAGES}: {unknown}"
