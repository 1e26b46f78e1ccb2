#!/usr/bin/env bash
# Installs the system tools `make test` drives for real, where they are missing:
# kcat (independent Kafka client), prometheus + promtool, Java 17+ and Maven (local broker).
set -euo pipefail
need=()
command -v kcat >/dev/null || need+=(kcat)
command -v prometheus >/dev/null || need+=(prometheus)
command -v promtool >/dev/null || need+=(prometheus)
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
[ ${#need[@]} -eq 0 ] && exit 0
readarray -t need < <(printf '%s\n' "${need[@]}" | sort -u)
echo "install-tools: installing ${need[*]} from Debian's packages" >&2
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
  echo "install-tools: need root or sudo to install: ${need[*]}" >&2; exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
