"""Grafana's dashboard-linter rules, checked in Python (the linter's Go binary is not packaged), and the
expression helpers they need; tests/test_dashboard.py holds the dashboard to them."""

from __future__ import annotations

import re

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}
DS_UIDS = ("$datasource", "${datasource}")
# The units the dashboard-linter's panel-units-rule knows, of those a dashboard like this one would use.
UNITS = {"none", "short", "percent", "percentunit", "bytes", "decbytes", "s", "ms", "dtdurations", "reqps", "rps",
         "ops", "cps", "iops", "Bps", "bps"}
QUERY_PANELS = {"stat", "singlestat", "graph", "table", "timeseries", "gauge"}


def panels(dash: dict) -> list[dict]:
    """Every panel that is not a row, rows' own panels included."""
    return [inner for panel in dash["panels"] for inner in [panel, *panel.get("panels", [])]
            if inner["type"] != "row"]


def panel_targets(dash: dict) -> list[tuple[str, str, str]]:
    """(panel title, expression, legend) of every query target."""
    return [(p["title"], t["expr"], t.get("legendFormat", "")) for p in panels(dash) for t in p.get("targets", [])]


def annotation_queries(dash: dict) -> dict[str, str]:
    """{name: expression} of the dashboard's Prometheus annotations."""
    return {a["name"]: a["expr"] for a in dash["annotations"]["list"] if "expr" in a}


def _blank(m: re.Match) -> str:
    """As many spaces as the match is long."""
    return " " * len(m.group())


def _masked(expr: str) -> str:
    """expr with strings, label matchers, ranges and label lists blanked out, positions kept."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', _blank, expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", _blank, expr)
    return re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", _blank, expr)


def selectors(expr: str) -> list[tuple[str, str, int, int]]:
    """(metric name, its label matchers, start, end) of every series selector in an expression."""
    masked, out = _masked(expr), []
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", masked):
        if m.group() in PROMQL_WORDS or masked[m.end():].lstrip().startswith("("):
            continue  # a keyword or a function
        matchers = re.match(r"\s*(\{[^}]*\})?", expr[m.end():])
        out.append((m.group(), matchers.group(1) or "", m.start(), m.end() + matchers.end()))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects."""
    return {name for name, *_ in selectors(expr)}


def by_lists(expr: str) -> list[set[str]]:
    """The label sets of every by (...) clause."""
    return [{label.strip() for label in m.group(1).split(",")} for m in re.finditer(r"\bby\s*\(([^)]*)\)", expr)]


def lint(dash: dict) -> list[str]:
    """'rule: complaint' for each breach of the dashboard-linter rules, and of this dashboard's per-instance rules."""
    out = []
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds_vars = [v for v in variables.values() if v["type"] == "datasource"]
    if [(v["name"], v.get("label"), v["query"]) for v in ds_vars] != [("datasource", "Data source", "prometheus")]:
        out.append("template-datasource-rule: want one datasource variable 'datasource', 'Data source', prometheus")
    for name in ("job", "instance"):
        v = variables.get(name, {})
        if ((v.get("datasource") or {}).get("uid") not in DS_UIDS or v.get("type") != "query"
                or v.get("label") != name.title() or not v.get("multi") or v.get("allValue") != ".+"):
            out.append(f"template-{name}-rule: {name} must be a multi query on $datasource, allValue '.+'")
    exprs = [e for _, e, _ in panel_targets(dash)]
    for v in variables.values():
        if v["type"] != "query":
            continue
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        if not re.fullmatch(r"(label_names|label_values|metrics|query_result)\((.+)\)", query):
            out.append(f"template-label-promql-rule: {v['name']}: {query}")
        if v.get("refresh") != 2:
            out.append(f"template-on-time-change-reload: {v['name']} refresh is {v.get('refresh')}, not 2")
        if (v["datasource"] or {}).get("uid") not in DS_UIDS:
            out.append(f"template-datasource-rule: variable {v['name']} does not use $datasource")
        if not any(re.search(r"\$\{?" + v["name"] + r"\b", e) for e in exprs):
            out.append(f"template-unused-rule: {v['name']}")
    for p in panels(dash):
        where = f"panel {p['title']!r}"
        if p["type"] not in QUERY_PANELS:
            continue
        refs = [p.get("datasource"), *(t.get("datasource") for t in p.get("targets", []))]
        if any((ref or {}).get("uid") not in DS_UIDS for ref in refs):
            out.append(f"panel-datasource-rule: {where} does not use $datasource")
        if not p.get("title") or not p.get("description"):
            out.append(f"panel-title-description-rule: {where}")
        if p.get("fieldConfig", {}).get("defaults", {}).get("unit") not in UNITS:
            out.append(f"panel-units-rule: {where}")
        if not p.get("targets"):
            out.append(f"panel-no-targets-rule: {where}")
        for t in p.get("targets", []):
            out.extend(f"{rule}: {where}: {t['expr']}" for rule in lint_expr(t["expr"]))
            out.extend(f"{rule}: {where}: {t['legendFormat']}" for rule in lint_legend(p, t))
    for name, expr in annotation_queries(dash).items():
        out.extend(f"{rule}: annotation {name!r}: {expr}" for rule in lint_expr(expr))
    return out


def lint_expr(expr: str) -> list[str]:
    """The target rules an expression breaks."""
    out = []
    for m in re.finditer(r"\b(i?rate)\(\s*[^()\[]*\[([^\]]*)\]", expr):
        if m.group(2) != "$__rate_interval":
            out.append("target-rate-interval-rule")
    for name, matchers, start, end in selectors(expr):
        for label in ("job", "instance"):
            if f'{label}=~"${label}"' not in matchers:
                out.append(f"target-{label}-rule")
        in_rate = re.search(r"\b(rate|irate|increase)\(\s*$", expr[:start]) and expr[end:].lstrip().startswith("[")
        if name.endswith("_total") and not in_rate:
            out.append("target-counter-agg-rule")
    if any("worker" in labels and "instance" not in labels for labels in by_lists(expr)):
        out.append("per-instance-rule: a per-worker sum merges hosts")
    return out


def lint_legend(panel: dict, target: dict) -> list[str]:
    """A series per instance names its instance; a sum over instances says it is a fleet total."""
    expr, legend = target["expr"], target.get("legendFormat", "")
    aggregates = re.search(r"\b(sum|min|max|avg|count)\s*\(", expr)
    if any("instance" in labels for labels in by_lists(expr)) or not aggregates:
        return [] if "{{instance}}" in legend else ["legend-instance-rule"]
    return [] if "fleet" in panel["title"].lower() else ["fleet-total-rule: a sum over instances, not titled fleet"]
