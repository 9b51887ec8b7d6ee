"""The Grafana dashboard and the Prometheus alert rules: promtool checks the rules and runs their
unit tests; every dashboard query is valid PromQL, names only metrics the daemon exports, and shows
each edge of the sites and edges chosen, not a sum over the fleet; the example scrape config gives
every edge its site."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from conftest import REPO
from icpgate.admin.state_metrics import readiness, ready_family, registry_family, state_families
from icpgate.config.settings import load_config
from icpgate.fleet.serve import edge_exposition
from icpgate.inspection.metrics import inspection_families

DASHBOARDS = REPO / "dashboards"
METRIC_NAME = re.compile(r"\bicpgate_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(icpgate_[a-z0-9_]+)(\{[^}]*\})?")
AGGREGATION = re.compile(
    r"\b(sum|max|min|avg|count|topk|bottomk|quantile|stddev|group)\b\s*(by|without)?\s*(\([^)]*\))?\s*\("
)
FILTERED = ('site=~"$site"', 'instance=~"$instance"')


def promtool(*args: str, cwd: Path = DASHBOARDS) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_unit_test_that_sees_it_fire() -> None:
    rules = yaml.safe_load((DASHBOARDS / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((DASHBOARDS / "alerts.test.yml").read_text())
    fired = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"] if not case["exp_alerts"]}
    assert alerts == fired
    assert alerts - {"IcpgateFeedChecksumFailures"} <= quiet  # and, but for one, a case where it must not


def exported_metric_names(tmp_path: Path) -> set[str]:
    """Every sample name the daemon can export: the workers' metrics and the admin's state families."""
    from prometheus_client import REGISTRY

    import icpgate.telemetry.metrics  # noqa: F401  (registers the workers' metrics)

    names = {sample for family in REGISTRY.collect() for sample in _sample_names(family)}
    config = load_config(REPO / "config.example.toml")
    names |= {sample for family in state_families(config, {}, 0, {}) for sample in _sample_names(family)}
    names |= _sample_names(ready_family(readiness(config, [], {})))
    names |= {sample for family in inspection_families(None) for sample in _sample_names(family)}
    names |= _sample_names(registry_family([]))
    names |= set(re.findall(r"^# TYPE (\S+)", edge_exposition([]).decode(), re.M))  # `fleet serve`'s
    return names


def _sample_names(family) -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ("",))
    return {family.name + suffix for suffix in suffixes}


def test_the_dashboard_imports_and_queries_only_what_the_daemon_exports(tmp_path: Path) -> None:
    dashboard = json.loads((DASHBOARDS / "icpgate.json").read_text())
    assert [item["name"] for item in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    titles = {panel["title"] for panel in panels if panel["type"] == "row"}
    assert {"Overview", "Violations", "Feed", "Gate"} <= titles
    queries = [target["expr"] for panel in panels if panel["type"] != "row" for target in panel["targets"]]
    for panel in panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}" and panel["targets"]

    # PromQL validity: promtool checks each query as a recording rule.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": "dashboard_query_%d" % number, "expr": query.replace("$__rate_interval", "5m")}
        for number, query in enumerate(queries)]}]}  # fmt: skip
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", "queries.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    exported = exported_metric_names(tmp_path)
    used = {name for query in queries for name in METRIC_NAME.findall(query)}
    alerts = {name for name in METRIC_NAME.findall((DASHBOARDS / "alerts.yml").read_text())}
    assert used - exported == set() and alerts - exported == set()
    overview = [panel["title"] for panel in panels if panel["gridPos"]["y"] < 14 and panel["type"] != "row"]
    for wanted in ("Enforcement mode", "Filings", "Time since last sync", "Failed syncs (1h)",
                   "Blocks per second by reason", "Decision latency p95 / p50"):  # fmt: skip
        assert wanted in overview


def test_every_panel_shows_each_edge_of_the_chosen_sites_and_edges() -> None:
    """The `site` and `instance` variables filter every series a panel reads, and every aggregation
    keeps `instance`: one line per edge, never a sum over whatever Prometheus scrapes."""
    dashboard = json.loads((DASHBOARDS / "icpgate.json").read_text())
    variables = {item["name"]: item for item in dashboard["templating"]["list"]}
    assert list(variables) == ["site", "instance"]
    for variable in variables.values():
        # All matches an edge without a site label too (a scrape config that sets none).
        assert variable["includeAll"] and variable["multi"] and variable["allValue"] == ".*"
        assert variable["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert variables["site"]["query"]["query"] == "label_values(icpgate_build_info, site)"
    assert variables["instance"]["query"]["query"] == 'label_values(icpgate_build_info{site=~"$site"}, instance)'
    targets = [(panel["title"], target) for panel in dashboard["panels"] if panel["type"] != "row"
               for target in panel["targets"]]  # fmt: skip
    assert len(targets) > 30
    for title, target in targets:
        query = target["expr"]
        selectors = SELECTOR.findall(query)
        assert selectors, (title, query)
        for name, matchers in selectors:
            assert all(wanted in matchers for wanted in FILTERED), (title, name, query)
        aggregations = AGGREGATION.findall(query)
        for operator, clause, labels in aggregations:
            assert clause == "by" and "instance" in labels, (title, operator, query)
        assert "{{instance}}" in target["legendFormat"], title


def test_the_example_scrape_config_gives_every_edge_a_site(tmp_path: Path) -> None:
    """What docs/metrics.md tells operators to do: Prometheus labels each edge's series with its site."""
    config = yaml.safe_load((DASHBOARDS / "prometheus.example.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"icpgate", "icpgate-fleet"}
    groups = jobs["icpgate"]["static_configs"]
    assert groups and all(group["labels"]["site"] and group["targets"] for group in groups)
    assert "labels" not in jobs["icpgate-fleet"]["static_configs"][0]  # its series carry their own site
    token = tmp_path / "fleet.token"
    token.write_text("t\n")
    jobs["icpgate-fleet"]["authorization"]["credentials_file"] = str(token)
    (tmp_path / "alerts.yml").write_text((DASHBOARDS / "alerts.yml").read_text())
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
