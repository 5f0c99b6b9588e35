"""The modules import only downward: read with ast (nothing is imported), the project's imports
form layers in the order the README documents, with no cycle and no import hidden in a function."""
import ast
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]

# Bottom layer first: each module may import only modules listed before it. The scripts come last.
LIBRARY = ["errors", "files", "cli", "hardware", "metrics", "slices", "brain", "synth", "demo", "dataset", "modules",
           "codes", "prior", "checkpoint", "training", "adversary", "bench", "c2st", "lesions", "maps",
           "study"]
SCRIPTS = ["train", "pixelcnn", "realism", "predict", "anomaly", "sweep"]
ORDER = LIBRARY + SCRIPTS


def project_modules():
    return {path.stem: path for path in sorted(PROJECT.glob("*.py"))}


def imported_modules(node):
    """Top-level names an Import / ImportFrom node imports (relative imports name no module of ours)."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if node.level == 0 and node.module:
        return [node.module.split(".")[0]]
    return []


def project_imports(path, modules):
    """(imports at module level, [(line, module) of imports anywhere else]) of the project's modules."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))}
    at_top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mine = [name for name in imported_modules(node) if name in modules]
            if id(node) in top_level:
                at_top.update(mine)
            else:
                nested += [(node.lineno, name) for name in mine]
    return at_top, nested


def find_cycle(edges):
    """One import cycle of {module: modules it imports} as [a, b, ..., a], or None."""
    done, on_path = set(), []

    def visit(name):
        if name in on_path:
            return on_path[on_path.index(name):] + [name]
        if name in done:
            return None
        on_path.append(name)
        for imported in sorted(edges.get(name, ())):
            cycle = visit(imported)
            if cycle:
                return cycle
        on_path.pop()
        done.add(name)
        return None

    for name in sorted(edges):
        cycle = visit(name)
        if cycle:
            return cycle
    return None


@pytest.fixture(scope="module")
def graph():
    modules = project_modules()
    return {name: project_imports(path, modules) for name, path in modules.items()}


def test_every_module_has_its_place_in_the_order():
    modules = set(project_modules())
    assert sorted(modules - set(ORDER)) == [], "a new module: give it its layer in ORDER"
    assert sorted(set(ORDER) - modules) == [], "a module is gone: take it out of ORDER"
    assert len(ORDER) == len(set(ORDER))


def test_no_project_import_inside_a_function_or_class(graph):
    hidden = {name: nested for name, (_, nested) in graph.items() if nested}
    assert hidden == {}, "import the project's modules at the top of the file, where the layers show"


def test_the_imports_have_no_cycle(graph):
    cycle = find_cycle({name: at_top for name, (at_top, _) in graph.items()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_each_module_imports_only_the_layers_below_it(graph):
    upward = {(name, imported) for name, (at_top, _) in graph.items() for imported in at_top
              if name in ORDER and imported in ORDER and ORDER.index(imported) >= ORDER.index(name)}
    assert sorted(upward) == [], "move the shared piece down to a lower module"


def test_no_library_module_imports_a_script(graph):
    assert {name: sorted(at_top & set(SCRIPTS)) for name, (at_top, _) in graph.items()
            if name in LIBRARY and at_top & set(SCRIPTS)} == {}


def test_the_checker_sees_nested_imports_and_cycles(tmp_path):
    """The checks above would fail on the faults they look for."""
    (tmp_path / "low.py").write_text("import high\n")
    (tmp_path / "high.py").write_text("import os\nfrom low import x\n\ndef f():\n    import low\n\n"
                                      "class C:\n    from high import y\n")
    modules = {"low": tmp_path / "low.py", "high": tmp_path / "high.py"}
    assert project_imports(modules["low"], modules) == ({"high"}, [])
    assert project_imports(modules["high"], modules) == ({"low"}, [(5, "low"), (8, "high")])
    assert find_cycle({"low": {"high"}, "high": {"low"}}) == ["high", "low", "high"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"b", "c"}}) is None
