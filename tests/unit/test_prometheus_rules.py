"""The alerting rules behave as docs/deploy.md says, proven with promtool's rule unit tests.

promtool is the one of the Prometheus release docker-compose.yml runs (``make tools`` builds it;
Debian's is 2.x). No broker, no server: promtool evaluates the rules over made-up series.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.prometheus.tools import compose_prometheus_version, find_promtool, tool_version

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules.yml"
RULES_TESTS = (PROMETHEUS / "rules_test.yml", PROMETHEUS / "rules_test_weekly.yml")  # 15 s and 10 min steps
RUNBOOK = REPO / "docs" / "deploy.md"


@pytest.fixture(scope="module")
def promtool() -> Path:
    found = find_promtool()
    if found is None:
        pytest.fail(f"no promtool {compose_prometheus_version()} (the Prometheus release of docker-compose.yml): "
                    "`make tools` builds it into .cache/tools (needs Go 1.21+)")
    return found


def alerting_rules() -> list[dict]:
    return [r for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"] if "alert" in r]


def github_anchors(markdown: str) -> set[str]:
    """Anchors GitHub (and most renderers) give the headings: lower case, punctuation dropped."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.tools
def test_promtool_is_the_release_compose_runs(promtool: Path) -> None:
    wanted = compose_prometheus_version()
    found = tool_version(promtool)
    assert found is not None and found.split(".")[0] == wanted.split(".")[0], (promtool, found, wanted)


@pytest.mark.tools
def test_promtool_accepts_rules_and_compose_config(promtool: Path) -> None:
    for args in (["check", "rules", str(RULES)], ["check", "config", str(PROMETHEUS / "prometheus.yml")]):
        done = subprocess.run([str(promtool), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


@pytest.mark.tools
def test_rule_unit_tests_pass(promtool: Path) -> None:
    done = subprocess.run([str(promtool), "test", "rules", *map(str, RULES_TESTS)], capture_output=True, text=True,
                          timeout=120, cwd=PROMETHEUS)
    assert done.returncode == 0, f"promtool test rules:\n{done.stdout}{done.stderr}"
    assert "SUCCESS" in done.stdout + done.stderr


def test_every_alert_has_a_unit_test_that_makes_it_fire() -> None:
    files = [yaml.safe_load(path.read_text()) for path in RULES_TESTS]
    assert all(tests["rule_files"] == ["rules.yml"] for tests in files)
    cases = [case for tests in files for group in tests["tests"] for case in group.get("alert_rule_test", [])]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    names = {r["alert"] for r in alerting_rules()}
    assert names - firing == set(), f"no test shows these alerts firing: {sorted(names - firing)}"
    assert names - quiet == set(), f"no test shows these alerts quiet: {sorted(names - quiet)}"
    assert {"FraudWorkerDown", "FraudWorkerStalled"} <= names


def test_worker_down_is_proven_for_a_worker_that_leaves_discovery() -> None:
    """With DNS discovery a dead worker's `up` series ends (stale) instead of reading 0."""
    tests = yaml.safe_load(RULES_TESTS[0].read_text())["tests"]
    proving = [g for g in tests
               if any(s["values"].rstrip().endswith("stale") and s["series"].startswith("up{")
                      for s in g["input_series"])
               and not any(re.search(r"(^|\s)0(x|\s|$)", s["values"]) for s in g["input_series"]
                           if s["series"].startswith("up{"))
               and any(c["alertname"] == "FraudWorkerDown" and c.get("exp_alerts") for c in g["alert_rule_test"])]
    assert proving, "no rule test shows FraudWorkerDown firing for a worker whose up series ends without a 0"


def test_every_alert_links_its_runbook_entry() -> None:
    anchors = github_anchors(RUNBOOK.read_text())
    for rule in alerting_rules():
        url = rule["annotations"].get("runbook_url", "")
        path, _, anchor = url.partition("#")
        assert path == "docs/deploy.md", f"{rule['alert']}: runbook_url {url!r}"
        assert anchor == rule["alert"].lower() and anchor in anchors, \
            f"{rule['alert']}: docs/deploy.md has no heading for #{anchor}"
