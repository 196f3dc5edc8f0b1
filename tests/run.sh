#!/usr/bin/env bash
# Install everything the tests need on a fresh machine and run the whole suite; then run the worker's HTTP
# tests again on the lowest aiohttp pyproject.toml allows, in a clean venv of their own.
# With arguments, only that pytest selection runs, on the installed aiohttp.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v systemd-socket-activate >/dev/null || need+=(systemd)  # tests/test_systemd.py
command -v promtool >/dev/null && command -v prometheus >/dev/null || need+=(prometheus)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)  # Debian's python3 makes venvs with it
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The suite runs in a virtual environment (.venv, the README's install command's too): Debian's and Ubuntu's
# python3 refuse pip installs (PEP 668, "externally-managed-environment") and may come without pip at all.
suite_venv=$(realpath -m "${BALANCER_VENV:-.venv}")
"$suite_venv/bin/python" -m pip --version >/dev/null 2>&1 || python3 -m venv --clear "$suite_venv"
"$suite_venv/bin/python" -m pip install -q -e '.[dev,bench]'
export VIRTUAL_ENV="$suite_venv" PATH="$suite_venv/bin:$PATH"  # as `activate` does, for tools run by name
if [ $# -gt 0 ]; then
    exec python -m pytest "$@"
fi
status=0
python -m pytest || status=$?

# The floor is what pyproject.toml says, so the two cannot drift apart.
lowest=$(python -c 'import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(re.match(r"aiohttp>=([^,;\s]+)", d).group(1) for d in deps if d.startswith("aiohttp>=")))')
# A venv without --system-site-packages: the newer aiohttp installed above must not leak in.
venv="${BALANCER_LOWEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/balancer/venv-aiohttp-$lowest}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -e '.[dev]' "aiohttp==$lowest"
"$venv/bin/python" -c "import aiohttp, sys
if aiohttp.__version__ != '$lowest':
    sys.exit(f'tests/run.sh: $venv has aiohttp {aiohttp.__version__}, not $lowest')"
echo "== the worker's HTTP tests on aiohttp $lowest ($venv)"
worker_tests=()
for f in test_protocol test_integration test_abuse test_limits test_worker_runtime test_tls test_proxy_protocol \
         test_forwarded test_tuning; do
    [ -f "tests/$f.py" ] && worker_tests+=("tests/$f.py")
done
"$venv/bin/python" -m pytest -p no:cacheprovider "${worker_tests[@]}" || status=$?
exit $status
