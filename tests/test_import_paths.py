"""Import paths: where a worker finds the runtime (balancer/process.py worker_env), and plain `pytest`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request

import pytest

from tests.harness import HERE, Balancer

pytestmark = pytest.mark.timeout(90)
REPO = HERE.parent
APP = 'from aiohttp import web\n\n\nasync def app(request):\n    return web.Response(text="project\\n")\n'


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.decode().partition("=")[::2] for item in f.read().split(b"\0") if item)


def test_a_projects_own_workers_package_does_not_put_it_before_the_standard_library(tmp_path):
    # The runtime was a top-level `workers` package before it became balancer_workers; looking that name up
    # found the project's own package (the current directory is on a `python -m balancer` master's path) and
    # put the project first on every worker's path, ahead of the standard library, which -P is there to stop.
    project = tmp_path / "project"
    (project / "workers").mkdir(parents=True)
    (project / "workers" / "__init__.py").write_text("")
    # aiohttp imports uuid in the worker (the master never does): a project's own uuid.py must not replace it.
    (project / "uuid.py").write_text("raise ImportError('the project shadowed the standard library')\n")
    (project / "projectapp.py").write_text(APP)
    with Balancer("--workers", "1", "--app-dir", str(project), "--backend", "projectapp:app",
                  preexec=lambda: os.chdir(project)) as b:
        with urllib.request.urlopen(b.url, timeout=10) as resp:
            assert resp.read() == b"project\n"
        worker = b.worker_pids()[0]
        assert str(project) not in environ_of(worker).get("PYTHONPATH", ""), environ_of(worker)


def test_a_runtime_found_only_on_the_masters_path_is_the_workers_too(tmp_path):
    # A wrapper script beside a vendored copy (sys.path[0] is the script's directory): a fresh worker
    # interpreter does not search there unless told, and would run the installed runtime instead.
    vendor = tmp_path / "vendor"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "balancer", vendor / "balancer", ignore=ignore)
    shutil.copytree(REPO / "workers", vendor / "balancer_workers", ignore=ignore)
    main = vendor / "balancer_workers" / "__main__.py"  # run in workers only: the master imports the package
    main.write_text(main.read_text().replace("from __future__ import annotations\n", "from __future__ import "
                    "annotations\nimport sys\nprint('vendored runtime', file=sys.stderr, flush=True)\n", 1))
    (vendor / "run.py").write_text("import sys\nfrom balancer.launch import main\n\nsys.exit(main())\n")
    env = {"PYTHONPATH": ""}
    cmd = [sys.executable, str(vendor / "run.py"), "--workers", "1", "--bind", "127.0.0.1:0", "--metrics-bind",
           "none", "--app-dir", str(HERE / "apps"), "--backend", "testapp:create_app"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **env})
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "workers serving on" in line:
                break
        assert any("vendored runtime" in line for line in lines), "".join(lines)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


@pytest.mark.parametrize("where", ["repository", "tests"])
def test_plain_pytest_collects_every_test_file(where):
    # `pytest`, not only `python -m pytest` (which puts the current directory on the path): the test files
    # import tests.harness, tests.poolmodel...; pyproject.toml's pythonpath puts the repository there.
    pytest_script = os.path.join(os.path.dirname(sys.executable), "pytest")
    if not os.path.exists(pytest_script):
        pytest.skip(f"no pytest script beside {sys.executable}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([pytest_script, "--collect-only", "-q", "-p", "no:cacheprovider"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=REPO if where == "repository" else REPO / "tests")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " error" not in done.stdout.splitlines()[-1], done.stdout[-3000:]
    collected = {os.path.basename(line.split("::")[0]) for line in done.stdout.splitlines() if "::" in line}
    files = {name for name in os.listdir(REPO / "tests") if name.startswith("test_") and name.endswith(".py")}
    assert collected == files, files ^ collected
