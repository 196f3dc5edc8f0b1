"""Packaging through real installs: the README's install command under PEP 668, the wheel, the sdist, the
install without a C compiler, jinja2 as an extra, Linux only, and a user app with its own `workers` package.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
import tomllib
from pathlib import Path

import aiohttp
import pytest

REPO = Path(__file__).resolve().parent.parent
SERVING = re.compile(r"workers serving on (\S+?)[, ]")
FALLBACK_WARNING = re.compile(r"WARNING C accelerator balancer\._speedups is not installed")
SETUP_PY_LINE = "balancer: the C accelerator balancer._speedups was not built"
# What a checkout holds that is not source: never copied, never in the sdist.
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.py[cod]", "*.so", ".pytest_cache",
              ".hypothesis", ".benchmarks", "tmp")


def source_tree(dest: Path) -> Path:
    """A copy of the checkout's source files, so builds write their build/ and egg-info there, not here."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(*NOT_SOURCE), symlinks=True)
    return dest


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """One copy of the source tree for this module's builds."""
    return source_tree(tmp_path_factory.mktemp("src") / "balancer")


def externally_managed_python(root: Path) -> Path:
    """A Python install like Debian's: this interpreter's stdlib and pip, marked EXTERNALLY-MANAGED (PEP 668).

    Not a venv: pip ignores the marker inside one (sys.prefix != sys.base_prefix), as PEP 668 says it must.
    The binary is copied and the stdlib linked entry by entry, so the marker lands in this install's own
    stdlib directory and not in the real one.
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    real_stdlib = Path(sysconfig.get_paths(vars={"installed_base": sys.base_prefix,
                                                 "base": sys.base_prefix})["stdlib"])
    (root / "bin").mkdir(parents=True)
    shutil.copy2(os.path.realpath(sys._base_executable), root / "bin" / version)
    os.symlink(version, root / "bin" / "python3")
    stdlib = root / "lib" / version
    stdlib.mkdir(parents=True)
    for entry in real_stdlib.iterdir():
        if entry.name not in ("site-packages", "dist-packages", "EXTERNALLY-MANAGED"):
            os.symlink(entry, stdlib / entry.name)
    # The system pip that refuses, as Debian's python3-pip does, where this install's site module looks (Debian's
    # patched one looks in dist-packages).
    site = subprocess.run([root / "bin" / "python3", "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    Path(site).mkdir(parents=True, exist_ok=True)
    import pip
    os.symlink(Path(pip.__file__).parent, Path(site) / "pip")
    (stdlib / "EXTERNALLY-MANAGED").write_text(
        "[externally-managed]\nError=This Python is managed by the test, as Debian's is by apt.\n")
    return root / "bin" / "python3"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the suite's own venv or Python overrides."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(extra)
    return env


def readme_command(intro: str) -> str:
    """The sh block that follows the README's Set up paragraph starting with intro."""
    setup = README_SETUP.search(Path(REPO / "README.md").read_text())
    assert setup, "README.md has no '## Set up' section"
    m = re.search(re.escape(intro) + r".*?```sh\n(.*?)\n```", setup.group(1), re.S)
    assert m, f"no sh block after {intro!r} in README's Set up"
    return m.group(1).strip()


README_SETUP = re.compile(r"^## Set up\n(.*?)^## ", re.S | re.M)


class Served:
    """A master started from a command line: its log lines and the address it serves."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []

    def wait_serving(self, timeout: float = 30.0) -> str:
        """Read log lines until 'workers serving on ADDR'; return ADDR."""
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:  # the master logs at least once per worker boot; EOF ends it early
            self.lines.append(line.rstrip("\n"))
            m = SERVING.search(line)
            if m:
                return m.group(1)
            assert time.monotonic() < deadline, "no 'workers serving' line in time:\n" + "\n".join(self.lines)
        raise AssertionError("the master exited before serving:\n" + "\n".join(self.lines))

    def stop(self) -> str:
        """SIGTERM, wait, then kill the process group this test made; the whole log."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        rest, _ = self.proc.communicate(timeout=10)
        self.lines += rest.splitlines()
        return "\n".join(self.lines)


def get(address: str, path: str = "/") -> tuple[int, str]:
    """One GET with aiohttp's client: status and body."""
    async def fetch():
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{address}{path}", timeout=aiohttp.ClientTimeout(total=10)) as r:
                return r.status, await r.text()
    return asyncio.run(fetch())


def serve_once(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[int, str, str]:
    """Start a master, GET / once, stop it: (status, body, log)."""
    served = Served(cmd, cwd, env)
    try:
        status, body = get(served.wait_serving())
    finally:
        log = served.stop()
    return status, body, log


# --- the README's install command on a Python that refuses pip installs ------------------------------------

@pytest.fixture(scope="module")
def installed(tree, tmp_path_factory) -> dict:
    """Run the README's install command, as written, with an externally managed python3 first on PATH.

    CC=/bin/false stands for a machine without a C compiler; PIP_VERBOSE shows the build output pip hides.
    """
    python3 = externally_managed_python(tmp_path_factory.mktemp("system") / "python")
    env = clean_env(PATH=f"{python3.parent}{os.pathsep}{os.environ['PATH']}", CC="/bin/false",
                    PIP_VERBOSE="1", PIP_NO_COMPILE="1")
    refused = subprocess.run([str(python3), "-m", "pip", "install", "--no-deps", "--no-index", "."], cwd=tree,
                             env=env, capture_output=True, text=True, timeout=60)
    command = readme_command("Install and run the main job")
    assert "venv" in command and command.endswith("balancer"), command
    # --version: the command ends by running the server; here it shows the installed entry point works.
    done = subprocess.run(["bash", "-c", command + " --version"], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=150)
    site = next((tree / ".venv" / "lib").glob("python3*/site-packages"), None)
    return {"refused": refused, "done": done, "command": command, "env": env, "venv": tree / ".venv",
            "dist_info": next(site.glob("balancer-*.dist-info"), None) if site else None}


def require_install(installed: dict) -> None:
    """Fail with the install's own output when the README's command did not install balancer."""
    done = installed["done"]
    assert done.returncode == 0 and installed["dist_info"], \
        f"{installed['command']!r} did not install balancer:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.timeout(240)
def test_readme_install_command_works_where_system_pip_refuses(installed):
    refused, done = installed["refused"], installed["done"]
    assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr, \
        "the stand-in for Debian's python3 must refuse pip installs, or this test proves nothing:\n" + refused.stderr
    require_install(installed)
    assert done.stdout.strip().splitlines()[-1] == "balancer 0.1.0"


def test_install_without_compiler_says_so_once(installed):
    require_install(installed)
    out = installed["done"].stdout + installed["done"].stderr
    assert sum(SETUP_PY_LINE in line for line in out.splitlines()) == 1, out[-3000:]
    record = (installed["dist_info"] / "RECORD").read_text()
    assert "_speedups" not in record, "CC=/bin/false must leave the C accelerator out (and the wheel its source)"
    # The master of that install says it at start, once, and serves anyway.
    status, body, log = serve_once([str(installed["venv"] / "bin" / "balancer"), "--bind", "127.0.0.1:0",
                                    "--metrics-bind", "none", "--workers", "1"], installed["venv"],
                                   installed["env"])
    assert status == 200 and body, log
    assert len(FALLBACK_WARNING.findall(log)) == 1, log
    assert "hand-off in Python" in log


def test_installed_distribution_owns_only_balancer_modules(installed):
    require_install(installed)
    dist_info = installed["dist_info"]
    paths = [line.split(",")[0] for line in (dist_info / "RECORD").read_text().splitlines() if line]
    top = {p.split("/")[0] for p in paths if not p.startswith("..")} - {dist_info.name}
    assert top == {"balancer", "balancer_workers"}, sorted(top)
    assert (dist_info / "top_level.txt").read_text().split() == ["balancer", "balancer_workers"]
    metadata = (dist_info / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata and (dist_info / "licenses" / "LICENSE").is_file()
    assert "Classifier: Operating System :: POSIX :: Linux" in metadata
    assert "Classifier: Framework :: aiohttp" in metadata
    assert re.search(r"^Project-URL: Source, https://", metadata, re.M)
    jinja = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: jinja2")]
    assert jinja and all('extra == "examples"' in line for line in jinja), jinja


def test_template_example_without_jinja2_is_one_line_naming_the_extra(installed):
    require_install(installed)
    r = subprocess.run([str(installed["venv"] / "bin" / "balancer"), "--backend",
                        "balancer_workers.examples.template:handler", "--bind", "127.0.0.1:0", "--metrics-bind",
                        "none", "--workers", "1"], cwd=installed["venv"], env=installed["env"],
                       capture_output=True, text=True, timeout=60)
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert r.returncode == 3, r.stderr
    assert len(errors) == 1 and "balancer[examples]" in errors[0] and "jinja2" in errors[0], r.stderr


# --- the sdist ------------------------------------------------------------------------------------------------

def setuptools_major() -> int:
    """The installed setuptools' major version, 0 when there is none."""
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0


@pytest.mark.timeout(120)
def test_sdist_carries_tests_docs_dashboards_deploy_and_bench(tree, tmp_path):
    # The dev extra brings the setuptools pyproject.toml asks for: then no isolated build env is downloaded.
    isolation = [] if setuptools_major() < 77 else ["--no-isolation"]
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", *isolation, "--outdir", str(tmp_path), str(tree)],
                       env=clean_env(), capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (sdist,) = tmp_path.glob("balancer-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {str(p.relative_to(tree)) for top in ("tests", "docs", "grafana", "deploy", "bench")
              for p in (tree / top).rglob("*") if p.is_file()}
    wanted |= {"LICENSE", "README.md", "pyproject.toml", "setup.py", "balancer/_speedups.c",
               "workers/__main__.py", "workers/examples/templates/page.html"}
    assert wanted - names == set(), sorted(wanted - names)
    assert not [n for n in names if n.endswith((".so", ".pyc")) or "__pycache__" in n]


def test_dockerfile_build_stage_copies_what_pyproject_names():
    # No Docker daemon on the test machines: this checks the image build's inputs against pyproject.toml, whose
    # license-files and readme setuptools refuses to build without.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "setup.py", project["project"]["readme"], *project["project"]["license-files"],
              "balancer", *project["tool"]["setuptools"]["package-dir"].values()}
    text = re.sub(r"\\\n", " ", (REPO / "deploy" / "Dockerfile").read_text())
    build_stage = re.split(r"^FROM ", text, flags=re.M)[1]
    copied = {src.rstrip("/") for m in re.finditer(r"^COPY (?!--from)(.+)$", build_stage, re.M)
              for src in m.group(1).split()[:-1]}
    assert needed - copied == set(), f"deploy/Dockerfile's build stage does not COPY {sorted(needed - copied)}"


# --- Linux only -------------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("platform", ["darwin", "win32", "freebsd14"])
def test_importing_elsewhere_than_linux_is_one_clear_error(platform):
    # The console script's first import, under another sys.platform: one ImportError, nothing after it.
    code = f"import sys; sys.platform = {platform!r}; sys.argv = ['balancer', '--version']; " \
           "from balancer.cli import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"ImportError: balancer runs on Linux only (SCM_RIGHTS over SOCK_SEQPACKET, memfd, prctl); " \
                   f"this is {platform}", r.stderr
    assert len(re.findall(r"^\w+Error: ", r.stderr, re.M)) == 1 and "During handling" not in r.stderr, r.stderr


# --- a user project with its own `workers` package ----------------------------------------------------------

@pytest.fixture
def user_app(tmp_path) -> Path:
    """A user project whose handler imports its own top-level `workers` package."""
    app = tmp_path / "project"
    (app / "workers").mkdir(parents=True)
    (app / "workers" / "__init__.py").write_text("")
    (app / "workers" / "jobs.py").write_text("def greeting():\n    return 'from the user workers package'\n")
    (app / "myapp.py").write_text(
        "from aiohttp import web\nfrom workers.jobs import greeting\n\n\n"
        "async def handler(request):\n    return web.Response(text=greeting())\n")
    return app


def balancer_command() -> list[str]:
    """The console script users run, beside this interpreter (else python -m balancer)."""
    script = Path(sys.executable).parent / "balancer"
    return [str(script)] if script.exists() else [sys.executable, "-m", "balancer"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", ["from the app directory", "with --app-dir"])
def test_user_app_with_its_own_workers_package_boots_and_serves(user_app, tmp_path, where):
    cmd = [*balancer_command(), "--backend", "myapp:handler", "--bind", "127.0.0.1:0", "--metrics-bind", "none",
           "--workers", "1"]
    cwd = user_app
    if where == "with --app-dir":
        cmd += ["--app-dir", str(user_app)]
        cwd = tmp_path
    status, body, log = serve_once(cmd, cwd, clean_env())
    assert (status, body) == (200, "from the user workers package"), log
    assert "No module named" not in log, log


@pytest.mark.timeout(90)
def test_a_module_in_the_current_directory_cannot_shadow_what_the_worker_runtime_imports(tmp_path):
    # Workers start with `python -P`: the directory the master was started in does not go first on the worker's
    # import path before the runtime has imported what it needs. A project file named like a standard module the
    # runtime uses (json.py here) would otherwise replace it in every worker, which then could not boot.
    app = tmp_path / "project"
    app.mkdir()
    (app / "json.py").write_text("raise RuntimeError('the project json.py was imported by the worker runtime')\n")
    (app / "myapp.py").write_text("from aiohttp import web\n\n\n"
                                  "async def handler(request):\n    return web.Response(text='served')\n")
    cmd = [*balancer_command(), "--backend", "myapp:handler", "--bind", "127.0.0.1:0", "--metrics-bind", "none",
           "--workers", "1"]
    status, body, log = serve_once(cmd, app, clean_env())
    assert (status, body) == (200, "served"), log
    assert "project json.py" not in log, log
