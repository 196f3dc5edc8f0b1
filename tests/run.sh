#!/usr/bin/env bash
# Install everything the tests need on a fresh machine and run the whole suite in .venv; then run the worker's
# HTTP tests on every other CPython this machine has (pyproject.toml's requires-python and up) on the newest
# aiohttp, and on the lowest aiohttp pyproject.toml allows, each in a venv of its own (tests/README.md says what
# runs where and how long it takes). `bash tests/run.sh --pythons` runs only those; with other arguments, only
# that pytest selection runs, in .venv, on the installed aiohttp.
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
if [ $# -gt 0 ] && [ "$1" != --pythons ]; then
    exec python -m pytest "$@"
fi
status=0
if [ $# -eq 0 ]; then
    python -m pytest || status=$?
fi

# The floor and the oldest Python are what pyproject.toml says, so the two cannot drift apart.
read -r lowest min_minor < <(python -c 'import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
floor = next(re.match(r"aiohttp>=([^,;\s]+)", d).group(1) for d in project["dependencies"] if d.startswith("aiohttp>="))
print(floor, re.fullmatch(r">=3\.(\d+)", project["requires-python"]).group(1))')
read -r suite_version newest suite_python < <(python -c 'import aiohttp, os, platform, sys
print(platform.python_version(), aiohttp.__version__, os.path.realpath(sys.executable))')
cache="${XDG_CACHE_HOME:-$HOME/.cache}/balancer"
worker_tests=()
for f in test_protocol test_integration test_abuse test_limits test_worker_runtime test_tls test_proxy_protocol \
         test_forwarded test_tuning test_aiohttp_compat test_rebalance; do
    [ -f "tests/$f.py" ] && worker_tests+=("tests/$f.py")
done

# Every CPython this machine has, one per minor version, first found first: the suite's own, pythonX.Y on PATH,
# pyenv's versions, then the system's (Debian 13's python3.13 is /usr/bin/python3.13).
declare -A python_of=() version_of=()
skipped=()
consider() {
    local line impl version free_threaded minor
    line=$("$1" -c 'import platform, sys, sysconfig
print(platform.python_implementation(), platform.python_version(), sysconfig.get_config_var("Py_GIL_DISABLED") or 0)' \
           2>/dev/null) || return 0  # not runnable here: a pyenv shim of a version that is not active, say
    read -r impl version free_threaded <<<"$line"
    minor=${version#3.}; minor=${minor%%.*}
    if [ "$impl" != CPython ] || [ "${version%%.*}" != 3 ]; then
        skipped+=("$1 ($impl $version)")
    elif [ "$minor" -lt "$min_minor" ]; then
        :  # older than requires-python: not a Python users run balancer on
    elif [ "$free_threaded" != 0 ]; then
        skipped+=("$1 ($version free-threaded)")
    elif [ -z "${python_of[$minor]:-}" ]; then
        python_of[$minor]=$1 version_of[$minor]=$version
    fi
}
consider "$suite_python"
for minor in $(seq "$min_minor" 40); do
    candidate=$(command -v "python3.$minor") && consider "$candidate"
done
for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/*/bin/python3 /usr/local/bin/python3.* /usr/bin/python3.*; do
    [[ "$candidate" =~ /python3(\.[0-9]+)?$ && -x "$candidate" ]] && consider "$candidate"
done
suite_minor=${suite_version#3.}; suite_minor=${suite_minor%%.*}
minors=$(printf '%s\n' "${!python_of[@]}" | sort -n)
oldest=$(head -1 <<<"$minors")

# Stages: the floor on the oldest Python found; the suite's aiohttp on every other minor version than the suite's.
labels=() pythons=() pins=() venvs=()
for minor in $minors; do
    if [ "$minor" = "$oldest" ]; then
        labels+=("CPython ${version_of[$minor]}, aiohttp $lowest (the floor)") pythons+=("${python_of[$minor]}")
        pins+=("$lowest")
        venvs+=("${BALANCER_LOWEST_VENV:-$cache/venv-cpython${version_of[$minor]}-aiohttp$lowest}")
    fi
    if [ "$minor" != "$suite_minor" ]; then
        labels+=("CPython ${version_of[$minor]}, aiohttp $newest") pythons+=("${python_of[$minor]}") pins+=("$newest")
        venvs+=("$cache/venv-cpython${version_of[$minor]}-aiohttp$newest")
    fi
done
echo "== the worker's HTTP tests (${#worker_tests[@]} files), besides CPython $suite_version + aiohttp $newest, on:"
printf '   %s\n' "${labels[@]}"
[ ${#skipped[@]} -eq 0 ] || echo "   not used: ${skipped[*]}"

# Installs one at a time: each editable install builds the C module into this tree (one file per interpreter).
# A venv without --system-site-packages: the newer aiohttp in .venv must not leak in.
ready=()
for i in "${!labels[@]}"; do
    venv=${venvs[i]}
    if ! { "$venv/bin/python" -c '' 2>/dev/null || "${pythons[i]}" -m venv --clear "$venv"; } \
       || ! "$venv/bin/python" -m pip install -q -e '.[dev]' "aiohttp==${pins[i]}"; then
        echo "tests/run.sh: could not install into $venv for ${labels[i]}" >&2; status=1; continue
    fi
    # The C hand-off must build on every interpreter that has the headers for it (setup.py makes it optional).
    if ! "$venv/bin/python" - "${pins[i]}" <<'EOF'; then status=1; continue; fi
import os, shutil, sys, sysconfig
import aiohttp
from balancer import speedups
if aiohttp.__version__ != sys.argv[1]:
    sys.exit(f"tests/run.sh: {sys.prefix} has aiohttp {aiohttp.__version__}, not {sys.argv[1]}")
if speedups.WHY not in ("", "off"):
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) and shutil.which(compiler):
        sys.exit(f"tests/run.sh: the C module is {speedups.WHY} in {sys.prefix}, with a compiler and Python.h here")
    print(f"   {sys.prefix}: no C compiler or Python.h, so the Python hand-off is what runs there")
EOF
    ready+=("$i")
done

# The worker tests wait on deadlines far more than they compute (a stage keeps less than half a core busy), so
# one stage more than there are CPUs runs at once: on 2 cores the three stages take little longer than one
# (tests/README.md has the figures). Each stage's output comes when it ends.
at_once=${BALANCER_TEST_JOBS:-$(($(nproc) + 1))}
logs=$(mktemp -d "${TMPDIR:-/tmp}/balancer-stages.XXXXXX")
for i in "${ready[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$at_once" ]; do wait -n || true; done
    echo "== started: ${labels[i]}"
    (
        started=$SECONDS rc=0
        "${venvs[i]}/bin/python" -m pytest -p no:cacheprovider --basetemp="$logs/tmp$i" "${worker_tests[@]}" \
            >"$logs/$i.log" 2>&1 || rc=$?
        echo "$rc $((SECONDS - started))" >"$logs/$i.rc"
    ) &
done
wait
for i in "${ready[@]}"; do
    read -r rc took <"$logs/$i.rc"
    echo "== ${labels[i]} (${venvs[i]}): exit $rc after ${took}s"
    cat "$logs/$i.log"
    [ "$rc" = 0 ] || status=1
done
rm -rf "$logs"
exit $status
