"""What gunicorn's, uvicorn's and aiohttp's users type by habit, and the one line balancer answers each with.

HABITS is the one table of other servers' flags: the CLI turns each into a one-line error (exit 2), the docs'
mapping table is generated from it, and tests/test_cli.py checks every entry. Imports nothing of balancer's,
so that the workers can use refusing_run_app() too.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Habit:
    """Flags of another server that balancer does not take, and what to use instead."""

    flags: tuple[str, ...]  # as the other server spells them
    server: str  # whose flags they are: "gunicorn", "uvicorn", or "gunicorn and uvicorn"
    says: str  # what balancer has instead, or that it has nothing; starts lower-case, no final stop
    instead: str = ""  # balancer's equivalent, an option ("--keepalive-timeout") or a subcommand ("config")

    def message(self, flag: str) -> str:
        """The one line a user who typed flag gets."""
        return f"{flag} is {self.server}'s; {self.says}"


GUNICORN, UVICORN, BOTH = "gunicorn", "uvicorn", "gunicorn and uvicorn"


def renamed(theirs: str, ours: str, server: str = GUNICORN) -> Habit:
    """A flag balancer has under another name."""
    return Habit((theirs,), server, f"balancer calls it {ours}", ours)


def absent(flags: tuple[str, ...], server: str, why: str, instead: str = "") -> Habit:
    """Flags balancer has no equivalent of, and why, or what to do instead."""
    return Habit(flags, server, f"balancer has no such option: {why}", instead)


# Flags balancer has under the same name (--workers, --bind, --reload, --proxy-headers, --log-config, ...) are
# not here. When balancer gains one of these flags, its entry goes: argparse refuses a flag defined twice.
HABITS: tuple[Habit, ...] = (
    renamed("--keep-alive", "--keepalive-timeout"),
    Habit(("-k", "--worker-class"), GUNICORN, "balancer has no worker classes: every worker serves aiohttp on "
                                              "asyncio (uvloop when installed, see --loop)", "--loop"),
    Habit(("--threads",), GUNICORN, "balancer has no threads option: each worker is one event loop; scale with "
                                    "--workers", "--workers"),
    absent(("--chdir",), GUNICORN, "start it in that directory (cd DIR, systemd's WorkingDirectory=), which its "
                                   "workers keep; --app-dir DIR sets the import path", "--app-dir"),
    Habit(("--pythonpath",), GUNICORN, "balancer puts --app-dir DIR first on the workers' import path", "--app-dir"),
    renamed("--access-logformat", "--access-log-format"),
    Habit(("-D", "--daemon"), GUNICORN, "balancer stays in the foreground: run it under systemd (deploy/systemd) "
                                        "or another supervisor"),
    Habit(("-p",), GUNICORN, "balancer calls it --pid-file (or --pid); a port goes in --bind HOST:PORT",
          "--pid-file"),
    renamed("-n", "--name"),
    renamed("-u", "--user"),
    renamed("-g", "--group"),
    renamed("-m", "--umask"),
    renamed("--log-file", "--error-logfile"),
    absent(("-e", "--env"), GUNICORN, "set the variable in balancer's environment, which the workers inherit"),
    Habit(("--check-config", "--print-config"), GUNICORN, "balancer checks and prints its configuration with "
                                                          "`balancer config [OPTIONS]`", "config"),
    absent(("--limit-request-line", "--limit-request-fields", "--limit-request-field_size"), GUNICORN,
           "aiohttp's limits apply (8190 bytes per request line and header field, 128 header fields)"),
    absent(("--reuse-port",), GUNICORN, "its master accepts every connection and hands it to a worker"),
    absent(("--worker-tmp-dir",), GUNICORN, "workers send heartbeats to the master, not through a file"),
    Habit(("--log-config-dict", "--log-config-json"), GUNICORN, "balancer reads a logging dictConfig from a JSON or "
                                                                "TOML file: --log-config FILE", "--log-config"),
    Habit(("--statsd-host", "--statsd-prefix"), GUNICORN, "balancer has no statsd: it serves Prometheus metrics on "
                                                          "--metrics-bind", "--metrics-bind"),
    renamed("--proxy-allow-from", "--forwarded-allow-ips"),
    absent(("--ssl-version",), BOTH, "it serves TLS 1.2 and up"),
    Habit(("--host", "--port"), UVICORN, "balancer takes HOST:PORT in --bind (repeatable), e.g. --bind 0.0.0.0:8000",
          "--bind"),
    Habit(("--uds",), UVICORN, "balancer takes a unix socket as --bind unix:/path", "--bind"),
    absent(("--fd",), UVICORN, "it takes sockets from systemd socket activation (deploy/systemd/balancer.socket)"),
    Habit(("--factory",), UVICORN, "balancer needs no such flag: it tells a factory from an Application itself "
                                   "(app:create_app, or app:create_app() to call it as written)"),
    Habit(("--reload-dir",), UVICORN, "balancer's --reload watches --app-dir DIR", "--app-dir"),
    absent(("--reload-include", "--reload-exclude", "--reload-delay"), UVICORN,
           "--reload watches the Python files under --app-dir"),
    absent(("--env-file",), UVICORN, "set variables in its environment (systemd: EnvironmentFile=)"),
    absent(("--use-colors", "--no-use-colors"), UVICORN, "its log lines are plain text or JSON (--log-format)",
           "--log-format"),
    absent(("--http", "--h11-max-incomplete-event-size"), UVICORN, "aiohttp parses HTTP"),
    absent(("--ws", "--ws-max-size", "--ws-max-queue", "--ws-ping-interval", "--ws-ping-timeout",
            "--ws-per-message-deflate"), UVICORN, "WebSockets are aiohttp's (set them on web.WebSocketResponse)"),
    absent(("--lifespan",), UVICORN, "aiohttp's on_startup, on_shutdown and cleanup_ctx always run"),
    absent(("--interface",), UVICORN, "it serves aiohttp apps, not ASGI or WSGI"),
    absent(("--root-path",), UVICORN, "mount the app under a prefix with aiohttp's app.add_subapp()"),
    Habit(("--limit-concurrency",), UVICORN, "balancer caps open connections per worker: --worker-connections",
          "--worker-connections"),
    renamed("--limit-max-requests", "--max-requests", UVICORN),
    renamed("--timeout-keep-alive", "--keepalive-timeout", UVICORN),
    renamed("--timeout-graceful-shutdown", "--graceful-timeout", UVICORN),
    renamed("--ssl-keyfile", "--keyfile", UVICORN),
    renamed("--ssl-certfile", "--certfile", UVICORN),
    renamed("--ssl-ca-certs", "--ca-certs", UVICORN),
    renamed("--ssl-cert-reqs", "--cert-reqs", UVICORN),
    renamed("--ssl-ciphers", "--ciphers", UVICORN),
    absent(("--ssl-keyfile-password",), UVICORN, "give it an unencrypted key (--keyfile)", "--keyfile"),
    absent(("--header", "--server-header", "--no-server-header", "--date-header", "--no-date-header"), UVICORN,
           "set response headers in the app (an on_response_prepare signal)"),
)

def markdown() -> str:
    """HABITS as the docs' Markdown table: another server's flags, whose, what balancer says."""
    rows = ["| Flag | Whose | What balancer says |", "|---|---|---|"]
    for habit in HABITS:
        flags = ", ".join(f"`{flag}`" for flag in habit.flags)
        rows.append(f"| {flags} | {habit.server} | {habit.says} |")
    return "\n".join(rows) + "\n"


# ---- MODULE:ATTR -----------------------------------------------------------------------------------

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def backend_hint(text: str) -> str:
    """Why text is no backend, for `balancer app.py` or `balancer app`: what MODULE:ATTR would be."""
    directory, name = os.path.split(text.rstrip("/"))
    module = name[:-3] if name.endswith(".py") else name
    example = module if _MODULE.fullmatch(module) else "app"
    said = f"expected MODULE:ATTR, e.g. {example}:app or {example}:create_app()"
    if module != example or ":" in text:
        return said
    app_dir = f"--app-dir {directory} " if directory else ""
    return f"{said}; did you mean {app_dir}--backend {module}:app?"


def looks_like_module(word: str) -> bool:
    """True for a file name or dotted module name (app.py, src/app.py, app, pkg.app): a backend without :ATTR."""
    return word.endswith(".py") or "/" in word or _MODULE.fullmatch(word) is not None


# ---- web.run_app() at import ---------------------------------------------------------------------------

RUN_APP_HINT = ('web.run_app() called while balancer loads the app, which it serves itself: guard that call with '
                '`if __name__ == "__main__":`')


@contextlib.contextmanager
def refusing_run_app():
    """Within, aiohttp.web.run_app raises RUN_APP_HINT instead of trying to start a second server.

    A module written for `python app.py` often ends with web.run_app(app). Imported by a worker, whose loop is
    already running, that call fails with "Cannot run the event loop while another loop is running", which
    says nothing about the fix.
    """
    from aiohttp import web

    original = web.run_app

    def run_app(app=None, *args, **kwargs):
        if inspect.iscoroutine(app):  # web.run_app(make_app()): unawaited, it would warn on stderr at exit
            app.close()
        raise RuntimeError(RUN_APP_HINT)

    web.run_app = run_app
    try:
        yield
    finally:
        web.run_app = original
