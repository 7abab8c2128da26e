"""The ``lorafleet`` entry point and the layering it rests on.

- the core (``lorafleet/``) imports nothing from ``services/``, and no import cycle exists among the
  modules of both (checked on the source's AST, so a lazy import inside a function counts too);
- every command answers ``--help`` through the entry point, and passes its flags to its own parser
  (``lorafleet tiny --arch ...`` ended with ``unrecognized arguments: --arch``);
- a ``LorafleetError`` ends as ``error: <reason>`` and exit status 2, never a traceback.
"""

from __future__ import annotations

import ast
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services import cli

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lorafleet", "services")


def _modules() -> dict[str, Path]:
    """Every module of the core and the services by dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements that run when the module is imported: the body, into if/try/with blocks, not into
    functions or classes' methods, nor ``if TYPE_CHECKING:`` blocks."""
    for node in body:
        yield node
        if isinstance(node, ast.If) and not _is_type_checking(node):
            yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level(block)
        elif isinstance(node, ast.With | ast.ClassDef):
            yield from _module_level(node.body)


def _imported(name: str, node: ast.stmt, known: dict[str, Path]) -> set[str]:
    """Dotted names an import statement of module ``name`` imports (parent packages included)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            is_package = known.get(name, Path()).name == "__init__.py"
            base = name.split(".")[: len(name.split(".")) - node.level + is_package]
            stem = ".".join([*base, *([node.module] if node.module else [])])
        else:
            stem = node.module or ""
        targets = [stem, *(f"{stem}.{alias.name}" for alias in node.names)]
    else:
        return set()
    out = set()
    for target in targets:
        parts = target.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def _import_statements(tree: ast.Module) -> Iterator[ast.stmt]:
    return (n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom))


def _string_imports(tree: ast.Module) -> Iterator[str]:
    """Module names given as strings to ``importlib.import_module`` or ``__import__``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.args[0].value


def test_the_core_imports_nothing_from_the_services() -> None:
    known = _modules()
    offenders = []
    for name, path in known.items():
        if name.split(".")[0] != "lorafleet":
            continue
        where = path.relative_to(ROOT)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in _import_statements(tree):
            if any(t.split(".")[0] == "services" for t in _imported(name, node, known)):
                offenders.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
        strings = [s for s in _string_imports(tree) if s.split(".")[0] == "services"]
        offenders += [f"{where}: import_module({s!r})" for s in strings]
    assert len([n for n in known if n.startswith("lorafleet.")]) > 20
    assert offenders == []


def _import_graph() -> dict[str, set[str]]:
    known = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        edges: set[str] = set()
        for node in _module_level(tree.body):
            edges |= _imported(name, node, known)
        graph[name] = {e for e in edges if e in known and e != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_the_core_and_the_services() -> None:
    graph = _import_graph()
    assert "lorafleet.errors" in graph["services.cli"]  # the graph has the edges it should
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: two modules importing each other at module level are one cycle."""
    a = ast.parse("from pkg import b\n")
    b = ast.parse("import os\nfrom pkg.a import thing\n")
    known = {"pkg": Path("pkg/__init__.py"), "pkg.a": Path("pkg/a.py"), "pkg.b": Path("pkg/b.py")}
    graph = {
        "pkg": set(),
        "pkg.a": {e for n in _module_level(a.body) for e in _imported("pkg.a", n, known)} & set(known),
        "pkg.b": {e for n in _module_level(b.body) for e in _imported("pkg.b", n, known)} & set(known),
    }
    graph = {k: v - {k} for k, v in graph.items()}
    assert _cycles(graph) == [["pkg.a", "pkg.b"]]
    lazy = ast.parse("def f():\n    from pkg import a\n")
    assert not [n for n in _module_level(lazy.body) if isinstance(n, ast.ImportFrom)]


def test_relative_imports_resolve_against_their_package() -> None:
    known = {"pkg.sub": Path("pkg/sub/__init__.py"), "pkg.sub.mod": Path("pkg/sub/mod.py")}
    [from_package] = ast.parse("from . import mod\n").body
    [from_module] = ast.parse("from ..other import x\n").body
    assert "pkg.sub.mod" in _imported("pkg.sub", from_package, known)
    assert "pkg.other.x" in _imported("pkg.sub.mod", from_module, known)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_answers_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: lorafleet {name} ")


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    listed = capsys.readouterr().out.split("commands:\n", 1)[1]
    assert [line.split()[0] for line in listed.splitlines() if line.startswith("  ")] == list(cli.COMMANDS)


@pytest.mark.parametrize("argv", [[], ["nope"], ["--arch", "llama"]])
def test_a_missing_or_unknown_command_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "usage: lorafleet" in capsys.readouterr().err


def test_tiny_gets_its_flags_through_the_entry_point(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lorafleet tiny --arch ... --out ...`` builds the model (argparse used to reject --arch)."""
    out = tmp_path / "neox"
    argv = ["tiny", "--arch", "gpt_neox", "--out", str(out), "--hidden-size", "32", "--layers", "1"]
    assert cli.main([*argv, "--heads", "2", "--pretrain-steps", "0"]) == 0
    assert json.loads((out / "lorafleet_tiny.json").read_text())["arch"] == "gpt_neox"
    assert str(out) in capsys.readouterr().out
    assert sys.argv[0] != "lorafleet tiny"  # the program name is given back


def test_a_lorafleet_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["estimate", str(ROOT / "examples" / "lora.yaml"), "lora.rank=0"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and "lora.rank=0" in err and "Traceback" not in err


def test_data_writes_the_bundled_datasets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "cblue_train" in printed and (tmp_path / "cblue_train.jsonl").is_file()
    assert "preference_train" in printed and (tmp_path / "kto_train.jsonl").is_file()
