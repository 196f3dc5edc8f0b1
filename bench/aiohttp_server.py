"""The plain-aiohttp peers: one process, or N processes sharing a port with SO_REUSEPORT.

  python -m bench.aiohttp_server --port P                  # single process
  python -m bench.aiohttp_server --port P --reuseport 2    # launcher + 2 processes, kernel-balanced

Each serving process runs bench.apps on uvloop (as balancer's workers do by default), no access log.
The launcher only starts its children and waits; it exits (and takes them down) on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

from aiohttp import web


def serve(host: str, port: int, reuse_port: bool) -> None:
    """Run bench.apps in this process until SIGTERM/SIGINT."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    from bench.apps import create_app
    web.run_app(create_app(), host=host, port=port, reuse_port=reuse_port or None,
                access_log=None, print=None, handle_signals=True)


def launch(host: str, port: int, n: int) -> int:
    """Start n serving children with SO_REUSEPORT on the same port; stop them all on a signal."""
    children = [subprocess.Popen([sys.executable, "-m", "bench.aiohttp_server", "--host", host,
                                  "--port", str(port), "--child"]) for _ in range(n)]

    def stop(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = [child.wait() for child in children]
    return max((abs(c) for c in codes), default=0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--reuseport", type=int, default=0, metavar="N",
                   help="start N processes sharing the port with SO_REUSEPORT (0: one process, no reuseport)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reuseport and not args.child:
        return launch(args.host, args.port, args.reuseport)
    serve(args.host, args.port, reuse_port=args.child)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
