"""The upgrade's preflight: `python -m balancer.upgrade_check ARGV...` imports the new master code and parses ARGV.

Exit 0 when a master of this code could start from that command line and environment; else one line on
stderr (the master logs it) and a non-zero exit. It binds nothing and starts nothing.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    """Import what a re-executed master imports, then resolve its options; the exit code."""
    try:
        import balancer.master  # noqa: F401  (the whole master: listeners, supervisor, metrics, control)
        import balancer.upgrade  # noqa: F401  (the new image reads the state with it)
        from balancer.cli import _implicit_run, build_cli, resolve_namespace
        from balancer.config import ConfigError
    except BaseException as exc:  # a broken release: SyntaxError, ImportError, anything its import raises
        print(f"import failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    args = _implicit_run(list(argv))
    try:
        ns = build_cli(args[0]).parse_args(args)  # argparse says what is wrong in one line, exit 2
        resolve_namespace(ns)
    except ConfigError as exc:
        print(f"configuration: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
