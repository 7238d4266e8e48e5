"""The package's floors, read from the real files (not through alignscan/'s links): every
import of the project points to a lower floor, so there is no circle; reference imports
nothing of the project; bench, science and imagenet (siblings) never import each other."""
import ast

from tests import REPO

# Floors, lowest first. An import of the project must go to a strictly lower floor.
FLOORS = {
    # imports nothing of the project
    "reference": 0, "alignscan.stats": 0, "alignscan.runtime": 0, "alignscan.outputs": 0, "alignscan.vision": 0,
    "cuda_kernels": 1, "alignscan.registry": 1, "alignscan.testing": 1,
    "bridges": 2,
    "models": 3,
    "bench": 4, "science": 4, "imagenet": 4,
    "alignscan.cli": 5,
    "alignscan.__main__": 6,
}
PACKAGES = ("reference", "cuda_kernels", "bridges", "models", "bench", "science", "imagenet")


def _unit(path):
    """The floor a source file belongs to: its top-level folder, or alignscan.<module>."""
    rel = path.relative_to(REPO)
    return rel.parts[0] if rel.parts[0] in PACKAGES else f"alignscan.{rel.stem}"


def _target(dotted):
    """The floor an absolute import of ``dotted`` reaches (None: not the project, or the
    package root, whose __init__ imports nothing eagerly)."""
    parts = dotted.split(".")
    if parts[0] != "alignscan" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in PACKAGES else f"alignscan.{parts[1]}"


def _imports(path):
    """(line, floor) for every import of the project in a file, at any depth (lazy imports
    inside functions count: they are arrows all the same)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level >= 2:
                yield node.lineno, f"a relative import above its package ({'.' * node.level}{node.module or ''})"
                continue
            if node.level == 1 or node.module is None:
                continue
            names = ([f"alignscan.{a.name}" for a in node.names] if node.module == "alignscan"
                     else [node.module])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        else:
            continue
        for name in names:
            target = _target(name)
            if target is not None:
                yield node.lineno, target


def _sources():
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    return files + [p for p in (REPO / "alignscan").glob("*.py") if p.name != "__init__.py"]


def test_every_source_file_has_a_floor():
    unknown = sorted({_unit(p) for p in _sources()} - set(FLOORS))
    assert not unknown, f"give these a floor in FLOORS: {unknown}"


def test_every_import_points_down():
    wrong = []
    for path in _sources():
        unit = _unit(path)
        for line, target in _imports(path):
            if target == unit:
                continue
            if target not in FLOORS or FLOORS[target] >= FLOORS[unit]:
                wrong.append(f"{path.relative_to(REPO)}:{line}: {unit} (floor {FLOORS[unit]}) imports {target} "
                             f"(floor {FLOORS.get(target, '?')})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_check_sees_lazy_and_from_imports(tmp_path):
    source = ("import alignscan.science.digits\n"
              "def f():\n    from alignscan import imagenet, registry\n    from alignscan.bench.cli import x\n")
    path = REPO / "science" / "_probe_never_written.py"
    tree_file = tmp_path / "probe.py"
    tree_file.write_text(source)
    found = [t for _, t in _imports(tree_file)]
    assert found == ["science", "imagenet", "alignscan.registry", "bench"]
    assert _unit(path) == "science"


def test_the_truth_and_the_kernels_never_import_torch():
    """reference and cuda_kernels run without torch: torch arrives through bridges, above them."""
    found = []
    for package in ("reference", "cuda_kernels"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                found += [f"{path.relative_to(REPO)}:{node.lineno}" for n in names if n.split(".")[0] == "torch"]
    assert not found, found
