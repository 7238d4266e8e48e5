"""The README's Python examples run as written (the README is the first thing a user reads)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert ('pip install torch==2.13.0 torchvision==0.28.0 && pip install -e ".[all,ptx]" && python -m alignscan bench'
            in text)
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install --quiet torch==2.13.0 torchvision==0.28.0" in ci
    assert "python -m pytest" in text
