"""No private aiohttp access outside workers/aiohttp_compat.py: the worker's and the master's sources, read as
Python (ast), use none of the `._names` aiohttp's own classes use, but on their own objects and on a short list of
CPython ones."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


# Uses outside aiohttp_compat.py of a `._name` that aiohttp also uses, on objects that are not aiohttp's, each with
# what it is; "*": in any file. None today: CPython's privates used here (os._exit, a socket's _accept, a logging
# handler's _open, an asyncio future's _asyncio_future_blocking, argparse's _actions) are names aiohttp does not use.
NOT_AIOHTTP: dict[tuple[str, str], str] = {}


def aiohttp_private_names() -> frozenset[str]:
    """Every _name aiohttp's own code uses as an attribute (its classes' internals)."""
    names = set()
    for info in pkgutil.iter_modules(aiohttp.__path__):
        try:
            module = importlib.import_module(f"aiohttp.{info.name}")
        except ImportError:  # optional extras (brotli, the pytest plugin's needs)
            continue
        for value in vars(module).values():
            if inspect.isclass(value) and value.__module__ == module.__name__:
                for member in vars(value).values():
                    function = getattr(member, "__func__", getattr(member, "fget", member))
                    code = getattr(function, "__code__", None)
                    if code is not None:
                        names.update(code.co_names)
                names.update(getattr(value, "__slots__", ()))
                names.update(vars(value))
    return frozenset(n for n in names if n.startswith("_") and not n.startswith("__"))


AIOHTTP_PRIVATE = aiohttp_private_names()


def aiohttp_subclasses(tree: ast.Module) -> set[ast.ClassDef]:
    """Classes deriving from a name imported from aiohttp (or from aiohttp_compat, which derives from it)."""
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module.startswith("aiohttp") or node.module.endswith("aiohttp_compat")):
            imported.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.asname or alias.name for alias in node.names if alias.name.startswith("aiohttp"))
    classes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                root = base
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in imported:
                    classes.add(node)
    return classes


def private_accesses(path: Path) -> list[tuple[str, int]]:
    """(access as written, line) for each `._name` that aiohttp's own classes use: on anything but self/cls,
    and on self inside a subclass of an aiohttp class; each such name given to getattr/setattr/hasattr/delattr;
    each private name imported from an aiohttp module."""
    tree = ast.parse(path.read_text())
    inherited = set()  # Attribute nodes inside subclasses of aiohttp classes
    for cls in aiohttp_subclasses(tree):
        inherited.update(id(n) for n in ast.walk(cls) if isinstance(n, ast.Attribute))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in AIOHTTP_PRIVATE:
            receiver = ast.unparse(node.value)
            if receiver not in ("self", "cls") or id(node) in inherited:
                found.append((f"{receiver}.{node.attr}", node.lineno))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2 and \
                isinstance(node.args[1], ast.Constant) and node.args[1].value in AIOHTTP_PRIVATE:
            found.append((f"{node.func.id}(..., {node.args[1].value!r})", node.lineno))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiohttp"):
            for part in [*node.module.split("."), *(alias.name for alias in node.names)]:
                if part.startswith("_"):
                    found.append((f"from {node.module} import {part}", node.lineno))
    return found


def test_no_private_aiohttp_access_outside_aiohttp_compat():
    sources = sorted([*ROOT.glob("workers/**/*.py"), *ROOT.glob("balancer/**/*.py")])
    assert len(sources) > 40
    offending, used = [], set()
    for path in sources:
        rel = path.relative_to(ROOT).as_posix()
        if rel == "workers/aiohttp_compat.py":
            continue
        for access, line in private_accesses(path):
            allowed = {(rel, access), ("*", access)} & NOT_AIOHTTP.keys()
            used |= allowed
            if not allowed:
                offending.append(f"{rel}:{line}: {access}")
    assert offending == [], "private access outside workers/aiohttp_compat.py:\n" + "\n".join(offending)
    # The allowlist holds only what is there: a stale entry would hide nothing, but says something false.
    assert used == NOT_AIOHTTP.keys(), NOT_AIOHTTP.keys() - used


def test_the_private_access_finder_finds_what_it_is_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from aiohttp.web_protocol import RequestHandler, _MsgType\n"
                      "from aiohttp import web\n"
                      "def f(request, protocol):\n"
                      "    x = request._payload\n"
                      "    protocol._cache['peername'] = 1\n"
                      "    return getattr(protocol, '_messages'), request.__class__\n"
                      "class Mine:\n"
                      "    def m(self, other):\n"
                      "        self._keepalive = self._fine = other._not_aiohttps = 1\n"
                      "class Handler(RequestHandler):\n"
                      "    def m(self):\n"
                      "        self._keepalive = self._mine = 1\n"
                      "class Runner(web.AppRunner):\n"
                      "    def m(self):\n"
                      "        return self._server\n")
    assert sorted(a for a, _ in private_accesses(sample)) == [
        "from aiohttp.web_protocol import _MsgType", "getattr(..., '_messages')", "protocol._cache",
        "request._payload", "self._keepalive", "self._server"]
