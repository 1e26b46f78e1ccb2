"""The deployment files are consistent: compose, Dockerfile, Prometheus rules, Grafana dashboard.

Fast checks, no Docker and no network: the compose file's structure (and `docker compose
config` where the plugin exists), pinned image tags, the services the product needs, the GPU
reservation, Kafka's data volume, ports published on 127.0.0.1, resource limits, shared blocks
as YAML anchors, the images' stages and user (a worker image without the trainer-only packages,
one CUDA), the dependency split in pyproject.toml, a dashboard that imports into any Grafana, and
that every metric the dashboard and the alerting rules use is one the worker exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from deploy.prometheus.render import JOB
from pipeline.worker.metrics import WorkerMetrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
ENV_EXAMPLE = DEPLOY / ".env.example"
COMPOSE_CONFIG = REPO / ".cache" / "tools" / "bin" / "compose-config"  # deploy/compose-config, built by make tools
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
SERVICES = {"kafka", "kafka-init", "trainer", "worker", "worker-gpu", "producer", "prometheus", "grafana"}
VARIABLE = re.compile(r"(?<!\$)\$\{(\w+)(?::?-([^}]*))?\}")  # ${VAR}, ${VAR:-default}; not $${...}
# Series Prometheus itself adds to every target, usable in rules and panels.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Series the worker engineer adds in the same release (issue 12), not yet in WorkerMetrics on
# this branch; rules may use them. Redundant (and harmless) once WorkerMetrics exports them.
COMING_WITH_THE_WORKER: set[str] = set()  # series rules may name before the worker exports them (none now)
# Packages only fraud-train needs: never in the core dependencies nor in the worker image.
TRAINER_ONLY = {"scikit-learn", "matplotlib", "scipy"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def resolve(text: str) -> str:
    """Compose-style interpolation with the defaults only (what an empty .env gives)."""
    return VARIABLE.sub(lambda m: m.group(2) or "", text)


# -- compose ----------------------------------------------------------------------------------
def test_compose_is_valid_for_docker_compose() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True,
                                        timeout=30).returncode != 0:
        pytest.skip("the docker compose plugin is not installed here; the structural checks below "
                    "and compose-config (the same loader, test below) still run")
    done = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The compose project as docker compose resolves it (compose-go), with every default and profile."""
    if not COMPOSE_CONFIG.is_file():
        pytest.fail("no .cache/tools/bin/compose-config: `make tools` (or `make go-tools`) builds it (Go 1.21+)")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO)}  # defaults only: no user variables, no .env
    done = subprocess.run([str(COMPOSE_CONFIG), str(COMPOSE)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.mark.tools
def test_compose_loads_as_docker_compose_loads_it(resolved: dict) -> None:
    """Schema, interpolation and the anchors' merges, checked by Docker Compose's own loader."""
    services = resolved["services"]
    assert set(services) >= SERVICES
    for name, service in services.items():
        limits = service["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0 and int(limits["memory"]) > 0, name
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name}: {port}"
    kafka_mounts = {v["target"]: v for v in services["kafka"]["volumes"]}
    assert kafka_mounts["/var/lib/kafka/data"]["type"] == "volume"
    assert services["worker"]["environment"]["FRAUD_DEVICE"] == "cpu"
    assert services["worker-gpu"]["environment"]["FRAUD_DEVICE"] == "cuda"
    assert services["worker-gpu"]["environment"]["FRAUD_CONSUMER_GROUP"] == "fraud-worker"
    assert services["producer"]["environment"]["SIM_CUSTOMERS"] == services["trainer"]["environment"]["SIM_CUSTOMERS"]
    assert services["trainer"]["build"]["target"] == "trainer" and services["worker"]["build"]["target"] == "worker"


def test_compose_structure(compose: dict, services: dict) -> None:
    allowed = {"name", "services", "volumes", "networks", "configs", "secrets"}
    assert not {k for k in compose if not k.startswith("x-")} - allowed
    assert set(services) >= SERVICES, f"missing services: {SERVICES - set(services)}"
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert spec["condition"] in {"service_started", "service_healthy", "service_completed_successfully"}
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no check"
        for mount in service.get("volumes") or []:
            source = mount.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared_volumes, f"{name}: volume {source} not declared"
            else:
                assert (REPO / resolve(source)).exists(), f"{name}: {source} does not exist"
        for port in service.get("ports") or []:
            # Published on the loopback interface unless PUBLISH_ADDRESS says otherwise.
            assert str(port).startswith("${PUBLISH_ADDRESS:-127.0.0.1}:"), f"{name}: port {port}"
            assert re.fullmatch(r"127\.0\.0\.1:\d+:\d+", resolve(str(port))), f"{name}: port {port}"
        for key, value in (service.get("environment") or {}).items():
            assert not isinstance(value, (dict, list)), f"{name}: {key}"


def test_kafka_keeps_its_data_in_a_volume(compose: dict, services: dict) -> None:
    kafka = services["kafka"]
    data_dir = kafka["environment"]["KAFKA_LOG_DIRS"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in kafka["volumes"]}
    assert data_dir in mounts, "Kafka's log.dirs must be a mounted volume, or `down` loses topics and offsets"
    assert mounts[data_dir] in compose["volumes"], "a named volume, which `docker compose down` keeps"
    assert "${KAFKA_CLUSTER_ID:-" in kafka["environment"]["CLUSTER_ID"], "a fixed cluster id, or the data won't load"


def test_every_service_has_resource_limits(services: dict) -> None:
    for name, service in services.items():
        limits = ((service.get("deploy") or {}).get("resources") or {}).get("limits") or {}
        assert limits.get("cpus") and limits.get("memory"), f"{name}: no deploy.resources.limits cpus and memory"
        assert float(resolve(str(limits["cpus"]))) > 0, name
        assert re.fullmatch(r"\d+[kmg]", resolve(str(limits["memory"]))), f"{name}: memory {limits['memory']}"


def test_shared_blocks_are_yaml_anchors_not_copies() -> None:
    text = COMPOSE.read_text()
    anchors = set(re.findall(r"^x-[\w-]+:\s*&([\w-]+)", text, re.MULTILINE))
    assert {"app", "worker", "worker-env"} <= anchors, anchors
    for anchor in anchors:
        assert f"*{anchor}" in text, f"anchor &{anchor} is never used"
    # Each setting of the workers' environment is written once, however many services use it.
    for line in ("FRAUD_CONSUMER_GROUP:", "dockerfile: deploy/Dockerfile", "TORCH_INDEX_URL: ${TORCH_INDEX_URL",
                 "SIM_CUSTOMERS:", "FRAUD_BOOTSTRAP_SERVERS:", "FRAUD_MODEL_DIR:"):
        found = re.findall(rf"^\s*{re.escape(line)}", text, re.MULTILINE)
        assert len(found) == 1, f"{line!r} written {len(found)} times"


def test_prometheus_has_no_unauthenticated_admin_api(services: dict) -> None:
    flags = " ".join(services["prometheus"]["command"])
    assert "--web.enable-lifecycle" not in flags and "--web.enable-admin-api" not in flags


def test_every_image_tag_is_pinned(services: dict) -> None:
    images = [resolve(s["image"]) for s in services.values() if "image" in s]
    images += [resolve(str(arg)) for s in services.values() for k, arg in
               ((s.get("build") or {}).get("args") or {}).items() if k.endswith("IMAGE")]
    dockerfile = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile, re.MULTILINE))
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", dockerfile, re.MULTILINE))
    for ref in re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE):
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), ref)
        if image not in stages:  # earlier stages
            images.append(image)
    assert len(images) >= 8
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"image {image!r} has no tag"
        assert tag not in {"latest", ""}, f"image {image!r} is not pinned"
    assert "apache/kafka:4." in " ".join(images)


def test_worker_scales_and_gpu_profile_reserves_nvidia(services: dict) -> None:
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker, "fixed names/ports break --scale"
    assert "9108" in [str(p) for p in worker["expose"]]
    assert worker["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert worker["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    gpu = services["worker-gpu"]
    assert "gpu" in gpu["profiles"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "worker" in gpu["networks"]["default"]["aliases"], "Prometheus finds workers by the name `worker`"
    assert gpu["environment"]["FRAUD_DEVICE"] == "cuda"
    assert "healthcheck" in services["kafka"]
    trainer = " ".join(map(str, services["trainer"]["command"]))
    assert "fraud-produce simulate" in trainer and "fraud-train" in trainer and "fit" in trainer
    assert "--rate" in " ".join(map(str, services["producer"]["command"]))


def test_env_example_lists_every_compose_variable() -> None:
    """Every variable of docker-compose.yml and of its cluster overlay, with the same default."""
    text = COMPOSE.read_text() + (DEPLOY / "compose.cluster.yml").read_text()
    used = {m.group(1): m.group(2) for m in VARIABLE.finditer(text)}
    assert all(default is not None for default in used.values()), "every variable needs a default"
    listed = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    assert set(used) == set(listed), f"compose only: {set(used) - set(listed)}; .env.example only: " \
                                     f"{set(listed) - set(used)}"
    for name, default in used.items():
        assert listed[name] == default, f"{name}: .env.example says {listed[name]!r}, compose {default!r}"


# -- Dockerfile -------------------------------------------------------------------------------
def test_dockerfile_is_multi_stage_non_root_with_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM \S+(?: AS (\w+))?", text, re.MULTILINE)
    assert len(stages) >= 2 and "builder" in stages
    assert "COPY --from=builder" in text
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK .*", text, re.MULTILINE)
    assert re.search(r"^ARG BASE_IMAGE=", text, re.MULTILINE)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".cache", ".git", "runs", "models"} <= set(ignored)


def dockerfile_stages() -> dict[str, tuple[str, str]]:
    """Stage name -> (what it is built FROM, its instructions)."""
    code = re.sub(r"^\s*#.*\n", "", DOCKERFILE.read_text(), flags=re.MULTILINE)  # comments are not the build
    parts = re.split(r"^FROM ", code, flags=re.MULTILINE)[1:]
    stages = {}
    for part in parts:
        base, _, rest = part.partition("\n")
        source, _, name = base.partition(" AS ")
        stages[name.strip()] = (source.strip(), rest)
    return stages


def stage_chain(stages: dict[str, tuple[str, str]], name: str) -> str:
    """A stage's instructions with those of the stages it is built FROM and copies /opt/venv from."""
    source, body = stages[name]
    text = body
    if source in stages:
        text += stage_chain(stages, source)
    for copied in re.findall(r"^COPY --from=(\S+) /opt/venv", body, re.MULTILINE):
        text += stage_chain(stages, copied)
    return text


def test_worker_image_has_no_trainer_only_packages_and_trainer_image_has_them() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "worker", "the last stage is the default target: the worker image"
    worker, trainer = stage_chain(stages, "worker"), stage_chain(stages, "trainer")
    installs = [line for line in worker.splitlines() if "pip install" in line]
    assert installs and not [line for line in installs if re.search(r"\[train\]|scikit-learn|matplotlib", line)]
    assert "find_spec" in worker, "the worker build checks that no trainer-only package slipped in"
    assert "[train]" in trainer and "fraud-train --help" in trainer
    assert re.search(r"^HEALTHCHECK ", stages["worker"][1], re.MULTILINE)
    assert re.search(r'^CMD \["fraud-worker"\]', stages["worker"][1], re.MULTILINE)


def test_one_cuda_only() -> None:
    """The GPU variant is the plain base with PyTorch's CUDA wheels (their own CUDA runtime)."""
    for path in (DOCKERFILE, COMPOSE, ENV_EXAMPLE):
        code = re.sub(r"^\s*#.*\n", "", path.read_text(), flags=re.MULTILINE)
        assert "nvidia/cuda" not in code, f"{path.name}: a CUDA base image besides the CUDA wheels"
    compose = load_yaml(COMPOSE)["services"]
    gpu_args = compose["worker-gpu"]["build"]["args"]
    assert "BASE_IMAGE" not in gpu_args and "whl/cu" in resolve(gpu_args["TORCH_INDEX_URL"])
    assert compose["worker-gpu"]["build"]["target"] == compose["worker"]["build"]["target"] == "worker"
    assert compose["trainer"]["build"]["target"] == "trainer"


def test_core_dependencies_run_the_worker_and_train_extra_holds_the_trainer_packages() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name = re.compile(r"^[A-Za-z0-9_.\-]+")
    core = {name.match(d).group(0).lower() for d in project["dependencies"]}
    train = {name.match(d).group(0).lower() for d in project["optional-dependencies"]["train"]}
    assert not core & TRAINER_ONLY, f"trainer-only packages in the core set: {core & TRAINER_ONLY}"
    assert {"scikit-learn", "matplotlib"} <= train
    assert {"torch", "kafka-python", "prometheus-client"} <= core


def test_fraud_train_without_the_train_extra_says_how_to_get_it() -> None:
    code = (
        "import sys\n"
        "sys.modules['sklearn'] = None  # as if `pip install fraud-pipeline` without [train]\n"
        "from trainer.entry import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code, "fit", "--data", "table.csv"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "pip install 'fraud-pipeline[train]'" in done.stderr and "Traceback" not in done.stderr
    helped = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert helped.returncode == 0 and "fit" in helped.stdout  # help needs no extra


def test_worker_and_producer_import_no_trainer_only_package() -> None:
    """Every module of the worker and the producer imports, and both CLIs start, without them."""
    code = (
        "import sys\n"
        "for blocked in ('sklearn', 'scipy', 'matplotlib'):\n"
        "    sys.modules[blocked] = None  # `import sklearn` now raises ImportError\n"
        "import importlib, pkgutil, pipeline, producer, pipeline.worker.cli, producer.cli\n"
        "for package in (pipeline, producer):  # every module, not only what --help loads\n"
        "    for module in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        if not module.name.endswith('__main__'):\n"
        "            importlib.import_module(module.name)\n"
        "for main in (pipeline.worker.cli.run, producer.cli.run):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit as done:\n"
        "        assert done.code in (0, None), done.code\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy', 'matplotlib')\n"
        "                and sys.modules[m] is not None)\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]


# -- Prometheus and Grafana -------------------------------------------------------------------
def exported_series() -> set[str]:
    """Every sample name WorkerMetrics can expose, from a fresh registry."""
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "info": ("_info",), "gauge": ("",)}
    return {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}


def rules() -> list[dict]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def used_series(expr: str) -> set[str]:
    return set(re.findall(r"\bfraud_[a-z0-9_]+\b", expr))


def test_rules_have_severity_and_annotations() -> None:
    found = rules()
    names = {r["alert"] for r in found}
    for needed in ("FraudWorkerDown", "FraudConsumerLagGrowing", "FraudDeadLetterRateHigh",
                   "FraudAlertRateOffCalibration", "FraudScoreDrift", "FraudNoTransactions"):
        assert needed in names
    for rule in found:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_dashboard_and_rules_use_only_exported_metrics() -> None:
    known = exported_series()
    assert "fraud_score_drift_psi" in known and "fraud_model_info" in known
    exprs = [r["expr"] for r in rules()]
    exprs += [t["expr"] for d in DASHBOARDS for p in panels(json.loads(d.read_text())) for t in p.get("targets", [])]
    unknown = {name for expr in exprs for name in used_series(expr)} - known - COMING_WITH_THE_WORKER
    assert not unknown, f"not exported by pipeline/worker/metrics.py WorkerMetrics: {sorted(unknown)}"
    bare = {name for expr in exprs for name in re.findall(r"\b(up|scrape_\w+)\b", expr)}
    assert bare <= PROMETHEUS_SERIES
    dashboard_series = {name for d in DASHBOARDS for p in panels(json.loads(d.read_text()))
                        for t in p.get("targets", []) for name in used_series(t["expr"])}
    assert not dashboard_series & COMING_WITH_THE_WORKER, "the live dashboard test would find no data for them"
    assert "fraud_processing_rate" not in dashboard_series | {n for e in exprs for n in used_series(e)}, \
        "rates come from counters: rate(fraud_transactions_total[1m])"


def test_series_the_rules_expect_from_the_worker_are_exported() -> None:
    assert exported_series() >= {"fraud_loop_heartbeat_timestamp_seconds", "fraud_out_of_range_total"}


def test_prometheus_scrapes_every_worker_replica() -> None:
    config = load_yaml(PROM_CONFIG)
    assert config["rule_files"] == ["rules.yml"]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "fraud-worker")
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and sd["type"] == "A" and int(sd["port"]) == 9108


def test_dashboard_panels_have_datasource_and_queries() -> None:
    datasources = [d for f in (GRAFANA / "provisioning" / "datasources").glob("*.yml")
                   for d in load_yaml(f)["datasources"]]
    prometheus = [d for d in datasources if d["type"] == "prometheus"]
    assert any(d["url"] == "http://prometheus:9090" for d in prometheus)
    # The provisioned Grafana has one Prometheus, the default: the dashboard's datasource
    # variable (type prometheus) can only resolve to it.
    assert len(prometheus) == 1 and prometheus[0]["isDefault"]
    provider = load_yaml(next((GRAFANA / "provisioning" / "dashboards").glob("*.yml")))["providers"][0]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    assert DASHBOARDS
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"]
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        by_variable = {"type": "prometheus", "uid": "${datasource}"}
        assert variables["instance"]["includeAll"] and variables["instance"]["datasource"] == by_variable
        series: set[str] = set()
        for panel in panels(dashboard):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == by_variable, panel["title"]
            exprs = [t.get("expr") for t in panel.get("targets", [])]
            assert exprs and all(exprs), f"{path.name}: panel {panel['title']!r} has no query"
            for target in panel["targets"]:
                assert target["datasource"] == by_variable, panel["title"]
                series |= used_series(target["expr"])
        if path.name == "fraud-quality.json":  # realised quality from the labels topic (raw input)
            needed: tuple[str, ...] = ("fraud_quality_resolved_total", "fraud_quality_score_ratio_bucket",
                                       "fraud_quality_resolved_until_timestamp_seconds")
        else:
            assert any(p.get("repeat") == "instance" for p in dashboard["panels"]), "per-worker rows"
            needed = ("fraud_transactions_total", "fraud_alerts_total", "fraud_anomaly_score_bucket",
                      "fraud_end_to_end_latency_seconds_bucket", "fraud_batch_size_bucket", "fraud_consumer_lag",
                      "fraud_dead_letters_total", "fraud_score_drift_psi", "fraud_model_info",
                      "fraud_model_threshold")
        for name in needed:
            assert name in series, f"{path.name}: no panel shows {name}"
    assert {path.name for path in DASHBOARDS} == {"fraud-pipeline.json", "fraud-quality.json"}


def test_dashboard_imports_into_any_grafana() -> None:
    """No datasource uid of this stack inside; `__inputs` asks the importer for a Prometheus."""
    provisioned = {d["uid"] for f in (GRAFANA / "provisioning" / "datasources").glob("*.yml")
                   for d in load_yaml(f)["datasources"]}
    for path in DASHBOARDS:
        text = path.read_text()
        dashboard = json.loads(text)
        assert not [uid for uid in provisioned if uid in text], f"{path.name} names a provisioned datasource uid"
        inputs = dashboard["__inputs"]
        expected = [("DS_PROMETHEUS", "datasource", "prometheus")]
        assert [(i["name"], i["type"], i["pluginId"]) for i in inputs] == expected
        requires = {(r["type"], r["id"]) for r in dashboard["__requires"]}
        used_panels = {("panel", p["type"]) for p in panels(dashboard) if p["type"] != "row"}
        assert {("grafana", "grafana"), ("datasource", "prometheus")} | used_panels <= requires
        datasource = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
        assert datasource["current"]["value"] == "${DS_PROMETHEUS}", "the importer's choice becomes the default"
        # Every other ${...} is one of the dashboard's own variables (or the import input).
        names = {v["name"] for v in dashboard["templating"]["list"]} | {"DS_PROMETHEUS"}
        assert set(re.findall(r"\$\{(\w+)\}", text)) <= names
        assert dashboard.get("id") is None


def test_dashboard_filters_every_query_by_the_job_variable() -> None:
    job_name = JOB
    assert job_name in [j["job_name"] for j in load_yaml(PROM_CONFIG)["scrape_configs"]]
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        job = variables["job"]
        assert job["current"]["value"] == job_name, "the default job is the one Prometheus scrapes the workers as"
        assert "job" in job["definition"] and job["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert 'job="$job"' in variables["instance"]["definition"], "the worker list follows the job"
        order = [v["name"] for v in dashboard["templating"]["list"]]
        assert order.index("datasource") < order.index("job") < order.index("instance")
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                for name, selector in re.findall(r"\b(fraud_\w+|up)\b(\{[^}]*\})?", target["expr"]):
                    assert 'job="$job"' in selector, f"{panel['title']}: {name}{selector} ignores $job"


@pytest.mark.tools
def test_the_cluster_overlay_makes_three_replicating_nodes() -> None:
    """deploy/compose.cluster.yml over docker-compose.yml, resolved by Docker Compose's own loader: three
    combined KRaft nodes in one quorum, RF 3 and min ISR 2 everywhere, a volume each, and every Kafka client
    given all three nodes (the workers refusing topics of fewer replicas)."""
    if not COMPOSE_CONFIG.is_file():
        pytest.fail("no .cache/tools/bin/compose-config: `make tools` (or `make go-tools`) builds it (Go 1.21+)")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO)}
    done = subprocess.run([str(COMPOSE_CONFIG), str(COMPOSE), str(REPO / "deploy" / "compose.cluster.yml")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    nodes = {name: services[name] for name in ("kafka", "kafka-2", "kafka-3")}
    voters = {n["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"] for n in nodes.values()}
    assert voters == {"1@kafka:9093,2@kafka-2:9093,3@kafka-3:9093"}
    assert sorted(n["environment"]["KAFKA_NODE_ID"] for n in nodes.values()) == ["1", "2", "3"]
    for name, node in nodes.items():
        env_of = node["environment"]
        assert env_of["KAFKA_DEFAULT_REPLICATION_FACTOR"] == env_of["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] \
            == env_of["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "3", name
        assert env_of["KAFKA_MIN_INSYNC_REPLICAS"] == env_of["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "2", name
        assert [v["type"] for v in node["volumes"]] == ["volume"], name
    assert len({n["volumes"][0]["source"] for n in nodes.values()}) == 3
    # every node reachable from the host on its own port: a host client is sent to each partition's leader
    published = {name: [(p["host_ip"], p["published"]) for p in node["ports"] if p["target"] == 9094]
                 for name, node in nodes.items()}
    assert all(len(ports) == 1 for ports in published.values()), published
    assert len({ports[0][1] for ports in published.values()}) == 3, published
    for name, node in nodes.items():
        advertised = node["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        assert f":{published[name][0][1]}" in advertised.split("EXTERNAL://", 1)[1], (name, advertised)
    assert services["kafka-init"]["environment"]["TOPIC_REPLICATION_FACTOR"] == "3"
    for name in ("worker", "worker-gpu", "producer"):
        assert services[name]["environment"]["FRAUD_BOOTSTRAP_SERVERS"] == "kafka:9092,kafka-2:9092,kafka-3:9092"
        assert {"kafka-2", "kafka-3"} <= set(services[name]["depends_on"]), name
    assert services["worker"]["environment"]["FRAUD_REPLICATION_FACTOR"] == "3"


@pytest.mark.tools
def test_the_single_broker_stack_keeps_one_replica(resolved: dict) -> None:
    assert resolved["services"]["kafka-init"]["environment"]["TOPIC_REPLICATION_FACTOR"] == "1"
    assert "kafka-2" not in resolved["services"]
