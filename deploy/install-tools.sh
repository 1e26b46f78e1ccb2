#!/usr/bin/env bash
# Installs the tools `make test` drives for real, where they are missing. From Debian's
# packages: kcat (independent Kafka client), Java 17+ and Maven (local broker). Built with Go
# (1.21+) into .cache/tools, once per machine: the Prometheus server and promtool of the release
# docker-compose.yml runs (Debian's are 2.x), from the Prometheus Go module at that release,
# in .cache/tools/prometheus-VERSION/ (linked from .cache/tools/bin/); and compose-config
# (deploy/compose-config: the loader of `docker compose config`, no Docker engine needed).
# `install-tools.sh --go-only`: only the Go-built tools; `--system-only`: only the packages.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin="$repo/.cache/tools/bin"

need=()
if [ "${1:-}" != --go-only ]; then
  command -v kcat >/dev/null || need+=(kcat)
  command -v java >/dev/null || need+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || need+=(maven)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "install-tools: installing ${need[*]} from Debian's packages" >&2
  if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
    echo "install-tools: need root or sudo to install: ${need[*]}" >&2; exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

[ "${1:-}" = --system-only ] && exit 0
if ! command -v go >/dev/null; then
  echo "install-tools: building Prometheus, promtool and compose-config needs Go 1.21 or later on PATH" \
       "(Debian 12's golang-go is 1.19: install a newer Go, e.g. golang-1.23 from bookworm-backports)" >&2
  exit 1
fi
mkdir -p "$bin"

# compose-config: rebuilt when its source changes (Go's build cache makes that seconds).
source_dir="$repo/deploy/compose-config"
if [ ! -x "$bin/compose-config" ] || [ -n "$(find "$source_dir" -newer "$bin/compose-config" -type f)" ]; then
  (cd "$source_dir" && GOFLAGS=-mod=readonly go build -trimpath -o "$bin/compose-config" .)
fi

# Prometheus and promtool: the release is the prom/prometheus tag in docker-compose.yml, so the
# tests follow the stack.
version=$(sed -n 's|^ *image: prom/prometheus:v\([0-9][0-9.]*\) *$|\1|p' "$repo/docker-compose.yml" | head -n 1)
[ -n "$version" ] || { echo "install-tools: no prom/prometheus:vX.Y.Z image in docker-compose.yml" >&2; exit 1; }
out="$repo/.cache/tools/prometheus-$version"
missing=()
for tool in prometheus promtool; do
  [ -x "$out/$tool" ] || missing+=("$tool")
  ln -sfn "../prometheus-$version/$tool" "$bin/$tool"
done
[ ${#missing[@]} -eq 0 ] && exit 0

# Prometheus X.Y.Z is the Go module version v0.(100*X+Y).Z (3.5.0: v0.305.0). `go install
# module/cmd/promtool@version` refuses the module (its go.mod has a replace directive), so build
# inside the downloaded module instead. Go 1.21+ fetches the toolchain the module asks for.
# The server is built without its web UI's assets: its HTTP API (what the tests use) is whole.
IFS=. read -r major minor patch <<<"$version"
module="github.com/prometheus/prometheus@v0.$((major * 100 + minor)).$patch"
echo "install-tools: building ${missing[*]} $version from $module (once; minutes the first time)" >&2
started=$SECONDS
dir=$(go mod download -json "$module" | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
mkdir -p "$out"
ldflags="-s -w -X github.com/prometheus/common/version.Version=$version"
ldflags+=" -X github.com/prometheus/common/version.Revision=${module#*@}"
ldflags+=" -X github.com/prometheus/common/version.Branch=HEAD"
for tool in "${missing[@]}"; do
  (cd "$dir" && GOFLAGS=-mod=readonly go build -trimpath -ldflags "$ldflags" -o "$out/$tool.tmp" "./cmd/$tool")
  mv "$out/$tool.tmp" "$out/$tool"
  echo "install-tools: $("$out/$tool" --version | head -n 1)" >&2
done
echo "install-tools: built in $((SECONDS - started)) s: $out" >&2
