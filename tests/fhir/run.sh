#!/usr/bin/env bash
# The outside FHIR validator: every resource and Bundle the integration tests received
# (captured by tests/it/fhir_capture.rs into target/fhir-capture) is validated by an
# independent model library, fhir.resources (R4B models), plus checks Inferno makes of
# a server's answers (tests/fhir/validate.py). A self-test runs first: each good fixture
# must pass and each bad one must fail, so a validator that accepts anything fails too.
#
# Usage: tests/fhir/run.sh [DIR]      (default target/fhir-capture)
# Environment: FHIR_VENV (default target/fhir/venv; installed from
# tests/fhir/requirements.txt when the pinned version differs).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir="${1:-target/fhir-capture}"
venv="${FHIR_VENV:-$PWD/target/fhir/venv}"
requirements="$PWD/tests/fhir/requirements.txt"
pinned=$(grep -E '^fhir.resources==' "$requirements")
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m pip freeze 2>/dev/null | grep -qx "$pinned"; then
  echo "installing $pinned into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
fi
py="$venv/bin/python"
validate="$PWD/tests/fhir/validate.py"
"$py" "$validate" tests/fhir/selftest/good >/dev/null || { echo "fhir validator self-test: a good fixture failed"; "$py" "$validate" tests/fhir/selftest/good; exit 1; }
for f in tests/fhir/selftest/bad/*.json; do
  t=$(mktemp -d)
  cp "$f" "$t/"
  if "$py" "$validate" "$t" >/dev/null; then
    echo "fhir validator self-test: $f was accepted"
    rm -rf "$t"
    exit 1
  fi
  rm -rf "$t"
done
echo "fhir validator self-test: good fixtures pass, $(find tests/fhir/selftest/bad -name "*.json" | wc -l) bad ones fail"
"$py" "$validate" "$dir"
