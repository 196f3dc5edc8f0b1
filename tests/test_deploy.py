"""deploy/: manifests validated offline, the container's entry command run for real; the CPU-following default."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from balancer import cpus
from balancer.cli import build_parser, parse_config
from balancer.config import Config
from balancer.supervisor import KILL_GRACE
from tests.harness import Balancer

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.31.0"  # pinned: the oldest Kubernetes release still in upstream support when written


# ---- the worker default: usable CPUs ------------------------------------------------------------------------

def fake_cgroup(tmp_path: Path, files: dict[str, str], own: str = "0::/") -> tuple[str, str]:
    """A cgroup tree under tmp_path (path -> content) and a /proc/self/cgroup naming this process's place in it."""
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(own + "\n")
    return str(root), str(proc)


@pytest.mark.parametrize("text, expected", [
    ("max 100000", None), ("200000 100000", 2.0), ("150000 100000", 1.5), ("50000 100000", 0.5),
    ("", None), ("garbage", None), ("0 100000", None),
])
def test_parse_cpu_max(text, expected):
    assert cpus.parse_cpu_max(text) == expected


def test_cpu_max_caps_the_affinity_rounded_up_and_at_least_one(tmp_path, monkeypatch):
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 8)
    cases = {"max 100000": 8, "200000 100000": 2, "150000 100000": 2, "50000 100000": 1, "1600000 100000": 8}
    for text, expected in cases.items():
        root, proc = fake_cgroup(tmp_path / text.replace(" ", "_"), {"cgroup.controllers": "cpu", "cpu.max": text})
        assert cpus.available_cpus(root, proc) == expected, text
    # no cgroup files at all (not Linux, or no cpu controller): the affinity alone
    assert cpus.available_cpus(str(tmp_path / "nothing"), str(tmp_path / "nothing")) == 8


def test_a_parent_cgroups_quota_binds_the_child(tmp_path, monkeypatch):
    # Without a cgroup namespace the process sits deep in the tree; a pod-level quota sits above the container.
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 8)
    root, proc = fake_cgroup(tmp_path, {
        "cgroup.controllers": "cpu", "kubepods/cpu.max": "max 100000",
        "kubepods/pod1/cpu.max": "300000 100000", "kubepods/pod1/ctr/cpu.max": "max 100000",
    }, own="0::/kubepods/pod1/ctr")
    assert cpus.cgroup_cpu_quota(root, proc) == 3.0
    assert cpus.available_cpus(root, proc) == 3


def test_cgroup_v1_cfs_quota_counts_too(tmp_path, monkeypatch):
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 8)
    root, proc = fake_cgroup(tmp_path, {"cpu/cpu.cfs_quota_us": "250000", "cpu/cpu.cfs_period_us": "100000"},
                             own="4:cpu,cpuacct:/")
    assert cpus.available_cpus(root, proc) == 3
    root, proc = fake_cgroup(tmp_path / "none", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"},
                             own="4:cpu,cpuacct:/")
    assert cpus.available_cpus(root, proc) == 8


def test_the_affinity_caps_a_larger_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 1)
    root, proc = fake_cgroup(tmp_path, {"cgroup.controllers": "cpu", "cpu.max": "400000 100000"})
    assert cpus.available_cpus(root, proc) == 1


def test_help_says_where_the_worker_default_comes_from():
    text = " ".join(build_parser().format_help().split())
    assert "affinity" in text and "cpu.max" in text and f"here {cpus.available_cpus()}" in text
    assert Config().workers == cpus.available_cpus()


def test_a_process_pinned_to_one_cpu_starts_one_worker():
    usable = os.sched_getaffinity(0)
    if len(usable) < 2:
        pytest.skip("needs 2+ usable CPUs to tell a pinned default from an unpinned one")
    one = min(usable)
    # Pinned by the kernel before exec, as `taskset -c 0` or a cpuset would: the master reads it at start.
    with Balancer(preexec=lambda: os.sched_setaffinity(0, {one})) as b:
        assert b.wait_for(r"balancer (\d+) workers serving").group(1) == "1"
        assert len(b.worker_pids()) == 1
    cap = cpus.available_cpus()
    with Balancer() as b:  # unpinned: one worker per usable CPU
        assert b.wait_for(r"balancer (\d+) workers serving").group(1) == str(cap)
        assert len(b.worker_pids()) == cap  # "serving" comes after every first worker reported ready


# ---- Dockerfile ---------------------------------------------------------------------------------------------

def dockerfile_stages(path: Path = DEPLOY / "Dockerfile") -> list[list[tuple[str, str]]]:
    """The Dockerfile's build stages, each a list of (INSTRUCTION, arguments) with continuations joined."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):  # Docker drops comment lines, also inside a continuation
            continue
        current += line
        if current.endswith("\\"):
            current = current[:-1]
            continue
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
        current = ""
    stages: list[list[tuple[str, str]]] = []
    for word, rest in instructions:
        if word == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word, rest))
    return stages


def last(stage: list[tuple[str, str]], word: str) -> str | None:
    """The arguments of the stage's last instruction `word` (the one that counts), or None."""
    found = [rest for w, rest in stage if w == word]
    return found[-1] if found else None


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a build stage and a runtime stage"
    build, runtime = stages[0], stages[-1]
    build_name = re.search(r"\bAS\s+(\S+)", build[0][1], re.I).group(1)
    build_runs = " ".join(rest for w, rest in build if w == "RUN")
    assert "gcc" in build_runs and "pip wheel" in build_runs and "_speedups" in build_runs
    runtime_runs = " ".join(rest for w, rest in runtime if w == "RUN")
    assert "gcc" not in runtime_runs, "no compiler in the runtime image"
    assert f"from={build_name}" in runtime_runs or any(w == "COPY" and f"--from={build_name}" in rest
                                                      for w, rest in runtime), "the runtime installs the build's wheel"
    assert "slim" in runtime[0][1]
    user = last(runtime, "USER")
    assert user is not None and user.split(":")[0] not in ("0", "root")
    assert user.split(":")[0].isdigit(), "numeric, so Kubernetes' runAsNonRoot can check it"
    health = last(runtime, "HEALTHCHECK")
    assert health is not None and "/healthz" in health and "9359" in health and "curl" not in health
    assert set(last(runtime, "EXPOSE").split()) == {"8000", "9359"}


def entry_command() -> list[str]:
    """ENTRYPOINT + CMD of the runtime stage, as the container runs them (exec form)."""
    runtime = dockerfile_stages()[-1]
    return json.loads(last(runtime, "ENTRYPOINT")) + json.loads(last(runtime, "CMD") or "[]")


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's CMD in exec form."""
    health = last(dockerfile_stages()[-1], "HEALTHCHECK")
    return json.loads(health[health.index("CMD") + 3:].strip())


def test_the_entry_command_parses_and_leaves_workers_to_the_cpu_default():
    argv = entry_command()
    assert argv[0] == "balancer"
    config = parse_config(argv[1:])
    assert "--workers" not in argv and config.workers == cpus.available_cpus()
    assert [str(b) for b in config.binds] == ["0.0.0.0:8000"] and config.metrics_bind == "0.0.0.0:9359"
    assert config.shutdown_delay > 0


# ---- Kubernetes manifests -----------------------------------------------------------------------------------

def manifests() -> dict[str, dict]:
    """Every document of deploy/kubernetes/*.yaml by kind."""
    out = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in out, f"two {doc['kind']}s"
                out[doc["kind"]] = doc
    return out


def test_manifests_validate_against_a_pinned_kubernetes():
    import kubernetes_validate  # the dev extra installs it; missing, this test fails rather than skips
    docs = manifests()
    assert set(docs) == {"Deployment", "Service", "PodDisruptionBudget", "PodMonitor"}
    for kind, doc in docs.items():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # A CRD of the Prometheus Operator: kubernetes-validate has only the built-in schemas.
            # test_podmonitor_selects_the_pods_metrics_port checks it instead.
            continue
        # strict: an unknown or misspelt field fails, as `kubectl apply --validate=strict` would
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def container(docs: dict) -> dict:
    """The balancer container of the Deployment."""
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def test_deployment_probes_ports_and_security():
    docs = manifests()
    pod = docs["Deployment"]["spec"]["template"]
    c = container(docs)
    config = parse_config(c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": config.binds[0].port, "metrics": int(config.metrics_bind.rsplit(":", 1)[1])}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
    assert int(notes["prometheus.io/port"]) == ports["metrics"]
    # the Service and the PodDisruptionBudget select these pods; traffic goes to the http port only
    labels = pod["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        spec = docs[kind]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    assert [p["targetPort"] for p in docs["Service"]["spec"]["ports"]] == ["http"]
    # non-root, nothing written outside the emptyDir that $TMPDIR (the control socket's home) points at
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    sec = c["securityContext"]
    assert sec["allowPrivilegeEscalation"] is False and sec["readOnlyRootFilesystem"] is True
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts[env["TMPDIR"]]]


# How long the master's shutdown may run past --graceful-timeout: SIGKILL grace for workers that outlive it and
# the supervisor's own bound on the whole drain (supervisor.py: graceful_timeout + 2 * KILL_GRACE + 1).
GRACE_MARGIN = 2 * KILL_GRACE + 1


def test_termination_grace_covers_shutdown_delay_and_drain():
    docs = manifests()
    config = parse_config(container(docs)["args"])
    grace = docs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert config.shutdown_delay > 0, "endpoints leave load balancers asynchronously: keep serving a while"
    assert grace >= config.graceful_timeout + config.shutdown_delay + GRACE_MARGIN


def test_the_cpu_limit_sets_the_worker_count(tmp_path, monkeypatch):
    c = container(manifests())
    assert "--workers" not in c["args"], "the worker count follows the CPU limit"
    limit, request = (c["resources"][k]["cpu"] for k in ("limits", "requests"))
    assert limit == request, "Guaranteed QoS: no throttling below the request"
    millicores = int(limit[:-1]) if limit.endswith("m") else int(float(limit) * 1000)
    # What the kubelet writes into the container's cgroup for this limit (period 100 ms).
    root, proc = fake_cgroup(tmp_path, {"cgroup.controllers": "cpu", "cpu.max": f"{millicores * 100} 100000"})
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 64)  # a big node
    assert cpus.available_cpus(root, proc) == math.ceil(millicores / 1000)


def test_podmonitor_selects_the_pods_metrics_port():
    docs = manifests()
    monitor = docs["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["name"]
    # the CRD's required fields: spec.selector and spec.podMetricsEndpoints, each endpoint naming a port
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        docs["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert set(monitor["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel",
                                    "podTargetLabels", "sampleLimit"}
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings",
                             "metricRelabelings", "honorLabels"}


def test_prometheus_kubernetes_config_reads_the_deployments_annotations():
    config = yaml.safe_load((DEPLOY / "prometheus-kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    pod = manifests()["Deployment"]["spec"]["template"]["metadata"]
    # Prometheus exposes each annotation and label as a meta label: non-alphanumerics become "_".
    meta = {"__meta_kubernetes_pod_annotation_" + re.sub(r"\W", "_", k): v for k, v in pod["annotations"].items()}
    meta |= {"__meta_kubernetes_pod_label_" + re.sub(r"\W", "_", k): v for k, v in pod["labels"].items()}
    meta |= {"__address__": "10.1.2.3:8000", "__meta_kubernetes_pod_name": "balancer-abc",
             "__meta_kubernetes_namespace": "default", "__metrics_path__": "/metrics"}
    for rule in job["relabel_configs"]:  # Prometheus' relabelling, the two actions used here
        value = ";".join(meta.get(label, "") for label in rule["source_labels"])
        m = re.fullmatch(rule.get("regex", "(.*)"), value)
        if rule.get("action", "replace") == "keep":
            assert m, f"{rule} drops the balancer pod"
        elif m:
            meta[rule["target_label"]] = m.expand(rule.get("replacement", "$1").replace("$", "\\"))
    assert meta["__address__"] == "10.1.2.3:9359" and meta["__metrics_path__"] == "/metrics"
    assert meta["instance"] == "balancer-abc"


# ---- docker-compose -----------------------------------------------------------------------------------------

def test_compose_parses_and_its_files_exist():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"balancer", "prometheus", "grafana"}
    build = services["balancer"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
    assert services["balancer"]["command"] == entry_command()[1:], "the image's CMD, so the two cannot drift"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    mounted = {Path(v.split(":")[1]): (DEPLOY / v.split(":")[0]).resolve() for v in services["grafana"]["volumes"]}
    assert (ROOT / "grafana" / "balancer-dashboard.json").resolve() in mounted.values()
    # the dashboard goes where the dashboards provider looks for it
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/balancer.yml").read_text())["providers"][0]
    dashboard_at = next(target for target, source in mounted.items() if source.suffix == ".json")
    assert dashboard_at.parent == Path(provider["options"]["path"])
    # Prometheus scrapes the balancer service's metrics port; Grafana asks that Prometheus
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"balancer:{parse_config(services['balancer']['command']).metrics_bind.rsplit(':', 1)[1]}"]
    datasource = yaml.safe_load((DEPLOY / "grafana-datasource.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]


def test_compose_prometheus_config_passes_promtool_with_the_alert_rules(tmp_path):
    assert shutil.which("promtool"), "promtool is missing: apt-get install prometheus (tests/run.sh does)"
    # Laid out as compose mounts them: the config and grafana/alerts.yml side by side in /etc/prometheus.
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    mounts = dict(reversed(v.split(":")[:2]) for v in services["prometheus"]["volumes"])
    for target, source in mounts.items():
        shutil.copy(DEPLOY / source, tmp_path / Path(target).name)
    prometheus = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["alerts.yml"] and (tmp_path / "alerts.yml").exists()
    proc = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0 and "SUCCESS: 5 rules found" in proc.stdout, proc.stdout + proc.stderr


# ---- the container's entry command, run outside a container ---------------------------------------------------

class Running:
    """A process started in its own session, its output collected line by line."""

    def __init__(self, argv: list[str], env: dict, cwd: Path) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=cwd, start_new_session=True)
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match:
        """The first log line matching pattern (AssertionError with the log after timeout)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    if m := re.search(pattern, line):
                        return m
                left = deadline - time.monotonic()
                assert left > 0 and self.proc.poll() is None, f"no {pattern!r}; log:\n" + "\n".join(self.lines)
                self.cond.wait(min(left, 0.5))

    def kill(self) -> None:
        """SIGKILL the session this test started, by its id."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)


def get(url: str) -> tuple[int, str]:
    """Status and body of one GET."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def installed_balancer() -> list[str]:
    """The `balancer` console script of this interpreter (what `pip install` puts on the image's PATH)."""
    script = Path(sys.executable).parent / "balancer"
    return [str(script)] if script.exists() else [sys.executable, "-m", "balancer"]


def container_env(tmp_path: Path) -> dict:
    """This environment plus the image's ENV lines, with TMPDIR (the emptyDir) under tmp_path."""
    env = dict(os.environ)
    env.pop("XDG_RUNTIME_DIR", None)  # not set in the image: the control socket goes under $TMPDIR
    for rest in (rest for w, rest in dockerfile_stages()[-1] if w == "ENV"):
        env.update(pair.split("=", 1) for pair in shlex.split(rest))
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    return env


def test_the_container_entry_command_serves_reports_health_and_stops_on_sigterm(tmp_path):
    # TEST ONLY: the image binds 0.0.0.0 on fixed ports; here the same command binds 127.0.0.1 port 0, so the
    # test stays on loopback and never collides with another test. Nothing else in the command changes.
    argv = [re.sub(r"^0\.0\.0\.0:\d+$", "127.0.0.1:0", arg) for arg in entry_command()]
    assert argv != entry_command(), "the binds were rewritten"
    argv = installed_balancer() + argv[1:]
    config = parse_config(argv[len(installed_balancer()):])
    run = Running(argv, container_env(tmp_path), cwd=tmp_path)  # cwd: the image's WORKDIR, the app dir
    try:
        metrics = run.wait_for(r"metrics on http://(\S+)/metrics").group(1)
        address = run.wait_for(r"workers serving on (\S+?)[, ]").group(1)
        assert get(f"http://{metrics}/healthz")[0] == 200
        assert get(f"http://{metrics}/readyz")[0] == 200
        status, body = get(f"http://{address}/")
        assert status == 200 and body.startswith("Hello from balancer worker")
        # The image's HEALTHCHECK, pointed at this instance's metrics port (the only change), succeeds.
        health = [sys.executable if w == "python" else w.replace("127.0.0.1:9359", metrics)
                  for w in healthcheck_command()]
        assert subprocess.run(health, capture_output=True, timeout=10).returncode == 0
        # the control socket went to $TMPDIR, the writable emptyDir of a read-only root filesystem
        assert any(p.is_socket() for p in (tmp_path / "tmp" / f"balancer-{os.getuid()}").iterdir())

        run.proc.send_signal(signal.SIGTERM)
        # The shutdown delay: not ready at once, still serving, so late-routed clients are answered.
        deadline = time.monotonic() + 5
        while get(f"http://{metrics}/readyz")[0] != 503:
            assert time.monotonic() < deadline, "/readyz stayed 200 after SIGTERM"
        assert get(f"http://{address}/")[0] == 200
        assert run.proc.wait(config.shutdown_delay + config.graceful_timeout + 5) == 0
        # ... and the HEALTHCHECK fails once nothing answers, so it is not a check that always passes.
        assert subprocess.run(health, capture_output=True, timeout=10).returncode != 0
    finally:
        run.kill()
