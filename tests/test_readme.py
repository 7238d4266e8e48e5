"""The README's Python examples run as written (the README is the first thing a user reads)."""
import re


def test_readme_examples_run(repo_root):
    readme = repo_root / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert len(blocks) >= 3
    namespace = {}
    for block in blocks:
        exec(compile(block, str(readme), "exec"), namespace)


def test_readme_names_the_two_commands(repo_root):
    text = (repo_root / "README.md").read_text()
    assert ('pip install torch==2.13.0 torchvision==0.28.0 && pip install -e ".[all,ptx]" && python -m alignscan.bench'
            in text)
    ci = (repo_root / ".ci" / "run").read_text()
    assert "pip install --quiet torch==2.13.0 torchvision==0.28.0" in ci
    assert "python -m pytest" in text
