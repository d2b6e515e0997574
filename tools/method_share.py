"""How much of molere.py is the method's math, by a rule anyone can re-run.

    python -m tools.method_share            # the share, and the lines of each top-level name

The rule. A code line is a line with code on it: blank lines, comment lines and docstrings do
not count. A code line is method math when the top-level function or class it sits in is named
in METHOD.md's equation table as computing an equation (the table's "function" column, read
from the file, so the rule follows the table), or is the classifier f_theta those equations are
written for (`Block`, `WideResNet`). Everything else is not: imports, the config, batching,
run state, evaluation helpers, RNG bookkeeping and process plumbing. README states the result.
"""
import ast
import io
import keyword
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLASSIFIER = {"Block", "WideResNet"}  # f_theta of every equation


def equation_names(method_md):
    """The names in the "function" column (the third) of METHOD.md's equation rows, molere.py's
    own only (a `module.name` elsewhere is not in molere.py)."""
    names = set()
    for line in method_md.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)]  # "\|" inside a cell is a character
        if len(cells) > 4 and re.fullmatch(r"E\d+", cells[1]):
            names |= {n for n in re.findall(r"`([A-Za-z_][\w.]*)`", cells[3])
                  if "." not in n and not keyword.iskeyword(n)}  # `class`: a value, not a name
    return names


def code_lines(source):
    """Line numbers that hold code: a token other than a comment, a newline or a docstring."""
    tree = ast.parse(source)
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
                    isinstance(first.value.value, str):
                docs |= set(range(first.lineno, first.end_lineno + 1))
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER, tokenize.ENCODING)
    lines = set()
    for tok in tokenize.tokenize(io.BytesIO(source.encode()).readline):
        if tok.type not in skip:
            lines |= set(range(tok.start[0], tok.end[0] + 1))
    return lines - docs


def share(source, method_names):
    """(method code lines, all code lines, {top-level name: (code lines, is method)})."""
    tree, lines = ast.parse(source), code_lines(source)
    by_name, counted = {}, set()
    for node in tree.body:
        start = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
        span = set(range(start, node.end_lineno + 1)) & lines
        counted |= span
        name = getattr(node, "name", None)
        if name is None:  # an import or an assignment: plumbing or config
            targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
            name = "/".join(t.id for t in targets if isinstance(t, ast.Name)) or type(node).__name__.lower()
        n, is_method = by_name.get(name, (0, False))
        by_name[name] = (n + len(span), name in method_names)
    method = sum(n for n, m in by_name.values() if m)
    return method, len(lines), by_name


def count(root=ROOT):
    """molere.py's share under the rule: (method lines, code lines, all lines, by name, the names
    METHOD.md gives that molere.py lacks)."""
    source = (root / "molere.py").read_text()
    names = equation_names((root / "METHOD.md").read_text()) | CLASSIFIER
    method, total, by_name = share(source, names)
    return method, total, len(source.splitlines()), by_name, sorted(n for n in names if n not in by_name)


def main():
    method, total, lines, by_name, missing = count()
    if missing:
        sys.exit(f"METHOD.md names functions molere.py does not have: {', '.join(missing)}")
    width = max(map(len, by_name))
    for name, (n, m) in sorted(by_name.items(), key=lambda kv: (not kv[1][1], -kv[1][0])):
        print(f"  {name:<{width}} {n:4d}  {'method' if m else ''}")
    print(f"molere.py: {method} of {total} code lines are method math ({100 * method / total:.0f}%), "
          f"{lines} lines in all")


if __name__ == "__main__":
    main()
