#!/usr/bin/env bash
# Browser tests of the web pages: installs the pinned npm packages (npm ci), builds the
# server if needed, and runs the admin, SMART app, clinician workspace and SMART launch
# tests (tests/browser/*.test.mjs, listed below) against the system Chromium (Playwright
# downloads no browser). Exits non-zero on any failure.
#
#   bash tests/browser/run.sh
#
# Environment: CUSTODIAN_BIN (a prebuilt binary: skips the cargo build), CHROMIUM (the
# browser, default /usr/bin/chromium). Screenshots go to docs/screenshots/.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

chromium="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
  echo "== installing Chromium (Debian package)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
fi

echo "== npm ci (tests/browser)"
(cd "$here" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)

if [ -z "${CUSTODIAN_BIN:-}" ]; then
  echo "== cargo build --bin custodian"
  # A no-op when the binary is up to date; waits for another cargo's lock if one runs.
  (cd "$root" && cargo build --locked --bin custodian)
  target="${CARGO_TARGET_DIR:-target}"
  case "$target" in /*) ;; *) target="$root/$target" ;; esac
  export CUSTODIAN_BIN="$target/debug/custodian"
fi

echo "== browser tests"
cd "$here"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
node --test --test-concurrency=1 --test-reporter=spec admin.test.mjs smart.test.mjs clinic.test.mjs smart-server.test.mjs passkeys.test.mjs portal.test.mjs 2>&1 | tee "$log"
status="${PIPESTATUS[0]}"
set -e
passed="$(sed -n 's/^ℹ pass \([0-9][0-9]*\)$/\1/p' "$log" | tail -n1)"
failed="$(sed -n 's/^ℹ fail \([0-9][0-9]*\)$/\1/p' "$log" | tail -n1)"
if [ "$status" = 0 ] && [ "${passed:-0}" = 0 ]; then
  echo "browser tests: no test ran" >&2
  status=1
fi
echo "browser: ${passed:-0} passed, ${failed:-0} failed"
exit "$status"
