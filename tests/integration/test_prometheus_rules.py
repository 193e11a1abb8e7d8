"""Prometheus and Grafana configuration, checked offline with the real promtool:

- ``deploy/prometheus/prometheus.yml`` (docker compose) and ``prometheus.local.yml``
  (``make run``) are valid, scrape the five services under their compose names, and load the
  rule files (``rule_files: [rules/*.yml]``, relative to the config file, so the same line finds
  ``/etc/prometheus/rules`` in the container and ``deploy/prometheus/rules`` here);
- the rule files pass ``promtool check rules`` and their unit tests
  (``deploy/prometheus/tests/*.yml``) pass ``promtool test rules``;
- every metric a rule or a dashboard query names is one the services export (read from the
  services' own Prometheus registries), ``up``, or a recording rule; the ``:total`` rules use
  raw counters only;
- the Grafana provisioning points at the compose Prometheus and the dashboard is valid JSON
  with unique panel ids that covers every KPI.

promtool comes from Debian's prometheus package: ``bash scripts/prometheus_tools.sh``. Without
it these tests fail (they never skip).
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy" / "prometheus"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))
TEST_FILES = sorted((PROM_DIR / "tests").glob("*.yml"))
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "hometeam.json"

SERVICES = {  # compose service / job name -> (module, port)
    "ingest": ("services.ingest.app", 8081),
    "team-routing": ("services.team_routing.app", 8082),
    "conversation-state": ("services.conversation_state.app", 8083),
    "timeout-sweeper": ("services.timeout_sweeper.app", 8084),
    "metrics": ("services.metrics.app", 8085),
}

# Series Prometheus itself adds to every target.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_samples_post_metric_relabeling", "scrape_series_added"}


# --------------------------------------------------------------------------- helpers


def promtool_path() -> str:
    """promtool, or a failure (inside the test, never a skip) saying how to install it."""
    path = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not path:
        pytest.fail(
            "promtool is missing: run `bash scripts/prometheus_tools.sh` (as root; it installs "
            "Debian's prometheus package), or set PROMTOOL to a promtool binary",
            pytrace=False,
        )
    return path


def run_promtool(*args: str | Path) -> str:
    proc = subprocess.run([promtool_path(), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{output}"
    return output


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*(=~|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_PROMQL_WORDS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio", "by", "without", "on", "ignoring", "group_left",
    "group_right", "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric (and recording-rule) names a PromQL expression selects."""
    names: set[str] = set()
    for op, value in _NAME_MATCHER.findall(expr):
        names.update(value.split("|") if op == "=~" else [value])
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers (and Grafana variables in them)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, subqueries, $__rate_interval
    text = _GROUPING.sub(" ", text)  # label lists of by / on / group_left ...
    text = re.sub(r"\boffset\s+-?[\w$]+", " ", text)
    for word, call in _IDENT.findall(text):
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


@pytest.fixture(scope="module")
def exported_metrics() -> set[str]:
    """Every sample name the five services export, from their own registries (counters with
    _total/_created, histograms with _bucket/_sum/_count, the FastStream middleware's)."""
    from prometheus_client import CollectorRegistry

    from services.metrics.prom import KpiMetrics

    names: set[str] = set()
    cwd = os.getcwd()
    os.chdir(REPO)  # the services read deploy/teams.yaml relative to the repository
    try:
        for module, _ in SERVICES.values():
            service = importlib.import_module(module).create_service()
            names |= set(service.runtime.registry._names_to_collectors)
    finally:
        os.chdir(cwd)
    kpi_registry = CollectorRegistry()
    KpiMetrics(kpi_registry)
    names |= set(kpi_registry._names_to_collectors)
    assert any(n.startswith("faststream_") for n in names), "no FastStream middleware metrics found"
    return names


def load_rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for path in RULE_FILES:
        groups += yaml.safe_load(path.read_text())["groups"]
    return groups


def recording_rules() -> dict[str, str]:
    return {r["record"]: r["expr"] for g in load_rule_groups() for r in g["rules"] if "record" in r}


def alerting_rules() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in load_rule_groups() for r in g["rules"] if "alert" in r}


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                out.append((inner["title"], target["expr"]))
    return out


# --------------------------------------------------------------------------- promtool


def test_the_rule_and_test_files_are_there() -> None:
    assert [p.name for p in RULE_FILES] == ["alerts.yml", "kpis.yml"]
    assert [p.name for p in TEST_FILES] == ["alerts_test.yml", "kpis_test.yml"]


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.local.yml"])
def test_promtool_check_config(config: str) -> None:
    # rule_files is relative to the config file, so this also finds and checks the rules.
    output = run_promtool("check", "config", PROM_DIR / config)
    assert f"{len(RULE_FILES)} rule files found" in output, output


@pytest.mark.parametrize(
    ("config", "host_of"),
    [("prometheus.yml", lambda job: job), ("prometheus.local.yml", lambda job: "127.0.0.1")],
)
def test_every_service_is_scraped_under_its_name(config: str, host_of: Any) -> None:
    parsed = yaml.safe_load((PROM_DIR / config).read_text())
    assert parsed["rule_files"] == ["rules/*.yml"]
    assert sorted(glob.glob(str(PROM_DIR / parsed["rule_files"][0]))) == [str(p) for p in RULE_FILES]
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]] for job in parsed["scrape_configs"]
    }
    for name, (_, port) in SERVICES.items():
        assert targets.get(name) == [f"{host_of(name)}:{port}"], (config, name, targets.get(name))
    assert set(targets) == {*SERVICES, "prometheus"}


def test_promtool_check_rules() -> None:
    output = run_promtool("check", "rules", *RULE_FILES)
    assert output.count("SUCCESS") == len(RULE_FILES), output


def test_promtool_rule_unit_tests() -> None:
    output = run_promtool("test", "rules", *TEST_FILES)
    assert output.count("SUCCESS") == len(TEST_FILES), output


# --------------------------------------------------------------------------- rule contents


def test_rules_name_only_exported_metrics_or_recording_rules(exported_metrics: set[str]) -> None:
    known = exported_metrics | SCRAPE_SERIES | set(recording_rules())
    for group in load_rule_groups():
        for rule in group["rules"]:
            unknown = metric_names(rule["expr"]) - known
            assert not unknown, f"{rule.get('record') or rule.get('alert')} names unknown metrics {sorted(unknown)}"


def test_every_kpi_has_a_since_start_and_a_last_hour_rule() -> None:
    rules = recording_rules()
    for kpi in (
        "team:hometeam_closed_per_staffed_hour",
        "team_agent:hometeam_closed_per_staffed_hour",
        "team:hometeam_cost_per_resolved_contact",
        "team_agent:hometeam_cost_per_resolved_contact",
        "team:hometeam_lines_per_turn",
        "team:hometeam_repeat_contact_rate",
        "team_reason:hometeam_overflow_rate",
        "team:hometeam_overflow_rate",
        "team:hometeam_csat_average",
        "team:hometeam_first_response_seconds_avg",
        "team:hometeam_resolution_seconds_avg",
    ):
        assert f"{kpi}:total" in rules and f"{kpi}:1h" in rules, kpi
    for quantile in ("first_response", "resolution"):
        for p in ("p50", "p90"):
            assert f"team:hometeam_{quantile}_seconds_{p}:1h" in rules
    assert "pool:hometeam_agent_load_ratio:current" in rules


def test_since_start_rules_are_ratios_of_raw_counters(exported_metrics: set[str]) -> None:
    totals = {name: expr for name, expr in recording_rules().items() if name.endswith(":total")}
    assert len(totals) >= 11
    for name, expr in totals.items():
        assert not re.search(r"\b(increase|rate|irate|delta|idelta|\w+_over_time)\s*\(", expr), name
        assert "[" not in expr, f"{name} uses a range"
        names = metric_names(expr)
        assert names <= exported_metrics, f"{name} reads {sorted(names - exported_metrics)}, not raw metrics"


def test_last_hour_rules_use_one_hour_windows() -> None:
    for name, expr in recording_rules().items():
        if name.endswith(":1h"):
            windows = set(re.findall(r"\[([^\]]+)\]", expr))
            assert windows == {"1h"}, (name, windows)


def test_alerts_have_severity_summary_and_description() -> None:
    alerts = alerting_rules()
    assert set(alerts) >= {
        "TeamSurging",
        "QueueOldestWaitHigh",
        "ResponseTargetBreaches",
        "ConsumerLagHigh",
        "DeadLetterRate",
        "ServiceDown",
        "DeadlinesOverdue",
        "StateNotStored",
    }
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        # labels only: bounded ids, never a customer, phone number or text
        for text in rule["annotations"].values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in {"pool", "team", "group", "topic", "job", "instance", "reason", "kind", "state"}, (name, label)


# --------------------------------------------------------------------------- Grafana


def test_grafana_datasource_is_the_compose_prometheus() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [source] = provisioned["datasources"]
    assert (source["type"], source["uid"], source["url"]) == ("prometheus", "prometheus", "http://prometheus:9090")


def test_grafana_dashboard_provider_reads_the_mounted_folder() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "hometeam.yml").read_text())
    [provider] = provisioned["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_is_valid_json_with_unique_panel_ids() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]] + [q["id"] for p in dashboard["panels"] for q in p.get("panels", [])]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    assert dashboard["uid"] == "hometeam"
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert len(rows) == 3, rows
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "prometheus", panel["title"]
            assert panel["targets"], panel["title"]
            assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_dashboard_has_a_team_variable_from_label_values() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    [team] = [v for v in dashboard["templating"]["list"] if v["name"] == "team"]
    query = team["query"]["query"] if isinstance(team["query"], dict) else team["query"]
    assert re.fullmatch(r"label_values\(\s*\w+\s*,\s*team\s*\)", query), query
    team_panels = [expr for _, expr in dashboard_exprs(dashboard) if "$team" in expr]
    assert len(team_panels) >= 10


def test_dashboard_queries_name_only_known_metrics(exported_metrics: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = exported_metrics | SCRAPE_SERIES | set(recording_rules())
    exprs = dashboard_exprs(dashboard)
    for var in dashboard["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        exprs += [(f"variable {var['name']}", m) for m in re.findall(r"label_values\(\s*([^,]+),", query)]
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - known
        assert not unknown, f"{title}: unknown metrics {sorted(unknown)} in {expr!r}"


def test_dashboard_shows_every_kpi_and_health_signal() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = set().union(*(metric_names(expr) for _, expr in dashboard_exprs(dashboard)))
    for name in (
        "hometeam_queue_depth",
        "hometeam_queue_oldest_wait_seconds",
        "hometeam_agents_online",
        "pool:hometeam_agent_load_ratio:current",
        "hometeam_pool_surging",
        "team:hometeam_closed_per_staffed_hour:1h",
        "team:hometeam_cost_per_resolved_contact:1h",
        "team:hometeam_lines_per_turn:1h",
        "team:hometeam_repeat_contact_rate:1h",
        "team_reason:hometeam_overflow_rate:1h",
        "team:hometeam_csat_average:1h",
        "team:hometeam_first_response_seconds_p50:1h",
        "team:hometeam_first_response_seconds_p90:1h",
        "team:hometeam_resolution_seconds_p50:1h",
        "team:hometeam_resolution_seconds_p90:1h",
        "up",
        "hometeam_consumer_lag_records",
        "hometeam_dead_letters_total",
        "faststream_received_processed_messages_total",
        "faststream_received_processed_messages_exceptions_total",
        "hometeam_deadlines_fired_total",
        "hometeam_state_stored_timestamp_seconds",
        "hometeam_state_unstored_records",
        "hometeam_deadline_lateness_seconds_bucket",
    ):
        assert name in used, f"the dashboard does not show {name}"


def test_metric_name_parser() -> None:
    assert metric_names(
        'histogram_quantile(0.9, sum by (team, le) (rate(hometeam_resolution_seconds_bucket{team=~"$team"}[$__rate_interval])))'
    ) == {"hometeam_resolution_seconds_bucket"}
    assert metric_names(
        'label_replace(0 * sum by (team) (a_total), "reason", "surge", "", "") / on (team) group_left () (b:c:total > bool 1e3)'
    ) == {"a_total", "b:c:total"}
    assert metric_names('{__name__=~"x_total|y"} offset 5m') == {"x_total", "y"}
