#!/usr/bin/env bash
# Fuzz the API from its own OpenAPI document with schemathesis.
#
# Starts `custodian serve` (dev, a fresh SQLite database in a temporary directory),
# creates an admin account with the CLI, signs it in, and runs schemathesis against
# /api/openapi.json with that session token: every phase (examples, coverage, fuzzing,
# and stateful sequences that follow the document's links from each created resource to
# the operations on it), and the checks that the server never answers 5xx and that
# every status, content type, header and body conforms to the document. Passes with no
# failure, no ERROR in the server's log, and its own account neither locked nor signed
# out.
#
# Deterministic: the same binary gets the same test cases on every run.
#
# Environment: CUSTODIAN_BIN (default target/debug/custodian), FUZZ_EXAMPLES (test cases
# per operation and phase, default 100), FUZZ_VENV (default target/fuzz/venv;
# schemathesis is installed there at the version pinned in tests/fuzz/requirements.txt),
# FUZZ_KEEP=1 to keep the server's directory (its log and database) for a look after.
set -euo pipefail
cd "$(dirname "$0")/../.."

bin="${CUSTODIAN_BIN:-$PWD/target/debug/custodian}"
venv="${FUZZ_VENV:-$PWD/target/fuzz/venv}"
examples="${FUZZ_EXAMPLES:-100}"
requirements="$PWD/tests/fuzz/requirements.txt"
pinned=$(grep -E '^schemathesis==' "$requirements")

if [ ! -x "$venv/bin/schemathesis" ] || ! "$venv/bin/python" -m pip freeze 2>/dev/null | grep -qx "$pinned"; then
  echo "installing $pinned into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
fi

work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [ -n "${FUZZ_KEEP:-}" ]; then echo "fuzz: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# The server under test: dev, its own data directory, nothing from the caller's
# CUSTODIAN_* variables. Rate limits off: the fuzzer sends as fast as the server
# answers, and 429s would only hide the answers it came to check.
# `run --exec …` replaces the (background) subshell with the server, so that its pid is
# the server's own and the cleanup's kill reaches it.
run() {
  local ex=()
  if [ "${1:-}" = --exec ]; then ex=(exec); shift; fi
  "${ex[@]}" env $(compgen -e | grep '^CUSTODIAN_' | sed 's/^/-u /') \
    CUSTODIAN_ENV=dev CUSTODIAN_DATA_DIR="$work" CUSTODIAN_RATE_LIMIT__ENABLED=false \
    CUSTODIAN_LOGGING__FORMAT=json "$bin" "$@"
}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"

password="Fuzz-$(python3 -c 'import secrets; print(secrets.token_hex(12))')-9!"
run migrate >/dev/null 2>"$work/cli.log" || { cat "$work/cli.log"; exit 1; }
printf '%s\n' "$password" | run user create --username fuzz-admin --role admin --password-stdin \
  >/dev/null 2>"$work/cli.log" || { cat "$work/cli.log"; exit 1; }
run --exec serve --listen "127.0.0.1:$port" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 300); do
  curl -fsS "$base/health" >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; echo "the server did not start"; exit 1; }
  sleep 0.1
done

login=$(curl -fsS -H 'content-type: application/json' \
  --data "{\"username\":\"fuzz-admin\",\"password\":\"$password\"}" "$base/api/v1/auth/login")
token=$(printf '%s' "$login" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')

# Operations left out, each because it would end the fuzzer's own sign-in (the run
# must not lock out or sign out the account it runs as):
# - logout / logout-all revoke the token in use;
# - a password change, or an administrator's reset, of the signed-in account ends its
#   sessions (and wrong current passwords would count towards its lockout);
# - ending sessions by id, with ids the fuzzer reads from GET /sessions, would end its
#   own, and so would ending every credential of a user (POST /users/{id}/logout) with
#   its own id (a second-factor reset of itself is refused: it has no TOTP to reset);
# - TOTP enrolment and removal, and adding or removing a passkey, re-authenticate with
#   the account's password: each wrong one counts towards the lockout, as it must, and
#   would lock the account. (Their other steps are fuzzed: the passkey list and answers.)
excluded=(
  --exclude-path /api/v1/auth/logout
  --exclude-path /api/v1/auth/logout-all
  --exclude-path /api/v1/auth/password
  --exclude-path /api/v1/users/{id}/password
  --exclude-path /api/v1/sessions/{id}
  --exclude-path /api/v1/users/{id}/logout
  --exclude-path /api/v1/auth/totp
  --exclude-path /api/v1/auth/totp/enroll
  --exclude-path /api/v1/auth/passkeys/register
  --exclude-path /api/v1/auth/passkeys/{id}
)

status=0
config="$PWD/tests/fuzz/schemathesis.toml"
# From the temporary directory: schemathesis and Hypothesis keep their caches in the
# working directory, and a run should not depend on the one before.
(cd "$work" && "$venv/bin/schemathesis" --config-file "$config" --no-color \
  run "$base/api/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
  --phases examples,coverage,fuzzing,stateful \
  --max-examples "$examples" --generation-deterministic \
  --workers 2 --request-timeout 30 \
  "${excluded[@]}") || status=$?

# The account the fuzzer ran as is not locked, and its session still works. (Its
# address may be: the fuzzer's sign-ins with made-up usernames trip the per-address
# block, lockout.ip_max_failures, as they should.)
me=$(curl -sS -H "Authorization: Bearer $token" "$base/api/v1/users?q=fuzz-admin") || me=""
if ! printf '%s' "$me" | python3 -c '
import json, sys
users = [u for u in json.load(sys.stdin)["items"] if u["username"] == "fuzz-admin"]
sys.exit(0 if users and users[0]["active"] and users[0]["locked_until"] is None else 1)'; then
  echo "fuzz: the fuzzer's own account is locked, deactivated or signed out: $me"
  status=1
fi
if grep -q '"level":"ERROR"' "$work/server.log"; then
  echo "fuzz: the server logged errors:"
  grep '"level":"ERROR"' "$work/server.log" | head -20
  status=1
fi
if [ "$status" != 0 ]; then
  echo "fuzz: the server's log ends:"
  tail -n 30 "$work/server.log"
fi
exit "$status"
