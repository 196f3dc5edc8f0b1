"""Turn "module:attr" into an aiohttp Application, with one-line errors naming what is wrong."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import sys
from dataclasses import dataclass

from aiohttp import web

from balancer_workers.aiohttp_compat import routerless, set_client_max_size


class BackendError(Exception):
    """The backend cannot be loaded; str() is a one-line reason for the user."""


def split_call(spec: str, attr_path: str) -> tuple[str, tuple, dict] | None:
    """gunicorn's `module:factory(args)`: (attribute path, positional and keyword literals); None if no call."""
    if not attr_path.endswith(")"):
        return None
    try:
        call = ast.parse(attr_path, mode="eval").body
        if not isinstance(call, ast.Call):
            raise ValueError("not a call")
        name = ast.unparse(call.func)
        if not all(part.isidentifier() for part in name.split(".")):
            raise ValueError("not a dotted name")
        args = tuple(literal(arg) for arg in call.args)
        kwargs = {kw.arg: literal(kw.value) for kw in call.keywords if kw.arg is not None}
        if len(kwargs) != len(call.keywords):
            raise ValueError("**kwargs is not a literal")
    except (SyntaxError, ValueError) as exc:
        raise BackendError(f"bad backend {spec!r}: a factory call takes literal arguments only "
                           f"(e.g. myapp:create_app() or myapp:create_app('prod', debug=False)): {exc}") from None
    return name, args, kwargs


def literal(node: ast.expr):
    """The value of a literal argument; ValueError naming the argument as written otherwise."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"{ast.unparse(node)} is not a literal") from None


def import_target(spec: str, app_dir: str = ""):
    """Import module:attr (dotted attr allowed) with app_dir (or cwd) first on sys.path; (it, its call or None).

    The call is gunicorn's `module:factory(args)` spelling, as split_call() parses it.
    """
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise BackendError(f"bad backend {spec!r}: expected MODULE:ATTR")
    call = split_call(spec, attr_path)
    if call is not None:
        attr_path = call[0]
    path = os.path.abspath(app_dir or os.getcwd())
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise BackendError(f"cannot import module {module_name!r}: no module named {missing!r}"
                               f" (searched {path} and sys.path)") from None
        raise BackendError(f"module {module_name!r} raised at import: ModuleNotFoundError: {exc}") from exc
    except BaseException as exc:  # SystemExit in a module body is a boot error too
        raise BackendError(f"module {module_name!r} raised at import: {type(exc).__name__}: {exc}") from exc
    obj = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BackendError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    return obj, call


def _required_positional(fn) -> int | None:
    """How many positional arguments fn requires, None when it has no inspectable signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in sig.parameters.values() if p.kind in kinds and p.default is p.empty)


def _is_async(fn) -> bool:
    """True for coroutine functions and objects with an async __call__."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


# A bare handler's body size limit when --client-max-size is not given: aiohttp's own default for an Application.
HANDLER_MAX_SIZE = 1024 ** 2
EXPLICIT = "--client-max-size"  # where the limit comes from when the option is given


@dataclass(frozen=True)
class Backend:
    """What the worker serves: an Application, and for a bare handler the one route that takes everything."""
    app: web.Application
    route: web.AbstractRoute | None = None
    size_origin: str = "the Application's client_max_size"  # where its body size limit comes from, for a 413


def handler_app(handler, client_max_size: int = 0) -> Backend:
    """Wrap a bare request handler in an Application whose one route takes every method and path."""
    app = web.Application(client_max_size=client_max_size or HANDLER_MAX_SIZE)
    route = app.router.add_route("*", "/{tail:.*}", handler)
    origin = EXPLICIT if client_max_size else f"balancer's default for a bare handler; {EXPLICIT} sets another"
    return Backend(app, route, origin)


def skip_router(backend: Backend):
    """A request handler for a bare-handler backend: Application._handle's work without the router (~9% of a
    keep-alive request's worker CPU), from workers/aiohttp_compat.py."""
    return routerless(backend.app, backend.route)


def limit_body(app: web.Application, client_max_size: int) -> Backend:
    """app, given --client-max-size when the option was given; else it keeps its own client_max_size.

    As under run_app and gunicorn, an Application (or a factory's) keeps the client_max_size it was made
    with (aiohttp's default is 1 MiB), and the worker enforces that one, declared or chunked; the option, when
    given, replaces it, so one value holds for every backend.
    """
    if not client_max_size:
        return Backend(app)
    set_client_max_size(app, client_max_size)
    return Backend(app, size_origin=EXPLICIT)


async def load_app(spec: str, app_dir: str = "", client_max_size: int = 0) -> Backend:
    """Resolve spec to a Backend: an Application given directly, built by a (sync or async) factory, or a handler.

    client_max_size: --client-max-size, 0 when not given (each kind keeps its own limit then).
    """
    obj, call = import_target(spec, app_dir)
    if call is not None:  # module:factory(...): called as written, whatever its signature says
        if not callable(obj) or isinstance(obj, web.Application):
            raise BackendError(f"{spec!r}: {call[0]!r} is {_kind(obj)}, which cannot be called")
        return await build(spec, obj, *call[1:], client_max_size)
    if isinstance(obj, web.Application):
        return limit_body(obj, client_max_size)
    if not callable(obj) or isinstance(obj, type):
        raise BackendError(f"{spec!r} is {_kind(obj)}; expected an async handler (request) -> Response, "
                           "an aiohttp.web.Application, or a factory returning one")
    required = _required_positional(obj)
    if required == 1 and (not _is_async(obj) or _first_parameter(obj) == "argv"):
        # aiohttp's `python -m aiohttp.web mod:init_func` style, called with the extra arguments (none here).
        # A plain function cannot be a handler; an async one is a factory when its argument is named argv.
        hint = "" if _is_async(obj) else "; if it is a handler, it must be async (async def handler(request))"
        return await build(spec, obj, ([],), {}, client_max_size, hint)
    if required == 1:
        return handler_app(obj, client_max_size)
    if required not in (0, None):
        raise BackendError(f"{spec!r} takes {required} arguments; expected a handler taking the request "
                           "or a factory taking none")
    return await build(spec, obj, (), {}, client_max_size)


async def build(spec: str, factory, args: tuple, kwargs: dict, client_max_size: int = 0,
                hint: str = "") -> Backend:
    """Call a (sync or async) factory; its Application, or a BackendError naming what went wrong."""
    try:
        result = factory(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
    except Exception as exc:
        raise BackendError(f"factory {spec!r} raised: {type(exc).__name__}: {exc}{hint}") from exc
    if not isinstance(result, web.Application):
        raise BackendError(f"factory {spec!r} returned {_kind(result)}; expected an aiohttp.web.Application"
                           f"{hint}")
    return limit_body(result, client_max_size)


def _first_parameter(fn) -> str | None:
    """The name of fn's first parameter, None when it has no inspectable signature."""
    try:
        return next(iter(inspect.signature(fn).parameters), None)
    except (TypeError, ValueError):
        return None


def _kind(obj) -> str:
    """A short description of what obj is, for error messages."""
    if isinstance(obj, type):
        return f"the class {obj.__name__}"
    name = type(obj).__name__
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"
