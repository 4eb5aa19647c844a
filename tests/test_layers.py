"""Which parts of Detour may import which, so each can be read, tested and changed from below.

The proxy's modules stand on floors, high to low::

    proxy/__main__.py          the top: ``python -m proxy``, the CLI
    6  proxy/tools/            the operator commands (``detour ...``)
    5  proxy/api/              the HTTP face: the app, handlers, admin endpoints, services
    5  proxy/webhook/          the admission webhook, a program of its own
    4  proxy/content/          blobs and manifests: hits, shared fetches, what clients are sent
    3  proxy/cluster/          the peers of a site
    2  proxy/upstream/         the way out: the upstream client, each hop, egress, peer checks
    2  proxy/cache/            the disk: the store, its index, blobs written and read back
    0  proxy/*.py              the shared modules: settings, errors, oci, metrics, logs, ...

A module may import modules of its own folder and of any lower floor, never of a higher one.
Two folders on the same floor do not import each other: the HTTP face and the webhook are two
programs, and the way out and the disk know nothing of each other (content is what joins
them). Neither pair imports the other in either direction today, so neither direction is
allowed. The webhook imports only the shared modules: it runs as its own Deployment. Every
``proxy`` import counts, those inside functions and under ``TYPE_CHECKING`` too.

When one of these tests fails, the message names the file, the line and the import. Move the
code to the floor it belongs on (usually down, into the module that both sides use), or pass
what is needed in from above, rather than importing upwards.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import ROOT

PROXY = ROOT / "proxy"
TOP = 7  # proxy/__main__.py: imports anything, imported by nothing
SHARED = 0
FLOORS = {
    "tools": 6,
    "api": 5,
    "webhook": 5,
    "content": 4,
    "cluster": 3,
    "upstream": 2,
    "cache": 2,
}
ONLY_SHARED = {"webhook"}  # folders that may import the shared modules and nothing else
MAX_MODULES_PER_FOLDER = 15


@dataclass(frozen=True)
class Import:
    path: Path  # the importing file
    line: int
    source: str  # its dotted module name
    target: str  # the proxy module (or package) it imports

    def __str__(self) -> str:
        where = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{where}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def exists(module: str) -> bool:
    """Whether a dotted name is a module or package of the checkout (not a name in one)."""
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def folder(module: str) -> str | None:
    """The folder under proxy/ a module is in, or None for the shared modules at the root."""
    parts = module.split(".")
    if len(parts) >= 2 and (PROXY / parts[1]).is_dir():
        return parts[1]
    return None


def floor(module: str) -> int:
    if module == "proxy.__main__":
        return TOP
    name = folder(module)
    if name is None:
        return SHARED
    assert name in FLOORS, f"proxy/{name}/ is on no floor: add it to FLOORS in {__file__}"
    return FLOORS[name]


def imports_of(path: Path, source: str | None = None, module: str | None = None) -> list[Import]:
    """Every import of a ``proxy`` module in a file, relative ones resolved."""
    module = module or module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = module.split(".")
                package = package if is_package else package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            # `from proxy.api import handlers` imports the module proxy.api.handlers; `from
            # proxy import __version__` only the package proxy.
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.append(submodule if exists(submodule) else base)
        for target in targets:
            if target == "proxy" or target.startswith("proxy."):
                found.append(Import(path, node.lineno, module, target))
    return found


@functools.cache
def all_imports() -> tuple[Import, ...]:
    return tuple(i for path in sorted(PROXY.rglob("*.py")) for i in imports_of(path))


UP, ACROSS, NOT_SHARED = "up", "across", "not shared"


def wrong(found: Import) -> tuple[str, str] | None:
    """Which rule an import breaks (UP, ACROSS or NOT_SHARED) and how, in words; or None."""
    source, target = found.source, found.target
    here, there = folder(source), folder(target)
    if here == there and "proxy.__main__" not in (source, target):
        return None
    if here in ONLY_SHARED and there is not None:
        return NOT_SHARED, f"proxy/{here}/ imports only the shared modules at proxy/'s root"
    low, high = floor(source), floor(target)
    if high > low:
        return UP, f"up from floor {low} ({here or 'shared'}) to floor {high} ({there or 'top'})"
    if high == low and here != there:
        return ACROSS, f"across floor {low}: proxy/{here}/ and proxy/{there}/ keep apart"
    return None


def broken(rule: str) -> list[str]:
    return [f"{i}: {why[1]}" for i in all_imports() if (why := wrong(i)) and why[0] == rule]


def test_every_folder_is_on_a_floor() -> None:
    """A new folder under proxy/ needs a floor here before the rules below can place it."""
    folders = {p.parent.name for p in PROXY.glob("*/__init__.py")}
    assert sorted(folders - set(FLOORS)) == []


def test_no_module_imports_a_higher_floor() -> None:
    """The cache, say, never imports the HTTP app: what is low can be used and tested without
    what stands on it."""
    upward = broken(UP)
    assert not upward, "\n".join(upward)


def test_folders_on_one_floor_keep_apart() -> None:
    """The HTTP face and the webhook don't import each other, nor do the upstream client and
    the cache store: each can change without the other noticing."""
    across = broken(ACROSS)
    assert not across, "\n".join(across)


def test_the_webhook_imports_only_the_shared_modules() -> None:
    """The webhook runs as its own Deployment: nothing of the proxy's comes in with it."""
    found = broken(NOT_SHARED)
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("where", "line", "why"),
    [
        ("proxy/cache/store.py", "from proxy.api.app import create_app", "up from floor 2"),
        ("proxy/cluster/peering.py", "import proxy.content.blobs", "up from floor 3"),
        ("proxy/lane.py", "from proxy.upstream import rules", "up from floor 0"),
        ("proxy/upstream/client.py", "from proxy.cache.store import CacheStore", "across"),
        ("proxy/webhook/server.py", "from proxy.upstream.rules import Rules", "only the"),
        ("proxy/content/blobs.py", "from ..api import services", "up from floor 4"),
        ("proxy/api/app.py", "from proxy.__main__ import main", "up from floor 5"),
    ],
)
def test_the_check_sees_a_wrong_import(where: str, line: str, why: str) -> None:
    """The rules above would catch each of these imports, were one added to that file."""
    path = ROOT / where
    [found] = imports_of(path, source=line, module=module_name(path))
    assert why in (wrong(found) or ("", ""))[1]


def test_the_check_passes_what_is_allowed() -> None:
    """Down a floor, within a folder, the shared modules, and the top importing the tools."""
    allowed = [
        ("proxy/content/blobs.py", "from proxy.cache.store import CacheStore"),
        ("proxy/content/blobs.py", "from . import fetch"),
        ("proxy/webhook/server.py", "from proxy.settings import Settings"),
        ("proxy/api/app.py", "from proxy import __version__"),
        ("proxy/api/app.py", "from proxy.api import allocator"),
        ("proxy/__main__.py", "from proxy.tools.cli import main"),
    ]
    for where, line in allowed:
        path = ROOT / where
        for found in imports_of(path, source=line, module=module_name(path)):
            assert wrong(found) is None, f"{where}: {line}"


def test_no_folder_holds_more_than_15_modules() -> None:
    """A folder stays small enough to take in at a glance; past 15 modules, split it by what
    its modules do."""
    folders = [PROXY, *(p.parent for p in PROXY.glob("*/__init__.py"))]
    counts = {
        str(d.relative_to(ROOT)): len([p for p in d.glob("*.py") if p.name != "__init__.py"])
        for d in folders
    }
    crowded = {d: n for d, n in counts.items() if n > MAX_MODULES_PER_FOLDER}
    assert not crowded, f"more than {MAX_MODULES_PER_FOLDER} modules: {crowded}"


MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 200


def test_modules_and_classes_stay_small() -> None:
    """A module a newcomer reads in one sitting, a class with one job: no module in proxy/
    over 400 lines, no class over 200 (its body, docstring and methods)."""
    long_modules, long_classes = [], []
    for path in sorted(PROXY.rglob("*.py")):
        source = path.read_text()
        where = path.relative_to(ROOT)
        if (lines := len(source.splitlines())) > MAX_MODULE_LINES:
            long_modules.append(f"{where}: {lines} lines")
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    long_classes.append(f"{where}:{node.lineno} class {node.name}: {length} lines")
    assert not long_modules, "\n".join(long_modules)
    assert not long_classes, "\n".join(long_classes)
