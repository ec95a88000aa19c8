"""Import layering: clients (kvtier/backends) and transports never import the server.

The server imports backends and transports; if a client imported the server back,
the two would form an import circle (and a slim client would pull the whole server in).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "kvtier"
FORBIDDEN = {"backends": "kvtier.server", "transport": "kvtier.server"}


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` (in ``package``) imports, relative ones resolved."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_does_not_import_the_server(folder: str) -> None:
    banned = FORBIDDEN[folder]
    files = sorted((PKG / folder).glob("*.py"))
    assert files, f"kvtier/{folder} has no modules"
    bad = {f"{p.relative_to(PKG.parent)} imports {m}"
           for p in files for m in imported_modules(p, f"kvtier.{folder}")
           if m == banned or m.startswith(banned + ".")}
    assert not bad, sorted(bad)


def test_relative_imports_are_resolved(tmp_path: Path) -> None:
    """The checker itself: ``from ..server import x`` inside kvtier/backends is caught."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..server import grpc_server\nfrom . import base\n"
                     "import kvtier.server.x\n")
    assert imported_modules(probe, "kvtier.backends") >= {
        "kvtier.server", "kvtier.server.grpc_server", "kvtier.backends.base", "kvtier.server.x"}
