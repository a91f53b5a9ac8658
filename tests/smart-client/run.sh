#!/usr/bin/env bash
# A real third-party SMART client drives a full standalone launch against the server:
# fhirclient (SMART's own Python client library, pinned in requirements.txt) discovers
# the endpoints from /fhir/metadata, builds the authorization URL with PKCE S256, and,
# after the sign-in and consent pages are filled in by scripted form posts, exchanges
# the code, reads the patient and their Observations, refreshes, and is refused after
# the person disconnects it (tests/smart-client/standalone.py).
#
# Starts `custodian serve` (dev, a fresh SQLite database in a temporary directory).
# Environment: CUSTODIAN_BIN (default target/debug/custodian), SMART_CLIENT_VENV
# (default target/smart-client/venv), SMART_CLIENT_KEEP=1 to keep the server's directory.
set -euo pipefail
cd "$(dirname "$0")/../.."

bin="${CUSTODIAN_BIN:-$PWD/target/debug/custodian}"
venv="${SMART_CLIENT_VENV:-$PWD/target/smart-client/venv}"
requirements="$PWD/tests/smart-client/requirements.txt"
pinned=$(grep -E '^fhirclient==' "$requirements")
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m pip freeze 2>/dev/null | grep -qx "$pinned"; then
  echo "installing $pinned into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
fi

work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [ -n "${SMART_CLIENT_KEEP:-}" ]; then echo "smart-client: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# The server under test: dev, its own data directory, none of the caller's CUSTODIAN_*.
run() {
  local ex=()
  if [ "${1:-}" = --exec ]; then ex=(exec); shift; fi
  "${ex[@]}" env $(compgen -e | grep '^CUSTODIAN_' | sed 's/^/-u /') \
    CUSTODIAN_ENV=dev CUSTODIAN_DATA_DIR="$work" CUSTODIAN_LOGGING__FORMAT=json "$bin" "$@"
}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
admin_pw="Smart-$(python3 -c 'import secrets; print(secrets.token_hex(12))')-9!"
doctor_pw="Smart-$(python3 -c 'import secrets; print(secrets.token_hex(12))')-8!"
run migrate >/dev/null 2>"$work/cli.log" || { cat "$work/cli.log"; exit 1; }
printf '%s\n' "$admin_pw" | run user create --username sc-admin --role admin --password-stdin \
  >/dev/null 2>"$work/cli.log" || { cat "$work/cli.log"; exit 1; }
printf '%s\n' "$doctor_pw" | run user create --username sc-doctor --role doctor --password-stdin \
  >/dev/null 2>"$work/cli.log" || { cat "$work/cli.log"; exit 1; }
run --exec serve --listen "127.0.0.1:$port" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 300); do
  python3 -c "import urllib.request,sys; urllib.request.urlopen('$base/health', timeout=1)" 2>/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; echo "the server did not start"; exit 1; }
  sleep 0.1
done

status=0
"$venv/bin/python" tests/smart-client/standalone.py "$base" sc-admin "$admin_pw" sc-doctor "$doctor_pw" || status=$?
if grep -q '"level":"ERROR"' "$work/server.log"; then
  echo "smart-client: the server logged errors:"
  grep '"level":"ERROR"' "$work/server.log" | head -20
  status=1
fi
if [ "$status" != 0 ]; then
  echo "smart-client: the server's log ends:"
  tail -n 30 "$work/server.log"
fi
exit "$status"
