"""The package's rooms keep their documented order (grok_deploy.LAYERS), no room has an import circle
inside it, and no file is over 500 lines: walk every import with ast."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import grok_deploy

PKG = Path(grok_deploy.__file__).parent


def layer_of() -> dict[str, int]:
    return {room: i for i, rooms in enumerate(grok_deploy.LAYERS) for room in rooms}


def room_of(module: str) -> str | None:
    """`grok_deploy.trtllm.convert` -> `trtllm`; the package root itself -> None (allowed everywhere)."""
    parts = module.split(".")
    if parts[0] != "grok_deploy":
        return None
    return parts[1] if len(parts) > 1 else None


def imports_of(source: str, module: str, is_pkg: bool = False) -> list[tuple[int, str]]:
    """Every grok_deploy module a source imports (top level or inside functions), with its line."""
    package = module if is_pkg else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            if base == "grok_deploy":  # `from grok_deploy import model` names a room
                found += [(node.lineno, f"grok_deploy.{a.name}") for a in node.names if a.name != "__version__"]
            else:
                found.append((node.lineno, base))
    return sorted((line, m) for line, m in found if m.split(".")[0] == "grok_deploy")


def violations(source: str, module: str, is_pkg: bool = False) -> list[str]:
    layers, own = layer_of(), room_of(module)
    bad = []
    for line, target in imports_of(source, module, is_pkg):
        room = room_of(target)
        if room is None or room == own:
            continue
        if room not in layers:
            bad.append(f"{module}:{line} imports {target}: room {room!r} is not in grok_deploy.LAYERS")
        elif layers[room] >= layers[own]:
            bad.append(f"{module}:{line} imports {target}: {own} (layer {layers[own]}) may not import "
                       f"{room} (layer {layers[room]})")
    return bad


def package_modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        is_pkg = rel.name == "__init__"
        parts = rel.parts[:-1] if is_pkg else rel.parts
        yield path, ".".join(parts), is_pkg


def test_every_room_is_a_documented_layer():
    layers = layer_of()
    rooms = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    rooms |= {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert rooms - set(layers) == set(), "every subpackage and top-level module must be placed in LAYERS"
    assert set(layers) - rooms == set(), "LAYERS names a room that does not exist"


def test_no_room_imports_a_higher_one():
    bad, checked = [], 0
    for path, module, is_pkg in package_modules():
        if room_of(module) is None:
            continue
        checked += 1
        bad += violations(path.read_text(encoding="utf-8"), module, is_pkg)
    assert checked > 40
    assert bad == []


def test_the_check_catches_upward_and_peer_imports():
    src = ("from grok_deploy.errors import UserError\n"
           "def f():\n    from grok_deploy.pipeline.schema import load_pipeline\n"
           "from grok_deploy import serving\n"
           "from ..onnx.graph import build_model\n")
    bad = violations(src, "grok_deploy.trtllm.convert")
    assert len(bad) == 3
    assert "grok_deploy.trtllm.convert:3 imports grok_deploy.pipeline.schema: trtllm (layer 4) may not import " \
           "pipeline (layer 7)" == bad[0]
    assert "imports grok_deploy.serving:" in bad[1]
    assert "imports grok_deploy.onnx.graph: trtllm (layer 4) may not import onnx (layer 4)" in bad[2]
    assert violations("from grok_deploy.model.grok import Grok\n", "grok_deploy.checkpoint.xai") == []
    assert violations("from grok_deploy.checkpoint import open_checkpoint\n", "grok_deploy.model.generate") != []


def test_architecture_doc_lists_the_rooms_in_layer_order():
    doc = (PKG.parent / "docs" / "ARCHITECTURE.md").read_text()
    rooms = [r for rooms in grok_deploy.LAYERS for r in rooms if (PKG / r).is_dir()]
    positions = [doc.index(f"{r}/") for r in rooms]
    assert positions == sorted(positions), "docs/ARCHITECTURE.md's module map follows LAYERS"


# --- import circles inside a room, and file sizes --------------------------------------------------

MAX_LINES = 500


def module_edges(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """{module: the modules of `sources` it imports, at the top or inside functions}; sources maps a
    module name to (its source, is_pkg). `from pkg import mod` names the module pkg.mod."""
    edges: dict[str, set[str]] = {m: set() for m in sources}
    for module, (source, is_pkg) in sources.items():
        package = module if is_pkg else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(source)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in sources else base for a in node.names]
            edges[module] |= {t for t in targets if t in sources and t != module}
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle among modules of one room, each as a path that ends where it starts."""
    found, seen = [], set()
    for start in sorted(edges):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges[node]):
                if nxt == start and room_of(start) == room_of(node):
                    key = frozenset(path)
                    if key not in seen:
                        seen.add(key)
                        found.append(path + [start])
                elif nxt not in path and nxt > start and room_of(nxt) == room_of(start):
                    stack.append((nxt, path + [nxt]))
    return found


def test_no_import_circle_inside_a_room():
    sources = {module: (path.read_text(encoding="utf-8"), is_pkg) for path, module, is_pkg in package_modules()}
    edges = module_edges(sources)
    assert sum(len(e) for e in edges.values()) > 50  # the walk sees the package's imports
    assert circles(edges) == []


def test_the_circle_check_catches_a_circle_through_function_level_imports():
    sources = {
        "grok_deploy.trtllm.a": ("def f():\n    from grok_deploy.trtllm.b import g\n", False),
        "grok_deploy.trtllm.b": ("from grok_deploy.trtllm import c\n", False),
        "grok_deploy.trtllm.c": ("import numpy\ndef h():\n    from . import a\n", False),
        "grok_deploy.trtllm.d": ("from grok_deploy.trtllm.a import f\n", False),  # into the circle, not on it
        "grok_deploy.trtllm": ("", True),
    }
    assert circles(module_edges(sources)) == [["grok_deploy.trtllm.a", "grok_deploy.trtllm.b",
                                               "grok_deploy.trtllm.c", "grok_deploy.trtllm.a"]]
    sources["grok_deploy.trtllm.c"] = ("import numpy\n", False)
    assert circles(module_edges(sources)) == []


def over_max(paths) -> list[str]:
    out = []
    for path in paths:
        n = len(path.read_text(encoding="utf-8").splitlines())
        rel = path.relative_to(PKG.parent).as_posix()
        if n > MAX_LINES:
            out.append(f"{rel}: {n} lines")
    return out


def test_no_file_over_500_lines():
    files = sorted(PKG.rglob("*.py")) + sorted((PKG.parent / "bench").glob("*.py")) + \
        sorted((PKG.parent / "tests").rglob("*.py"))
    assert len(files) > 120
    assert over_max(files) == []


def test_the_size_check_counts_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path / "grok_deploy")
    (tmp_path / "grok_deploy").mkdir()
    ok, long = tmp_path / "grok_deploy" / "ok.py", tmp_path / "grok_deploy" / "long.py"
    ok.write_text("x = 1\n" * 500)
    long.write_text("x = 1\n" * 501)
    assert over_max([ok, long]) == ["grok_deploy/long.py: 501 lines"]
