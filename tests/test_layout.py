"""The repository's shape: no import circle between the method and the frame, and every function
METHOD.md's equation table names exists in molere.py."""
import ast
from pathlib import Path

from helpers import ROOT
from tools import method_share

ROOT = Path(ROOT)

MODULES = ["molere", "molere_cli", "molere_data", "molere_io", "molere_report", "molere_world"]


def imports(path, ours):
    """Which of `ours` a module imports anywhere (at the top or inside a function), leaving out
    the `if __name__ == "__main__":` block: an entry point, not an import of the module."""
    tree = ast.parse(open(path).read())
    main = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    skip = {id(n) for block in main for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ours)


def cycle(graph):
    """A list of modules that import each other round, or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n, path + [n])
                if found:
                    return found
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_circle_and_only_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_between_the_method_and_the_frame():
    graph = {m: imports(ROOT / f"{m}.py", MODULES) - {m} for m in MODULES}
    assert cycle(graph) is None, cycle(graph)
    assert graph["molere"] <= {"molere_world", "molere_io"}, graph["molere"]  # never the frame
    assert "molere" in graph["molere_cli"]  # the frame imports the method, not the other way


def test_every_function_method_md_names_exists_in_molere():
    """METHOD.md's equation table is the contract: each function it names for an equation is defined in
    molere.py (tools/method_share.py reads the table the same way to count the method's share)."""
    _, _, _, _, missing = method_share.count(ROOT)
    assert not missing, f"METHOD.md names functions molere.py lacks: {missing}"
