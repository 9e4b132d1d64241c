#!/usr/bin/env bash
# The whole test suite: what CI runs and what the README's second command runs. Installs
# what it needs first (skipping what is present), then checks formatting and lints, runs
# every test, and build-checks the fuzz targets.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# Building: librdkafka (bundled, built with configure and make) and OpenSSL (the system's).
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v make >/dev/null 2>&1 || need_apt+=(make)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || need_apt+=(libssl-dev)
[ -f /usr/include/zlib.h ] || need_apt+=(zlib1g-dev)
# The oracle test runs an independent model of the rules in Python.
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
# The PID 1 test starts the daemon in its own PID namespace.
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
# The daemon tests signal the real binary with kill(1) (SIGTERM, SIGHUP).
[ -x /bin/kill ] || [ -x /usr/bin/kill ] || need_apt+=(procps)
# The alertmanager sink is tested against the real Alertmanager.
command -v prometheus-alertmanager >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)
# Dashboards are evaluated against the real Prometheus; promtool checks metrics and rules.
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
# Sinks behind an HTTP proxy are tested through a real one.
command -v tinyproxy >/dev/null 2>&1 || need_apt+=(tinyproxy)
# The /ui page is driven in a real headless browser.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
# The Kafka tests run against a real Kafka-protocol broker, tansu (a 20-30 minute build
# on 2 cores the first time; skipped when that version is on PATH).
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! tansu --version 2>/dev/null | grep -qx 'tansu 0.6.0'; then
  echo "==> installing tansu 0.6.0 (Kafka-protocol broker for the tests)"
  cargo install tansu --version 0.6.0 --locked --features dynostore,libsql
fi
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    echo "==> installing rust component $comp"
    rustup component add "$comp"
  fi
done

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "==> fuzz targets build check"
cargo check --manifest-path fuzz/Cargo.toml --locked --bins
echo "==> cargo test"
cargo test --locked --all-targets
echo "==> sagawatch test rules/tests"
cargo run --locked --quiet -- test rules/tests
