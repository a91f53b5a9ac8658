#!/usr/bin/env bash
# Sign-in with a passkey alone against sign-in with a password, on the release binary,
# on SQLite and (when it answers) PostgreSQL, with GET /health as the in-run baseline.
#
# For each backend, on a fresh data directory (and database):
#  1. two users: one signs in with its password (argon2id, the default parameters), the
#     other gets a passkey of a software authenticator (bench/passkey_answers.py, ES256,
#     python3 `cryptography`), and ANSWERS sign-in challenges are made and answered
#     ahead of time (each challenge is single use).
#  2. wrk (THREADS, CONNECTIONS), each row one run:
#       GET /health                              the in-run baseline
#       POST /api/v1/auth/login                  username + password
#       POST /api/v1/auth/passkey/login          each request a fresh answer
#                                                (PASSKEY_DURATION; ANSWERS must outlast it)
#       GET /api/v1/auth/me  a session signed in with a password (role nurse)
#       GET /api/v1/auth/me  a session signed in with the passkey (role admin, under
#                            mfa.phishing_resistant_roles: two more reads per request,
#                            whether the user has a passkey and how the session signed in)
#     Each row: req/s, p50, p99 (wrk), the server's CPU time per request, and how many
#     answers were not 200.
#
# Usage: bench/passkeys.sh   ANSWERS=8000 DURATION=10s PASSKEY_DURATION=4s CONNECTIONS=16
#   SKIP_BUILD=1 BACKENDS="sqlite postgres"
# Results (wrk output, table.md) go to bench/results/passkeys-<timestamp>/; the answers
# and tokens stay in its temporary directory, deleted at the end.
set -euo pipefail
ANSWERS="${ANSWERS:-8000}"
DURATION="${DURATION:-10s}"
PASSKEY_DURATION="${PASSKEY_DURATION:-4s}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-16}"
BACKENDS="${BACKENDS:-sqlite postgres}"
NAME=passkeys
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
python3 -c 'import cryptography' 2>/dev/null || die "python3's cryptography package is missing (apt-get install python3-cryptography)"
PASSWORD='Correct-Horse-Staple-9!'

{
    echo "| backend | endpoint | req/s | p50 | p99 | server CPU µs/req | not 200 |"
    echo "|---|---|---:|---:|---:|---:|---:|"
} >"$OUT/table.md"

setup() {
    # Dev's relying party: http://localhost on any port.
    export CUSTODIAN_PASSKEYS__CHALLENGE_TTL=10m CUSTODIAN_MFA__PHISHING_RESISTANT_ROLES=admin
    printf '%s\n' "$PASSWORD" | "$BIN" --env dev user create --username bench-password --role nurse --password-stdin >/dev/null
    printf '%s\n' "$PASSWORD" | "$BIN" --env dev user create --username bench-passkey --role admin --password-stdin >/dev/null
}

for backend in $BACKENDS; do
    bench_database "$backend" || continue
    bench_serve "$backend" setup
    session="$(curl -fsS -X POST "$base/api/v1/auth/login" -H 'content-type: application/json' \
        -d "{\"username\":\"bench-passkey\",\"password\":\"$PASSWORD\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')"
    start=$(date +%s.%N)
    BASE="http://localhost:$port" SESSION="$session" COUNT="$ANSWERS" ANSWERS_FILE="$DATA/answers" \
        python3 "$ROOT/bench/passkey_answers.py"
    end=$(date +%s.%N)
    echo "$backend: $ANSWERS challenges made and answered in $(python3 -c "print(round($end-$start,1))") s" | tee -a "$OUT/seed.txt"

    # One answer spent on a session for the GET /api/v1/auth/me pair, and one password
    # session.
    passkey_session="$(head -n1 "$DATA/answers" | curl -fsS -X POST "$base/api/v1/auth/passkey/login" \
        -H 'content-type: application/json' --data-binary @- | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')"
    sed -i 1d "$DATA/answers"
    password_session="$(curl -fsS -X POST "$base/api/v1/auth/login" -H 'content-type: application/json' \
        -d "{\"username\":\"bench-password\",\"password\":\"$PASSWORD\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')"
    curl -fsS -o /dev/null -H "authorization: Bearer $passkey_session" "$base/api/v1/users" \
        || die "the passkey session of a role under mfa.phishing_resistant_roles was refused"

    # Each answer once, split between the threads.
    cat >"$DATA/passkey.lua" <<LUA
local lines, n = {}, 0
for l in io.lines("$DATA/answers") do lines[#lines + 1] = l end
setup = function(thread) n = n + 1; thread:set("id", n); thread:set("count", $THREADS) end
local mine, i
init = function()
  mine = {}
  for k = id, #lines, count do mine[#mine + 1] = lines[k] end
  i = 0
end
request = function()
  i = i + 1
  local v = mine[i]
  if v == nil then wrk.thread:stop(); v = "{}" end
  return wrk.format("POST", "/api/v1/auth/passkey/login", {["content-type"] = "application/json"}, v)
end
LUA
    cat >"$DATA/password.lua" <<LUA
local body = '{"username":"bench-password","password":"$PASSWORD"}'
request = function()
  return wrk.format("POST", "/api/v1/auth/login", {["content-type"] = "application/json"}, body)
end
LUA
    echo 'request = function() return wrk.format("GET", "/health") end' >"$DATA/health.lua"

    echo 'request = function() return wrk.format("GET", "/api/v1/auth/me") end' >"$DATA/me.lua"

    run() {
        local name="$1" lua="$2" duration="${3:-$DURATION}" before after reqs file rps p50 p99 cpu non2xx
        file="$OUT/$backend-$(printf '%s' "$name" | tr -c 'A-Za-z0-9' '_').txt"
        before="$(cpu_ticks "$pid")"
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"$duration" --latency ${5:+-H "$5"} -s "$lua" "$base" >"$file" 2>&1
        after="$(cpu_ticks "$pid")"
        reqs="$(awk '/requests in/ {print $1}' "$file")"
        rps="$(awk '/Requests\/sec/ {print $2}' "$file")"
        p50="$(awk '$1=="50%" {print $2}' "$file")"
        p99="$(awk '$1=="99%" {print $2}' "$file")"
        cpu="$(python3 -c "print(round(($after-$before)/$TICK*1e6/max($reqs,1)))")"
        non2xx="$(awk '/Non-2xx/ {print $NF}' "$file")"
        if [[ -n "${4:-}" && "$reqs" -ge "$(wc -l <"$4")" ]]; then
            echo "warning: $backend $name: its $(wc -l <"$4") answers ran out before the run ended (req/s is a floor); raise ANSWERS" | tee -a "$OUT/seed.txt"
        fi
        echo "| $backend | $name | $rps | $p50 | $p99 | $cpu | ${non2xx:-0} |" | tee -a "$OUT/table.md"
    }
    run "GET /health" "$DATA/health.lua"
    run "POST /api/v1/auth/passkey/login" "$DATA/passkey.lua" "$PASSKEY_DURATION" "$DATA/answers"
    run "POST /api/v1/auth/login (password)" "$DATA/password.lua"
    for round in 1 2; do
        run "GET /api/v1/auth/me, password session, nurse" "$DATA/me.lua" "" "" "authorization: Bearer $password_session"
        run "GET /api/v1/auth/me, passkey session, admin under the policy" "$DATA/me.lua" "" "" "authorization: Bearer $passkey_session"
    done
    bench_stop
done
echo
cat "$OUT/table.md"
echo "results: $OUT"
