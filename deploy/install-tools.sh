#!/usr/bin/env bash
# Installs the system tools `make test` drives for real, where they are missing:
# kcat (independent Kafka client), prometheus (the server the observability test scrapes a live
# worker with), Java 17+ and Maven (local broker) from Debian's packages; and promtool of the
# same release as the Prometheus that docker-compose.yml runs (Debian's is 2.x), built from the
# Prometheus Go module at that release and cached in .cache/tools/prometheus-VERSION/promtool
# (linked as .cache/tools/bin/promtool); and compose-config (deploy/compose-config: the loader
# of `docker compose config`, which needs no Docker engine) in .cache/tools/bin/compose-config.
# `install-tools.sh --go-only`: only the two Go-built tools.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin="$repo/.cache/tools/bin"

need=()
if [ "${1:-}" != --go-only ]; then
  command -v kcat >/dev/null || need+=(kcat)
  command -v prometheus >/dev/null || need+=(prometheus)
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

if ! command -v go >/dev/null; then
  echo "install-tools: building promtool and compose-config needs Go 1.21 or later on PATH" \
       "(Debian 12's golang-go is 1.19: install a newer Go, e.g. golang-1.23 from bookworm-backports)" >&2
  exit 1
fi
mkdir -p "$bin"

# compose-config: rebuilt when its source changes (Go's build cache makes that seconds).
source_dir="$repo/deploy/compose-config"
if [ ! -x "$bin/compose-config" ] || [ -n "$(find "$source_dir" -newer "$bin/compose-config" -type f)" ]; then
  (cd "$source_dir" && GOFLAGS=-mod=readonly go build -trimpath -o "$bin/compose-config" .)
fi

# promtool: the release is the prom/prometheus tag in docker-compose.yml, so the two move together.
version=$(sed -n 's|^ *image: prom/prometheus:v\([0-9][0-9.]*\) *$|\1|p' "$repo/docker-compose.yml" | head -n 1)
[ -n "$version" ] || { echo "install-tools: no prom/prometheus:vX.Y.Z image in docker-compose.yml" >&2; exit 1; }
promtool="$repo/.cache/tools/prometheus-$version/promtool"
link() { ln -sfn "../prometheus-$version/promtool" "$bin/promtool"; }
[ -x "$promtool" ] && { link; exit 0; }

# Prometheus X.Y.Z is the Go module version v0.(100*X+Y).Z (3.5.0: v0.305.0). `go install
# module/cmd/promtool@version` refuses the module (its go.mod has a replace directive), so build
# inside the downloaded module instead. Go 1.21+ fetches the toolchain the module asks for.
IFS=. read -r major minor patch <<<"$version"
module="github.com/prometheus/prometheus@v0.$((major * 100 + minor)).$patch"
echo "install-tools: building promtool $version from $module (once; a few minutes)" >&2
started=$SECONDS
dir=$(go mod download -json "$module" | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
mkdir -p "$(dirname "$promtool")"
ldflags="-s -w -X github.com/prometheus/common/version.Version=$version"
ldflags+=" -X github.com/prometheus/common/version.Revision=${module#*@}"
ldflags+=" -X github.com/prometheus/common/version.Branch=HEAD"
(cd "$dir" && GOFLAGS=-mod=readonly go build -trimpath -ldflags "$ldflags" -o "$promtool.tmp" ./cmd/promtool)
mv "$promtool.tmp" "$promtool"
link
echo "install-tools: $("$promtool" --version | head -n 1) in $((SECONDS - started)) s: $promtool" >&2
