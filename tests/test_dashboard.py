"""The Grafana dashboard across hosts: the linter's conventions, and every query run by a real Prometheus that
scrapes two real balancers under load and loads the alert rules."""

from __future__ import annotations

import copy
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

from tests.dashboard_lint import (annotation_queries, by_lists, lint, lint_expr, metric_names, panel_targets,
                                  panels)
from tests.harness import Balancer
from tests.test_alerts import RULES, WANTED, alert_rules
from tests.test_metrics import Load, http_get, samples, slot_pid, wait_until

pytestmark = pytest.mark.timeout(100)
GRAFANA = Path(__file__).parent.parent / "grafana"
DASHBOARD = GRAFANA / "balancer-dashboard.json"
SCRAPE_INTERVAL = "1s"
# What Grafana puts in for its own variables: $__rate_interval is at least four scrape intervals.
BUILTINS = {"__rate_interval": "4s", "__interval": "1s", "__range": "1m"}


def dashboard() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace $name and ${name} as Grafana does, longest names first."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in expr, f"unresolved variable in {expr}"
    return expr


def test_expression_parsing():
    expr = ('histogram_quantile(0.95, sum by (worker, le) (rate(a_bucket{x=~"$y"}[4s]))) '
            '/ ignoring(worker) group_left sum(b_total) or c * 1e3 + time() - vector(0)')
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert by_lists(expr) == [{"worker", "le"}]
    assert sorted(lint_expr(expr)) == sorted(["target-rate-interval-rule", "target-counter-agg-rule",
                                              "per-instance-rule: a per-worker sum merges hosts"]
                                             + ["target-job-rule", "target-instance-rule"] * 3)


def test_dashboard_follows_the_linter_conventions():
    assert lint(dashboard()) == []


def _target(dash: dict, title: str) -> dict:
    return next(p for p in panels(dash) if p["title"] == title)["targets"][0]


def _variable(dash: dict, name: str) -> dict:
    return next(v for v in dash["templating"]["list"] if v["name"] == name)


BREAKS = {  # a change to the dashboard -> the rule that must catch it
    "template-datasource-rule": lambda d: _variable(d, "datasource").update(name="DS_PROMETHEUS"),
    "template-job-rule": lambda d: _variable(d, "job").update(multi=False),
    "template-instance-rule": lambda d: _variable(d, "instance").pop("allValue"),
    "template-on-time-change-reload": lambda d: _variable(d, "worker").update(refresh=1),
    "panel-datasource-rule": lambda d: panels(d)[0].update(datasource={"type": "prometheus", "uid": "prometheus"}),
    "panel-title-description-rule": lambda d: panels(d)[1].update(description=""),
    "panel-units-rule": lambda d: panels(d)[2]["fieldConfig"]["defaults"].pop("unit"),
    "target-rate-interval-rule": lambda d: _target(d, "Requests/s per worker").update(
        expr=_target(d, "Requests/s per worker")["expr"].replace("$__rate_interval", "5m")),
    "target-instance-rule": lambda d: _target(d, "Open fds per worker").update(
        expr=_target(d, "Open fds per worker")["expr"].replace(',instance=~"$instance"', "")),
    "target-counter-agg-rule": lambda d: _target(d, "Worker restarts").update(
        expr='sum by (instance, worker) (balancer_worker_restarts_total{job=~"$job",instance=~"$instance"})'),
    "per-instance-rule": lambda d: _target(d, "Requests/s per worker").update(
        expr=_target(d, "Requests/s per worker")["expr"].replace("by (instance, worker)", "by (worker)")),
    "legend-instance-rule": lambda d: _target(d, "Open fds per worker").update(legendFormat="worker {{worker}}"),
    "fleet-total-rule": lambda d: panels(d)[2].update(title="Requests/s"),
}


@pytest.mark.parametrize("rule", sorted(BREAKS))
def test_the_lint_checker_catches_each_breach(rule):
    dash = copy.deepcopy(dashboard())
    BREAKS[rule](dash)
    assert any(c.startswith(rule) for c in lint(dash)), f"{rule} not caught: {lint(dash)}"


def test_import_and_provisioning_agree_on_the_datasource_and_show_fleet_health():
    dash = dashboard()
    assert "DS_PROMETHEUS" not in DASHBOARD.read_text() and "__inputs" not in dash and dash["id"] is None
    assert dash["uid"] and len({p["id"] for p in panels(dash)}) == len(panels(dash))
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    current = _variable(dash, "datasource")["current"]
    assert (ds["type"], ds["uid"], ds["name"]) == ("prometheus", current["value"], current["text"])
    prov = yaml.safe_load((GRAFANA / "provisioning/dashboards/balancer.yml").read_text())
    assert prov["apiVersion"] == 1 and prov["providers"][0]["type"] == "file" and prov["providers"][0]["options"]["path"]
    titles = " | ".join(p["title"].lower() for p in panels(dash))
    for wanted in ("requests/s per worker", "p50 / p95 / p99", "error rate", "open connections per worker",
                   "share of dispatched", "restarts", "cpu per worker", "memory per worker", "backpressure",
                   "scrape health", "workers up / desired"):
        assert wanted in titles, wanted
    # Red below desired: up / desired per instance, red under 1.
    up = next(p for p in panels(dash) if p["title"].startswith("Workers up / desired"))
    assert re.fullmatch(r"sum by \(instance\) \(balancer_worker_up\{.*\}\) / sum by \(instance\) "
                        r"\(balancer_workers_desired\{.*\}\)", up["targets"][0]["expr"])
    steps = up["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [(s["color"], s["value"]) for s in steps] == [("red", None), ("green", 1)]
    scrape = next(p for p in panels(dash) if p["title"].startswith("Scrape health"))
    assert re.fullmatch(r'up\{job=~"\$job",instance=~"\$instance"\}', scrape["targets"][0]["expr"])
    notes = annotation_queries(dash)
    assert set(notes) == {"Reloads", "Restarts"}
    assert 'reason="reload"' in notes["Reloads"] and 'reason!="reload"' in notes["Restarts"]


# ---- a real Prometheus ----------------------------------------------------------------------------

class Prometheus:
    """A Prometheus server on a free loopback port with its own storage, scraping its targets every second."""

    def __init__(self, tmp: Path, targets: list[str], rule_files: list[Path]) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: apt-get install prometheus (tests/run.sh does)"
        config = {"global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                             "evaluation_interval": SCRAPE_INTERVAL},
                  "rule_files": [str(f) for f in rule_files],
                  "scrape_configs": [{"job_name": "balancer", "static_configs": [{"targets": targets}]}]}
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

    def api(self, path: str, **params) -> dict | list:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)
        status, _, body = http_get(url, timeout=10)
        reply = json.loads(body)
        assert status == 200 and reply["status"] == "success", f"{url}: {body}"
        return reply["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def recent(self, expr: str, seconds: float = 60) -> list:
        """expr evaluated every second over the last seconds, as Grafana runs an annotation query."""
        now = time.time()
        return self.api("query_range", query=expr, start=now - seconds, end=now, step=1)["result"]

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
def fleet(tmp_path):
    """Two balancers (booting side by side) scraped as two targets of one job, with the alert rules loaded."""
    balancers, prom = [], None
    try:
        for _ in range(2):
            balancers.append(Balancer("--workers", "2", "--backend", "testapp:create_app", ready=False))
        for b in balancers:
            b.wait_ready()
        prom = Prometheus(tmp_path, [b.metrics_address for b in balancers], [RULES])
        yield prom, balancers
    finally:
        if prom is not None:
            prom.stop()
        for b in balancers:
            b.stop()


def resolve_variables(prom: Prometheus, dash: dict) -> dict[str, str]:
    """Grafana's values for the dashboard's variables: label_values() asked of Prometheus, multi as (a|b)."""
    values = dict(BUILTINS)
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


def missing_instances(query: tuple[str, str, str], result: list, instances: set[str]) -> str | None:
    """What a panel's series still lack (None when each instance has its own); fails on series merged across hosts."""
    title, expr, legend = query
    if not result:
        return "no data"
    labels = [s["metric"] for s in result]
    if any("worker" in m for m in labels):
        assert all("instance" in m for m in labels), f"{title!r}: per-worker series without an instance: {labels}"
    if not any("instance" in m for m in labels):
        assert "fleet" in title.lower(), f"{title!r}: series summed over instances in a panel not titled fleet"
        return None
    assert "{{instance}}" in legend, f"{title!r}: legend {legend!r} does not show the instance"
    found = {m.get("instance") for m in labels}
    return None if found == instances else f"instances {sorted(found)}, want {sorted(instances)}"


def test_every_query_keeps_instances_apart_and_the_alert_rules_load(fleet):
    prom, (a, b) = fleet
    instances = {a.metrics_address, b.metrics_address}
    dash = dashboard()
    targets, notes, rules = panel_targets(dash), annotation_queries(dash), alert_rules()
    assert len(targets) >= 15
    # 500s and naps over 1 s on every worker, so the 5xx and p99 alerts have something to match
    paths = ["/", "/nap?s=0.01", "/crash", "/missing", "/nap?s=1.1", "/"]
    with Load(a.url, paths, clients=4, max_seconds=60) as load_a, Load(b.url, paths, clients=4, max_seconds=60):
        text = wait_until(lambda: _with(http_get(f"http://{a.metrics_address}/metrics")[2], 'code="500"'), 10,
                          "requests in /metrics")
        exported = {name for name, _ in samples(text)} | {"up"}  # up is Prometheus' own
        used = [(t, e) for t, e, _ in targets] + list(notes.items()) + [(r["alert"], r["expr"]) for r in rules]
        for title, expr in used:
            unknown = metric_names(expr) - exported
            assert not unknown, f"{title!r} uses {sorted(unknown)}, which /metrics does not export"

        wait_until(lambda: {r["metric"]["instance"]: r["value"][1] for r in prom.query(
            'sum by (instance) (balancer_worker_up{job="balancer"})')} == dict.fromkeys(instances, "2"), 20,
            "Prometheus to scrape both instances' workers up", step=0.2)
        values = wait_until(lambda: _try(resolve_variables, prom, dash), 20, "the dashboard variables", step=0.2)
        queries = {(title, substitute(expr, values), legend) for title, expr, legend in targets}
        problems, deadline = {}, time.monotonic() + 30
        while queries and time.monotonic() < deadline:
            problems = {q: missing_instances(q, prom.query(q[1]), instances) for q in queries}
            queries = {q for q, problem in problems.items() if problem}
            if queries:
                time.sleep(0.2)  # poll interval; the deadline above bounds the wait
        assert not queries, f"panels not per instance: {[(q, problems[q]) for q in queries]}; {prom.target_errors()}"

        # The rules load and evaluate; the 5xx and p99 alerts go pending per instance and worker.
        def rules_evaluated():
            got = {r["name"]: r for g in prom.api("rules", type="alert")["groups"] for r in g["rules"]}
            return got if set(got) == WANTED and all(r["health"] == "ok" for r in got.values()) else None
        wait_until(rules_evaluated, 20, "the alert rules to load and evaluate", step=0.2)

        def pending(name):
            alerts = [x["labels"] for x in prom.api("alerts")["alerts"] if x["labels"]["alertname"] == name]
            return alerts if {x.get("instance") for x in alerts} == instances else None
        for name in ("BalancerHigh5xxRatio", "BalancerHighP99Latency"):
            alerts = wait_until(lambda: pending(name), 20, f"{name} pending on both instances", step=0.2)
            assert all(x["worker"] in ("0", "1") and x["severity"] for x in alerts), alerts

        # kill -9 one worker of a, reload b: each annotation marks only the instance it happened on,
        # and Prometheus sees no counter reset for a's slot 0.
        crash = f'balancer_worker_restarts_total{{instance="{a.metrics_address}",worker="0",reason="crash"}}'
        requests = f'sum(balancer_worker_requests_total{{instance="{a.metrics_address}",worker="0"}})'
        assert prom.scalar(crash) == 0
        before = prom.scalar(requests)
        mark_a, mark_b = a.mark(), b.mark()
        os.kill(slot_pid(a, "0"), signal.SIGKILL)
        b.signal(signal.SIGHUP)
        a.wait_for(r"worker slot=0 pid=\d+ ready", 20, start=mark_a)
        b.wait_for("rolling reload done", 30, start=mark_b)
        restarts = wait_until(lambda: prom.recent(substitute(notes["Restarts"], values)), 20, "a restart annotation",
                              step=0.2)
        assert [(s["metric"]["instance"], s["metric"]["worker"], s["metric"]["reason"]) for s in restarts] == [
            (a.metrics_address, "0", "crash")]
        reloads = wait_until(lambda: prom.recent(substitute(notes["Reloads"], values)), 20, "a reload annotation",
                             step=0.2)
        assert [s["metric"] for s in reloads] == [{"instance": b.metrics_address}]
        wait_until(lambda: (prom.scalar(requests) or 0) > before and prom.scalar(crash) == 1, 20,
                   "Prometheus to see a's slot 0 counting again and the crash", step=0.2)
    assert load_a.statuses[200] and load_a.statuses[500] and load_a.statuses[404]
    resets = []
    for metric in ("balancer_worker_requests_total", "balancer_worker_connections_dispatched_total",
                   "balancer_worker_request_duration_seconds_count"):
        resets += prom.query(f'resets({metric}{{instance="{a.metrics_address}",worker="0"}}[1m]) > 0')
    assert not resets, f"counters of a's slot 0 went back: {resets}"


def _try(fn, *args):
    """fn(*args), or None while it still fails an assertion (data not scraped yet)."""
    try:
        return fn(*args)
    except AssertionError:
        return None


def _with(text: str, needle: str) -> str | None:
    """text if it contains needle."""
    return text if needle in text else None
