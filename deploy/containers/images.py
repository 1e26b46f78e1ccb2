"""The images the container suite runs, built here without any image registry.

- ``localhost/fraud-debian-python:bookworm``: Debian 12 (``debootstrap --variant=minbase``) with its
  python3 (3.11) and CA certificates; the base of everything below. Made once (about 1.5 min).
- Stand-ins for the images docker-compose.yml pulls, built from what the project already resolves:
  ``localhost/fraud-kafka:4.3.1`` (apache/kafka: the Maven jars of deploy/kafka), ``localhost/
  fraud-prometheus:v3.5.0`` (prom/prometheus: the Go build of ``make tools``), ``localhost/fraud-uv:0.13.9``
  (ghcr.io/astral-sh/uv: PyPI's uv). ``compose.local.yml`` points the compose services at them.
- The product's images from deploy/Dockerfile, unchanged but for build arguments: ``fraud-pipeline:0.1.0``
  (worker) and ``fraud-pipeline-trainer:0.1.0``. Here PyTorch comes from PyPI (on Linux x86-64 the CUDA
  build, about 4 GB: PyTorch's CPU index cannot be reached from CI's machine), through the host's uv cache.

Podman's layer cache makes a rebuild with nothing changed take seconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from deploy.containers.engine import HERE, REPO, STATE, EngineError, podman

log = logging.getLogger(__name__)

BASE = "localhost/fraud-debian-python:bookworm"
KAFKA = "localhost/fraud-kafka:4.3.1"
PROMETHEUS = "localhost/fraud-prometheus:v3.5.0"
UV = "localhost/fraud-uv:0.13.9"
WORKER = "localhost/fraud-pipeline:0.1.0"
TRAINER = "localhost/fraud-pipeline-trainer:0.1.0"
TOOLS = REPO / ".cache" / "tools" / "bin"
COMPOSE = TOOLS / "docker-compose"
# Docker Compose, built from the Go module proxy (no release binaries can be downloaded here).
COMPOSE_MODULE = "github.com/docker/compose/v5"
COMPOSE_VERSION = "v5.6.0"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")


def _timed(what: str, fn, *args):  # type: ignore[no-untyped-def]
    began = time.monotonic()
    result = fn(*args)
    log.info("%s: %.1f s", what, time.monotonic() - began)
    return result


def exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def build_base() -> None:
    """Debian 12 minbase with python3, imported as an image (skipped when it exists)."""
    if exists(BASE):
        return
    root = STATE / "rootfs"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    done = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,ca-certificates", "bookworm",
                           str(root), DEBIAN_MIRROR], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise EngineError(f"debootstrap failed: {(done.stdout + done.stderr)[-1500:]}")
    tarball = STATE / "rootfs.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(root, arcname=".")
    podman("import", "--change", 'CMD ["/bin/bash"]', str(tarball), BASE, timeout=600)
    tarball.unlink()
    shutil.rmtree(root, ignore_errors=True)


def _context(name: str, files: dict[str, Path]) -> Path:
    """A build context in .cache/containers: the stand-in's folder plus the named files (copied, not linked)."""
    ctx = STATE / f"context-{name}"
    shutil.rmtree(ctx, ignore_errors=True)
    shutil.copytree(HERE / name, ctx)
    for target, source in files.items():
        if source.is_dir():
            shutil.copytree(source, ctx / target, ignore=shutil.ignore_patterns(".*"))
        else:
            shutil.copy2(source.resolve(), ctx / target)
    return ctx


# Docker's image format, not Podman's default OCI one: OCI images have no HEALTHCHECK (Podman drops it with a
# warning), and without it no compose `service_healthy` condition on the worker could ever hold.
FORMAT = ("--format", "docker")


def build(tag: str, context: Path, *args: str) -> None:
    podman("build", "--quiet", "--layers", *FORMAT, "--build-arg", f"BASE_IMAGE={BASE}", "-t", tag, *args,
           str(context), timeout=3600)


def build_standins() -> None:
    from deploy.kafka.local import LocalKafka

    libs = LocalKafka().ensure_libs()
    build(KAFKA, _context("kafka", {"libs": libs}))
    for tool in ("prometheus", "promtool"):
        if not (TOOLS / tool).exists():
            raise EngineError(f"no {TOOLS / tool}: `make tools` builds it")
    build(PROMETHEUS, _context("prometheus", {"prometheus": TOOLS / "prometheus", "promtool": TOOLS / "promtool",
                                              "prometheus.yml": REPO / "deploy" / "prometheus" / "prometheus.yml"}))
    build(UV, _context("uv", {"uv": uv()}))


def uv() -> Path:
    """The uv beside this Python (the Makefile installs it into .venv), else the one on PATH."""
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found is None:
        raise EngineError("no uv next to this Python or on PATH (the Makefile installs it into .venv)")
    return Path(found)


def uv_cache() -> Path | None:
    done = subprocess.run([str(uv()), "cache", "dir"], capture_output=True, text=True, check=False)
    path = Path(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else None
    return path if path and path.is_dir() else None


def product_build_args() -> list[str]:
    """deploy/Dockerfile's build arguments for a machine without registries (see the module docstring)."""
    args = [f"BUILDER_IMAGE={BASE}", f"BASE_IMAGE={BASE}", f"UV_IMAGE={UV}", "PYTHON_SOURCE=system",
            f"TORCH_INDEX_URL={os.environ.get('TORCH_INDEX_URL', 'https://pypi.org/simple')}"]
    flags = [f for arg in args for f in ("--build-arg", arg)]
    bundle = Path(os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
    if bundle.is_file():  # the host's trust (a TLS-inspecting proxy's CA included), for the downloads only
        flags += ["--build-arg", "CA_BUNDLE=/run/ca-bundle.crt", "-v", f"{bundle.resolve()}:/run/ca-bundle.crt:ro"]
    cache = uv_cache()
    if cache is not None:
        flags += ["--build-arg", "UV_NO_CACHE=0", "-v", f"{cache}:/root/.cache/uv"]
    return flags


def build_product() -> None:
    dockerfile, args = str(REPO / "deploy" / "Dockerfile"), product_build_args()
    for tag, target in ((WORKER, "worker"), (TRAINER, "trainer")):
        podman("build", "--layers", *FORMAT, "-f", dockerfile, "--target", target, "-t", tag, *args, str(REPO),
               timeout=3600, capture=False)
    # The images a rebuild replaced, and the builder stage's, hold gigabytes each: drop the untagged ones. The
    # layers the tagged images are made of (PyTorch's among them) stay, and with them the build cache.
    podman("image", "prune", "--force", timeout=600)


def build_compose() -> Path:
    """Docker Compose from the Go module proxy into .cache/tools/bin (kept; rebuilt when the version changes)."""
    stamp = TOOLS / f".docker-compose-{COMPOSE_VERSION}"
    if COMPOSE.exists() and stamp.exists():
        return COMPOSE
    if shutil.which("go") is None:
        raise EngineError("building Docker Compose needs Go on PATH")
    done = subprocess.run(["go", "mod", "download", "-json", f"{COMPOSE_MODULE}@{COMPOSE_VERSION}"],
                          capture_output=True, text=True, check=False, cwd=STATE.parent)
    if done.returncode != 0:
        raise EngineError(f"go mod download {COMPOSE_MODULE}@{COMPOSE_VERSION}: {done.stderr[-1500:]}")
    module = Path(json.loads(done.stdout)["Dir"])
    # Built inside a copy of the module: its go.mod's exclude directives forbid `go install pkg@version`.
    src = STATE / "compose-src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(module, src)
    for path in src.rglob("*"):
        path.chmod(path.stat().st_mode | 0o200)
    TOOLS.mkdir(parents=True, exist_ok=True)
    ldflags = f"-s -w -X {COMPOSE_MODULE}/internal.Version={COMPOSE_VERSION}"
    done = subprocess.run(["go", "build", "-trimpath", "-ldflags", ldflags, "-o", str(COMPOSE), "./cmd"],
                          cwd=src, capture_output=True, text=True, check=False)
    shutil.rmtree(src, ignore_errors=True)
    if done.returncode != 0:
        raise EngineError(f"go build docker compose: {done.stderr[-1500:]}")
    for old in TOOLS.glob(".docker-compose-*"):
        old.unlink()
    stamp.touch()
    return COMPOSE


def build_all() -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    _timed("docker compose", build_compose)
    _timed(f"base image {BASE}", build_base)
    _timed("stand-in images (kafka, prometheus, uv)", build_standins)
    _timed(f"product images {WORKER}, {TRAINER}", build_product)
