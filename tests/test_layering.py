"""The layering of docs/layering.md holds: every import of every module, read with ``ast``."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERING = ROOT / "docs" / "layering.md"
BASE, FORMATTING = "base", "formatting"


def layers():
    """``{module: (number, layer name)}`` from the table of docs/layering.md."""
    table = {}
    for line in LAYERING.read_text().splitlines():
        match = re.match(r"^\|\s*(\d+)\s*\|\s*([\w ]+?)\s*\|\s*(.+?)\s*\|$", line)
        if match:
            for module in match.group(3).split(","):
                table[module.strip()] = (int(match.group(1)), match.group(2))
    return table


def module_name(path: Path) -> str:
    """``auglocal_fx/rules/base.py -> "rules.base"``; the package itself is ``auglocal_fx``, the CLI ``cli``."""
    if path.parts[len(ROOT.parts)] == "cli":
        return "cli"
    parts = path.relative_to(ROOT / "auglocal_fx").with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts) or "auglocal_fx"


def imports(path: Path):
    """``(imported module, line, inside a function)`` for every import of ours in ``path``."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]  # e.g. ("auglocal_fx", "rules")
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                names = [".".join(base + ([node.module] if node.module else []))]
                if not node.module:  # "from . import x": x is a module
                    names = [f"{names[0]}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name == "auglocal_fx" or name.startswith("auglocal_fx."):
                yield _ours(name), node.lineno, id(node) in inside


def _ours(name: str) -> str:
    """``auglocal_fx.rules.base -> rules.base``, the package -> ``auglocal_fx``."""
    rest = name[len("auglocal_fx."):] if name != "auglocal_fx" else "auglocal_fx"
    known = layers()
    while rest not in known and "." in rest:  # "from .rules.base import X" names a module; deeper is a name
        rest = rest.rsplit(".", 1)[0]
    return rest


def sources():
    return sorted((ROOT / "auglocal_fx").rglob("*.py")) + sorted((ROOT / "cli").rglob("*.py"))


def arrows():
    """``(importer, imported, file:line, inside a function)`` over the whole code base."""
    out = []
    for path in sources():
        for imported, line, in_function in imports(path):
            out.append((module_name(path), imported, f"{path.relative_to(ROOT)}:{line}", in_function))
    return out


def test_every_module_has_a_layer():
    known = layers()
    missing = sorted({m for m in (module_name(p) for p in sources()) if m not in known}
                     | {imported for _, imported, _, _ in arrows() if imported not in known})
    assert not missing, f"modules without a layer in docs/layering.md: {', '.join(missing)}"


def test_no_arrow_runs_the_wrong_way():
    known = layers()
    wrong = []
    for importer, imported, where, _ in arrows():
        (mine, my_layer), (theirs, their_layer) = known[importer], known[imported]
        if theirs > mine:
            wrong.append(f"{importer} -> {imported} ({my_layer} imports the later layer {their_layer}; {where})")
        elif my_layer == FORMATTING and their_layer != BASE:
            wrong.append(f"{importer} -> {imported} (formatting imports {their_layer}: formatting never computes; "
                         f"{where})")
    assert not wrong, "arrows that run the wrong way:\n" + "\n".join(wrong)


def test_no_circle():
    graph = {}
    for importer, imported, _, _ in arrows():
        if importer != imported:
            graph.setdefault(importer, set()).add(imported)

    def circle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    circles = {" -> ".join(c) for c in map(circle_from, graph) if c}
    assert not circles, "import circles:\n" + "\n".join(sorted(circles))


def test_no_import_of_ours_hides_in_a_function():
    hidden = [f"{importer} -> {imported} ({where})" for importer, imported, where, in_function in arrows()
              if in_function and importer != "cli"]
    assert not hidden, "imports inside functions (move them to the top):\n" + "\n".join(hidden)


def test_the_trainers_private_modules_stay_in_the_trainer():
    """The analysis reads checkpoints through ``checkpoints``, not the trainer's ``_train_state``."""
    known = layers()
    private = {m for m, (_, name) in known.items() if name == "training" and m.startswith("_")}
    outside = [f"{importer} -> {imported} ({where})" for importer, imported, where, _ in arrows()
               if imported in private and known[importer][1] != "training"]
    assert not outside, "the trainer's private modules imported from outside it:\n" + "\n".join(outside)


@pytest.mark.parametrize("source, arrow", [
    ("from .tables import format_flops\n", "flops -> tables"),
    ("def f():\n    from .synthesis import choose_aux_head\n", "tables -> synthesis"),
])
def test_the_check_names_a_wrong_arrow(tmp_path, monkeypatch, source, arrow):
    """The check itself: a counting module importing formatting, formatting importing synthesis."""
    importer = arrow.split(" -> ")[0]
    fake = tmp_path / "auglocal_fx" / f"{importer}.py"
    fake.parent.mkdir()
    fake.write_text(source)
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    monkeypatch.setattr(f"{__name__}.LAYERING", LAYERING)
    (tmp_path / "cli").mkdir()
    with pytest.raises(AssertionError, match=re.escape(arrow)):
        test_no_arrow_runs_the_wrong_way()


def test_the_promised_api():
    import auglocal_fx

    assert set(auglocal_fx.__all__) == {
        "to_local", "load", "LocalNet", "ConversionOptions", "train", "TrainConfig", "cost_report", "count_flops",
        "solve_budget", "measure_memory", "block_cka", "linear_probe", "AugLocalError", "__version__"}
    assert all(hasattr(auglocal_fx, name) for name in auglocal_fx.__all__)
