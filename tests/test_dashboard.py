"""The Grafana dashboard, proven against a real Prometheus server scraping a real balancer under load."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

from tests.harness import Balancer
from tests.test_metrics import Load, http_get, samples, slot_pid, wait_until

pytestmark = pytest.mark.timeout(100)
GRAFANA = Path(__file__).parent.parent / "grafana"
DASHBOARD = GRAFANA / "balancer-dashboard.json"
SCRAPE_INTERVAL = "1s"
# What Grafana puts in for its own variables: $__rate_interval is at least four scrape intervals.
BUILTINS = {"__rate_interval": "4s", "__interval": "1s", "__range": "1m"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def dashboard() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def panel_exprs(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expression) of every query target in every panel, rows included."""
    out = []
    for panel in dash["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            out.extend((inner["title"], t["expr"]) for t in inner.get("targets", []))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords or label names."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # label matchers and range windows
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        if m.group() not in PROMQL_WORDS and not expr[m.end():].lstrip().startswith("("):
            names.add(m.group())
    return names


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace $name and ${name} as Grafana does, longest names first."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in expr, f"unresolved variable in {expr}"
    return expr


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (worker, le) (rate(a_bucket{x=~"$y"}[4s]))) '
            '/ ignoring(worker) group_left sum(b_total) or c * 1e3 + time() - vector(0)')
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def test_dashboard_is_import_ready_and_provisioning_parses():
    dash = dashboard()
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    assert dash["__inputs"][0]["pluginId"] == "prometheus" and dash["id"] is None and dash["uid"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"  # lets file provisioning resolve it too
    for panel in dash["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for ref in [inner.get("datasource"), *(t.get("datasource") for t in inner.get("targets", []))]:
                if ref is not None:
                    assert ref == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, inner["title"]
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for wanted in ("requests/s per worker", "p50 / p95 / p99", "error rate", "open connections per worker",
                   "share of dispatched", "restarts", "cpu per worker", "memory per worker", "backpressure"):
        assert wanted in titles, wanted
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((GRAFANA / "provisioning/dashboards/balancer.yml").read_text())
    assert prov["providers"][0]["type"] == "file" and prov["providers"][0]["options"]["path"]
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (tests/run.sh does)"
    check = subprocess.run([promtool, "check", "config", str(GRAFANA / "prometheus.yml")], capture_output=True,
                           text=True, timeout=20)
    assert check.returncode == 0, check.stdout + check.stderr


# ---- a real Prometheus ----------------------------------------------------------------------------

class Prometheus:
    """A Prometheus server on a free loopback port with its own storage, scraping one target every second."""

    def __init__(self, tmp: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: apt-get install prometheus (tests/run.sh does)"
        config = {"global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                             "evaluation_interval": SCRAPE_INTERVAL},
                  "scrape_configs": [{"job_name": "balancer", "static_configs": [{"targets": [target]}]}]}
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc = None
        for _ in range(3):  # the free port we found may be taken before Prometheus binds it
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            self.log = open(tmp / "prometheus.log", "w+")
            self.proc = subprocess.Popen(
                [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp)
            if self._wait_ready():
                return
            self.stop()
        raise AssertionError("prometheus did not start:\n" + self.output())

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if http_get(f"http://127.0.0.1:{self.port}/-/ready", timeout=1)[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)
        status, _, body = http_get(url, timeout=10)
        reply = json.loads(body)
        assert status == 200 and reply["status"] == "success", f"{url}: {body}"
        return reply["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def target_errors(self) -> str:
        return "; ".join(f"{t['health']} {t['lastError']}" for t in self.api("targets")["activeTargets"])

    def stop(self) -> None:
        """Our own child, by its pid: TERM, then KILL if it lingers."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def prom_and_balancer(tmp_path):
    b = Balancer("--workers", "2", "--backend", "testapp:create_app")
    prom = None
    try:
        prom = Prometheus(tmp_path, b.metrics_address)
        yield prom, b
    finally:
        if prom is not None:
            prom.stop()
        b.stop()


def resolve_variables(prom: Prometheus, dash: dict) -> dict[str, str]:
    """Grafana's values for the dashboard's variables: label_values() asked of Prometheus, multi as (a|b)."""
    values = dict(BUILTINS, DS_PROMETHEUS="prometheus")
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", substitute(query, values))
        assert m, f"variable {var['name']}: unsupported query {query}"
        series = prom.api("series", **{"match[]": m.group(1)})
        found = sorted({s[m.group(2)] for s in series if m.group(2) in s})
        assert found, f"variable {var['name']}: {query} has no values"
        # Grafana regex-escapes each value, then doubles the backslashes for the PromQL string literal.
        escaped = [re.escape(v).replace("\\", "\\\\") for v in found]
        values[var["name"]] = "(" + "|".join(escaped) + ")" if var.get("multi") else found[0]
    return values


def test_every_panel_returns_data_and_kill_9_keeps_counters(prom_and_balancer):
    prom, b = prom_and_balancer
    dash = dashboard()
    exprs = panel_exprs(dash)
    assert len(exprs) >= 12
    with Load(b.url, ["/", "/nap?s=0.01", "/", "/crash", "/missing"], clients=8, max_seconds=60) as load:
        # Request series exist once the workers' first heartbeats carry requests.
        text = wait_until(lambda: _with(http_get(f"http://{b.metrics_address}/metrics")[2], 'code="500"'), 10,
                          "requests in /metrics")
        exported = {name for name, _ in samples(text)}
        for title, expr in exprs:
            unknown = metric_names(expr) - exported
            assert not unknown, f"panel {title!r} uses {sorted(unknown)}, which /metrics does not export"
        wait_until(lambda: prom.scalar('sum(balancer_worker_up{job="balancer"})') == 2, 20,
                   "Prometheus to scrape both workers up", step=0.2)
        values = wait_until(lambda: _try(resolve_variables, prom, dash), 20, "the dashboard variables", step=0.2)
        pending = {(title, substitute(expr, values)) for title, expr in exprs}
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            pending = {(t, e) for t, e in pending if not prom.query(e)}
            if pending:
                time.sleep(0.2)  # poll interval; the deadline above bounds the wait
        assert not pending, f"panels without data: {sorted(pending)}; target: {prom.target_errors()}"

        # kill -9 one worker under load: Prometheus sees no counter reset for its slot, and one crash
        crash = 'balancer_worker_restarts_total{worker="0",reason="crash"}'
        requests = 'sum(balancer_worker_requests_total{worker="0"})'
        assert prom.scalar(crash) == 0
        before = prom.scalar(requests)
        mark = b.mark()
        os.kill(slot_pid(b, "0"), signal.SIGKILL)
        b.wait_for(r"worker slot=0 pid=\d+ ready", 20, start=mark)
        wait_until(lambda: (prom.scalar(requests) or 0) > before and prom.scalar(crash) == 1, 20,
                   "Prometheus to see slot 0 counting again and the crash", step=0.2)
    assert load.statuses[200] and load.statuses[500] and load.statuses[404]
    assert prom.scalar(f"increase({crash}[1m])") > 0
    resets = prom.query('resets(balancer_worker_requests_total{worker="0"}[1m]) > 0')
    resets += prom.query('resets(balancer_worker_connections_dispatched_total{worker="0"}[1m]) > 0')
    resets += prom.query('resets(balancer_worker_request_duration_seconds_count{worker="0"}[1m]) > 0')
    assert not resets, f"counters of slot 0 went back: {resets}"


def _try(fn, *args):
    """fn(*args), or None while it still fails an assertion (data not scraped yet)."""
    try:
        return fn(*args)
    except AssertionError:
        return None


def _with(text: str, needle: str) -> str | None:
    """text if it contains needle."""
    return text if needle in text else None
