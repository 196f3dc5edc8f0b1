"""The Prometheus alert rules in grafana/alerts.yml: promtool checks them and runs their unit tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(60)
GRAFANA = Path(__file__).parent.parent / "grafana"
RULES = GRAFANA / "alerts.yml"
UNIT_TESTS = GRAFANA / "alerts_test.yml"
WANTED = {"BalancerWorkersBelowDesired", "BalancerWorkerCrashLooping", "BalancerAcceptPausedLong",
          "BalancerHigh5xxRatio", "BalancerHighP99Latency"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    """promtool ARGS, its output as text."""
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: apt-get install prometheus (tests/run.sh does)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=30)


def alert_rules(path: Path = RULES) -> list[dict]:
    """Every alerting rule of a rule file, all groups."""
    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def unit_cases() -> list[dict]:
    """Every alert_rule_test of alerts_test.yml."""
    return [case for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]


def test_promtool_checks_the_rules_and_the_example_config_loads_them():
    check = promtool("check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(WANTED)} rules found" in check.stdout, check.stdout
    assert {r["alert"] for r in alert_rules()} == WANTED
    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    assert "alerts.yml" in config["rule_files"]
    check = promtool("check", "config", str(GRAFANA / "prometheus.yml"))
    assert check.returncode == 0 and "5 rules found" in check.stdout, check.stdout + check.stderr


def test_promtool_unit_tests_pass():
    run = promtool("test", "rules", str(UNIT_TESTS))
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr


def test_every_alert_has_firing_and_quiet_unit_tests_and_names_its_instance_and_worker():
    cases = unit_cases()
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule.get("for"), f"{name}: an alert without 'for' pages on one bad evaluation"
        notes = rule["annotations"]
        assert set(notes) >= {"summary", "description"}, name
        mine = [c for c in cases if c["alertname"] == name]
        firing = [a for c in mine for a in c["exp_alerts"]]
        assert firing, f"{name}: no unit test shows it firing"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no unit test shows it quiet"
        # The labels a firing alert carries are what its text must name.
        for label in ("instance", "worker"):
            if any(label in a["exp_labels"] for a in firing):
                for key in ("summary", "description"):
                    assert f"$labels.{label}" in notes[key], f"{name}: {key} does not name the {label}"
        assert all("instance" in a["exp_labels"] for a in firing), f"{name}: fires without an instance"


# A rule that fires on every input, or at once, must fail its unit tests: they are not vacuous.
MUTATIONS = {
    "fires on anything": lambda rule: {**rule, "expr": re.sub(r">\s*[\d.]+\s*$", "> -1", rule["expr"].rstrip())},
    "fires at once": lambda rule: {**rule, "for": "0m"},
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
@pytest.mark.parametrize("alert", sorted(WANTED))
def test_unit_tests_catch_a_broken_rule(tmp_path, alert, mutation):
    doc = yaml.safe_load(RULES.read_text())
    changed = 0
    for group in doc["groups"]:
        for i, rule in enumerate(group["rules"]):
            if rule.get("alert") == alert:
                group["rules"][i] = MUTATIONS[mutation](rule)
                changed += group["rules"][i] != rule
    assert changed == 1, f"{alert}: the mutation {mutation!r} changed nothing"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc))
    shutil.copy(UNIT_TESTS, tmp_path / "alerts_test.yml")
    run = promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert run.returncode != 0, f"{alert} {mutation}: the unit tests still pass\n{run.stdout}"
