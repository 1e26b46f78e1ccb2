"""Monitoring as code, proven with real components.

promtool checks the project's Prometheus config and rules; then a real Prometheus server scrapes
a live worker subprocess that scores a real stream from the session's Kafka, and every PromQL
expression of every dashboard panel, plus every alerting rule, is evaluated through Prometheus'
HTTP API: each panel query must return data, each rule must load and evaluate. promtool and the
server are of the release docker-compose.yml runs (`make tools` builds them).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from deploy.ports import free_port
from deploy.prometheus.render import COMPOSE_CONFIG, JOB, RULES, render_config
from deploy.prometheus.tools import compose_prometheus_version, find_prometheus, find_promtool
from pipeline.config import KafkaSettings
from tests.worker_helpers import produce_bad, produce_frame

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
MAIN_DASHBOARD = DASHBOARDS / "fraud-pipeline.json"  # featured or raw input: a featured worker fills every panel
QUALITY_DASHBOARD = DASHBOARDS / "fraud-quality.json"  # raw input only: decisions resolved against labels
# What Grafana would put in place of its built-in variables, for a 1 s scrape interval.
GRAFANA_BUILTINS = {"$__rate_interval": "5s", "$__interval": "2s", "$__range": "1m"}


# -- helpers ----------------------------------------------------------------------------------


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait(condition: Callable[[], bool], timeout_s: float, what: str, logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}\n{logs()}")


def _stop(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _tail(path: Path, chars: int = 3000) -> str:
    return f"--- {path.name} ---\n{path.read_text(errors='replace')[-chars:]}" if path.exists() else ""


def panel_targets(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' nested panels included."""
    def walk(panels: list[dict]) -> Iterator[dict]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    for panel in walk(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield panel["title"], target["expr"]


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana variables ($name and ${name}) replaced; the longest names first."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name.lstrip("$") + "}", variables[name]).replace(name, variables[name])
    leftover = re.findall(r"\$\{?\w+", expr)
    assert not leftover, f"unknown dashboard variables {leftover} in {expr}"
    return expr


class PrometheusAPI:
    """The few calls of Prometheus' HTTP API the test needs (stdlib urllib only)."""

    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, expr: str) -> list[dict]:
        url = f"{self.base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            body = _get_json(url)
        except urllib.error.HTTPError as err:  # 400 for a bad expression: show Prometheus' reason
            raise AssertionError(f"{expr}: {err.read().decode(errors='replace')}") from err
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0

    def rules(self) -> list[dict]:
        groups = _get_json(f"{self.base}/api/v1/rules")["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def label_values(self, label: str, match: str) -> list[str]:
        url = f"{self.base}/api/v1/label/{label}/values?{urllib.parse.urlencode({'match[]': match})}"
        return _get_json(url)["data"]


# -- promtool ---------------------------------------------------------------------------------
def test_promtool_accepts_config_and_rules(tmp_path: Path) -> None:
    promtool = find_promtool()  # the release compose runs, not Debian's 2.x
    if promtool is None:
        pytest.fail(f"no promtool {compose_prometheus_version()} (docker-compose.yml's Prometheus): `make tools`")
    rendered = tmp_path / "prometheus.yml"
    rendered.write_text(render_config(["127.0.0.1:9108"], scrape_interval="1s"))
    for args in (["check", "config", str(COMPOSE_CONFIG)], ["check", "rules", str(RULES)],
                 ["check", "config", str(rendered)]):
        done = subprocess.run([str(promtool), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


# -- a live worker scraped by a real Prometheus -----------------------------------------------
class Feeder(threading.Thread):
    """Keeps a trickle of real transactions flowing so rate() windows always hold data."""

    def __init__(self, settings: KafkaSettings, frame: pd.DataFrame, rows: int = 150, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.settings, self.frame, self.rows, self.every_s = settings, frame, rows, every_s
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        start = 0
        try:
            while not self.done.wait(self.every_s):
                chunk = self.frame.iloc[start : start + self.rows]
                if len(chunk) < self.rows:
                    start, chunk = 0, self.frame.iloc[: self.rows]
                produce_frame(self.settings, chunk)
                start += self.rows
        except BaseException as err:  # reported by the test, not lost on the thread
            self.error = err


def metrics_worker(kafka_env: dict[str, str], model_dir: Path, group: str, tmp_path: Path, *flags: str
                   ) -> tuple[subprocess.Popen, int, Path]:
    """A `python -m pipeline` subprocess serving /metrics on a free port: the process, the port, its log."""
    port = free_port()
    log = tmp_path / "worker.log"
    env = {**kafka_env, "FRAUD_CONSUMER_GROUP": group, "FRAUD_DEVICE": "cpu"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "--model-dir", str(model_dir), "--metrics-port", str(port),
             "--metrics-host", "127.0.0.1", *flags],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, port, log


@pytest.fixture
def live_worker(kafka_settings: KafkaSettings, kafka_env: dict[str, str], model_dir: Path,
                stream_frame: pd.DataFrame, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A `python -m pipeline` subprocess scoring a fed stream; yields its metrics address and log."""
    produce_frame(kafka_settings, stream_frame.iloc[:1000])  # creates the topics too
    produce_bad(kafka_settings)
    proc, port, log = metrics_worker(kafka_env, model_dir, f"obs-{kafka_settings.client_id}", tmp_path,
                                     "--max-batch", "512")
    feeder = Feeder(kafka_settings, stream_frame.iloc[1000:])
    feeder.start()
    try:
        _wait(lambda: proc.poll() is not None or _answers(f"http://127.0.0.1:{port}/metrics"), 90,
              "the worker's /metrics", lambda: _tail(log))
        assert proc.poll() is None, f"the worker exited with {proc.returncode}\n{_tail(log)}"
        yield f"127.0.0.1:{port}", log
        assert feeder.error is None, f"feeding the stream failed: {feeder.error!r}"
    finally:
        feeder.done.set()
        feeder.join(10)
        _stop(proc)


@contextlib.contextmanager
def scraping(target: str, worker_log: Path, tmp_path: Path) -> Iterator[tuple[PrometheusAPI, str, Callable[[], str]]]:
    """A real Prometheus server scraping one worker every second with the project's rules."""
    binary = find_prometheus()  # the release compose runs, not Debian's 2.x
    if binary is None:
        pytest.fail(f"no Prometheus {compose_prometheus_version()} (docker-compose.yml's): `make tools` builds it")
    config = tmp_path / "prometheus.yml"
    config.write_text(render_config([target], scrape_interval="1s"))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(binary), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        _wait(lambda: proc.poll() is not None or _answers(f"http://127.0.0.1:{port}/-/ready"), 30,
              "Prometheus to be ready", lambda: _tail(log))
        assert proc.poll() is None, f"Prometheus exited with {proc.returncode}\n{_tail(log)}"
        yield PrometheusAPI(f"http://127.0.0.1:{port}"), target, lambda: _tail(worker_log) + "\n" + _tail(log)
    finally:
        _stop(proc)


@pytest.fixture
def prometheus(live_worker: tuple[str, Path], tmp_path: Path) -> Iterator[tuple[PrometheusAPI, str, Callable[[], str]]]:
    with scraping(*live_worker, tmp_path) as scraped:
        yield scraped


def dashboard_gaps(api: PrometheusAPI, path: Path, instance: str) -> tuple[int, list[str], list[str]]:
    """Every panel query of a dashboard, for one worker's row and for "All": how many ran, those without data,
    and those with only NaN."""
    empty, nan_only = [], []
    checked = 0
    for title, expr in panel_targets(json.loads(path.read_text())):
        # One worker's row (escaped as Grafana escapes regex variables for Prometheus), and "All".
        for value in (re.escape(instance).replace("\\", "\\\\"), ".*"):
            promql = substitute(expr, {**GRAFANA_BUILTINS, "$job": JOB, "$instance": value})
            result = api.query(promql)
            checked += 1
            if not result:
                empty.append(f"{path.name} / {title}: {promql}")
            elif all(math.isnan(float(s["value"][1])) for s in result):
                nan_only.append(f"{path.name} / {title}: {promql}")
    return checked, empty, nan_only


def test_every_dashboard_query_and_rule_evaluates_on_live_data(
        prometheus: tuple[PrometheusAPI, str, Callable[[], str]]) -> None:
    api, instance, logs = prometheus
    # A few scrapes of a worker that is scoring: counters moved, histograms filled, lag known.
    _wait(lambda: api.value(f'count_over_time(fraud_batches_total{{job="{JOB}"}}[1m])') >= 6
          and api.value(f'increase(fraud_transactions_total{{job="{JOB}",outcome="scored"}}[5s])') > 0
          and bool(api.query("fraud_consumer_lag")), 45, "Prometheus to scrape a scoring worker", logs)
    assert api.query(f'up{{job="{JOB}"}}')[0]["value"][1] == "1"

    # The dashboard's variable queries list the job and the worker.
    assert JOB in api.label_values("job", "fraud_model_info")
    assert instance in api.label_values("instance", f'fraud_model_info{{job="{JOB}"}}')

    checked, empty, nan_only = dashboard_gaps(api, MAIN_DASHBOARD, instance)
    assert checked >= 40
    assert not empty, "panel queries without data:\n" + "\n".join(empty)
    assert not nan_only, "panel queries with only NaN:\n" + "\n".join(nan_only)

    # Every alerting rule of rules.yml is loaded and has evaluated without error.
    expected = set(re.findall(r"^\s*- alert:\s*(\S+)", RULES.read_text(), re.MULTILINE))
    _wait(lambda: all(r["health"] != "unknown" for r in api.rules()) and len(api.rules()) >= len(expected),
          15, "every rule to evaluate", logs)
    rules = {r["name"]: r for r in api.rules() if r["type"] == "alerting"}
    assert set(rules) == expected
    broken = {name: (r["health"], r.get("lastError")) for name, r in rules.items()
              if r["health"] != "ok" or r.get("lastError")}
    assert not broken, f"rules not evaluating: {broken}"
    # And none of the "nothing works" alerts is even pending on a healthy pipeline.
    active = {a["labels"]["alertname"] for r in rules.values() for a in r.get("alerts", [])}
    assert not active & {"FraudWorkerDown", "FraudWorkerStalled", "FraudWorkersAbsent", "FraudNoTransactions"}, active


def test_quality_dashboard_reads_a_raw_worker_resolving_decisions(
        kafka_settings: KafkaSettings, kafka_env: dict[str, str], raw_model_dir: Path, simulated: pd.DataFrame,
        tmp_path: Path) -> None:
    """The quality dashboard (raw input only) on a raw-input worker scraped while it resolves decisions against
    the labels topic: every panel query returns data, none only NaN. A featured worker has no quality series,
    which is why the main dashboard's test does not read this one."""
    from pipeline.topics import ensure_topics
    from producer.rawfeed import raw_messages
    from producer.send import make_producer, send_records
    from producer.tables import resolve_spec

    settings = kafka_settings
    ensure_topics(settings, [settings.input_topic, settings.labels_topic, settings.alerts_topic,
                             settings.dead_letter_topic], 3)
    proc, port, log = metrics_worker(kafka_env, raw_model_dir, f"obs-raw-{settings.client_id}", tmp_path)
    try:
        _wait(lambda: proc.poll() is not None or _answers(f"http://127.0.0.1:{port}/metrics"), 90,
              "the worker's /metrics", lambda: _tail(log))
        with scraping(f"127.0.0.1:{port}", log, tmp_path) as (api, instance, logs):
            _wait(lambda: api.value(f'count_over_time(fraud_quality_resolved_total{{job="{JOB}"}}[1m])') >= 8,
                  30, "Prometheus to scrape the quality series at 0", logs)
            producer = make_producer(settings)  # the simulated bank's 70 days, labels 7 days after each fraud
            try:
                feed = raw_messages(simulated, resolve_spec(simulated, "handbook"), settings.input_topic,
                                    settings.labels_topic, 7.0)
                report = send_records(feed, settings.input_topic, producer, progress=False)
            finally:
                producer.close()
            assert not report.errors, report.errors
            _wait(lambda: api.value(f'sum(increase(fraud_quality_resolved_total{{job="{JOB}",label="fraud",'
                                    f'alerted="true"}}[1m]))') > 0
                  and api.value(f'sum(increase(fraud_quality_resolved_total{{job="{JOB}",label="genuine"}}[1m]))')
                  > 1000, 120, "decisions to be resolved", logs)
            checked, empty, nan_only = dashboard_gaps(api, QUALITY_DASHBOARD, instance)
    finally:
        _stop(proc)
    assert checked >= 10
    assert not empty, "panel queries without data:\n" + "\n".join(empty)
    assert not nan_only, "panel queries with only NaN:\n" + "\n".join(nan_only)
