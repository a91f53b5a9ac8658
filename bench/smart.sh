#!/usr/bin/env bash
# The SMART authorization server against the release binary, on SQLite and (when it
# answers) PostgreSQL: the token endpoint (code exchange, refresh) and a FHIR read made
# with an app's access token, next to the same read with a personal API token and with
# a session, in the same run.
#
# For each backend, on a fresh data directory (and database):
#  1. PATIENTS synthetic patients (bench/fhir_seed.py, one Observation each); an app
#     registered (public); CODES authorization codes made through the real pages (the
#     doctor signed in, one authorization request and one consent each:
#     bench/smart_codes.py), a personal API token, and two app access tokens (user/ and
#     patient/ scopes).
#  2. wrk (THREADS, CONNECTIONS), each row one run:
#       GET /health                                   the in-run baseline
#       GET /fhir/Patient/{id}  personal API token    cycling over SAMPLE patients
#       GET /fhir/Patient/{id}  app token, user/Patient.rs
#       GET /fhir/Patient/{id}  personal API token    one patient
#       GET /fhir/Patient/{id}  app token, patient/Patient.rs (its launch patient)
#       (the pairs are run ROUNDS times, interleaved, against noise)
#     and first, right after the codes are made:
#       POST /oauth/token authorization_code           each request a fresh code
#                                                      (TOKEN_DURATION; CODES must outlast it)
#       POST /oauth/token refresh_token                each a fresh refresh token (those
#                                                      the exchanges answered)
#     Each row: req/s, p50, p99 (wrk), the server's CPU time per request.
#
# Usage: bench/smart.sh   PATIENTS=2000 CODES=15000 DURATION=10s CONNECTIONS=32
#   SKIP_BUILD=1 BACKENDS="sqlite postgres" SAMPLE=1000 ROUNDS=2 (read pairs)
# Results (wrk output, table.md) go to bench/results/smart-<timestamp>/; the secrets the
# run made stay in its temporary directory, deleted at the end.
set -euo pipefail
PATIENTS="${PATIENTS:-2000}"
CODES="${CODES:-15000}"
DURATION="${DURATION:-10s}"
# The token runs spend one code or refresh token per request: CODES must outlast them.
TOKEN_DURATION="${TOKEN_DURATION:-5s}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-32}"
SAMPLE="${SAMPLE:-1000}"
BACKENDS="${BACKENDS:-sqlite postgres}"
NAME=smart
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PASSWORD='Correct-Horse-Staple-9!'
VERIFIER="bench-verifier-$(python3 -c 'import secrets; print(secrets.token_hex(24))')"

{
    echo "| backend | endpoint | credential | req/s | p50 | p99 | server CPU µs/req |"
    echo "|---|---|---|---:|---:|---:|---:|"
} >"$OUT/table.md"

# A wrk script posting one form per line of a file, each line once, split between the
# threads; a thread stops when its lines run out. With SAVE, the `refresh_token` of each
# answer is appended to SAVE.<thread>.
token_lua() {
    local file="$1" field="$2" extra="$3" save="${4:-}"
    cat <<LUA
local lines, threads = {}, {}
for l in io.lines("$file") do lines[#lines + 1] = l end
local n = 0
setup = function(thread)
  n = n + 1
  thread:set("id", n)
  thread:set("count", $THREADS)
  threads[#threads + 1] = thread
end
local mine, i, out
init = function()
  mine = {}
  for k = id, #lines, count do mine[#mine + 1] = lines[k] end
  i = 0
  if "$save" ~= "" then out = io.open("$save." .. id, "w") end
end
request = function()
  i = i + 1
  local v = mine[i]
  if v == nil then wrk.thread:stop(); v = "spent" end
  return wrk.format("POST", "/oauth/token", {["content-type"] = "application/x-www-form-urlencoded"},
    "$field=" .. v .. "$extra")
end
response = function(status, headers, body)
  if out ~= nil and status == 200 then
    local r = body:match('"refresh_token":"([^"]+)"')
    if r then out:write(r, "\n"); out:flush() end
  end
end
LUA
}

setup() {
    export CUSTODIAN_SERVER__MAX_BODY=16MiB CUSTODIAN_OAUTH__BUILTIN_APP=false CUSTODIAN_OAUTH__CODE_TTL=10m
    printf '%s\n' "$PASSWORD" | "$BIN" --env dev user create --username bench --role doctor --password-stdin >/dev/null
    printf '%s\n' "$PASSWORD" | "$BIN" --env dev user create --username bench-admin --role admin --password-stdin >/dev/null
}

for backend in $BACKENDS; do
    bench_database "$backend" || continue
    bench_serve "$backend" setup
    login() {
        curl -fsS -X POST "$base/api/v1/auth/login" -H 'content-type: application/json' \
            -d "{\"username\":\"$1\",\"password\":\"$PASSWORD\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'
    }
    session="$(login bench)"
    admin="$(login bench-admin)"
    BASE="$base" TOKEN="$session" PATIENTS="$PATIENTS" OBS=1 PER_BUNDLE=50 SAMPLE="$SAMPLE" \
        OUTDIR="$DATA/lua" python3 "$ROOT/bench/fhir_seed.py"
    client_id="$(curl -fsS -X POST "$base/api/v1/apps" -H "authorization: Bearer $admin" -H 'content-type: application/json' \
        -d '{"name":"bench","redirect_uris":["http://127.0.0.1:9/cb"],"scopes":"launch/patient offline_access user/Patient.rs patient/Patient.rs"}' \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["client_id"])')"
    one="$(python3 -c "import re; print(re.findall(r'\"(/fhir/Patient/[^\"]+)\"', open('$DATA/lua/fhir_read.lua').read())[0].rsplit('/', 1)[1])")"
    start=$(date +%s.%N)
    BASE="$base" USER=bench PASSWORD="$PASSWORD" SESSION="$session" CLIENT_ID="$client_id" VERIFIER="$VERIFIER" \
        CODES="$CODES" CODES_FILE="$DATA/codes" TOKENS_FILE="$DATA/tokens.json" PATIENT="$one" \
        python3 "$ROOT/bench/smart_codes.py"
    end=$(date +%s.%N)
    echo "$backend: $CODES codes through the pages in $(python3 -c "print(round($end-$start,1))") s" | tee -a "$OUT/seed.txt"
    tok() { python3 -c "import json; print(json.load(open('$DATA/tokens.json'))['$1'])"; }
    api_token="$(tok api_token)"
    user_access="$(tok user_access)"
    patient_access="$(tok patient_access)"
    printf 'request = function() return wrk.format("GET", "/fhir/Patient/%s") end\n' "$one" >"$DATA/one.lua"

    run() {
        local name="$1" cred="$2" lua="$3" header="$4" duration="${5:-$DURATION}" before after reqs file
        file="$OUT/$backend-$(printf '%s %s' "$name" "$cred" | tr -c 'A-Za-z0-9' '_').txt"
        before="$(cpu_ticks "$pid")"
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"$duration" --latency ${header:+-H "$header"} \
            -s "$lua" "$base" >"$file" 2>&1
        after="$(cpu_ticks "$pid")"
        reqs="$(awk '/requests in/ {print $1}' "$file")"
        local rps p50 p99 cpu
        rps="$(awk '/Requests\/sec/ {print $2}' "$file")"
        p50="$(awk '$1=="50%" {print $2}' "$file")"
        p99="$(awk '$1=="99%" {print $2}' "$file")"
        cpu="$(python3 -c "print(round(($after-$before)/$TICK*1e6/max($reqs,1)))")"
        non2xx="$(awk '/Non-2xx/ {print $NF}' "$file")"
        [[ -z "$non2xx" ]] || echo "note: $backend $name $cred: $non2xx non-2xx answers" | tee -a "$OUT/seed.txt"
        if [[ -n "${6:-}" && "$reqs" -ge "$(wc -l <"$6")" ]]; then
            echo "warning: $backend $name: its $(wc -l <"$6") codes or tokens ran out before the run ended (req/s is a floor); raise CODES" | tee -a "$OUT/seed.txt"
        fi
        echo "| $backend | $name | $cred | $rps | $p50 | $p99 | $cpu |" | tee -a "$OUT/table.md"
    }
    token_lua "$DATA/codes" code "&grant_type=authorization_code&redirect_uri=http%3A%2F%2F127.0.0.1%3A9%2Fcb&client_id=$client_id&code_verifier=$VERIFIER" "$DATA/refresh" >"$DATA/exchange.lua"
    run "POST /oauth/token (code)" "public app" "$DATA/exchange.lua" "" "$TOKEN_DURATION" "$DATA/codes"
    cat "$DATA"/refresh.* >"$DATA/refresh"
    echo "$backend: $(wc -l <"$DATA/refresh") refresh tokens from the exchanges" | tee -a "$OUT/seed.txt"
    token_lua "$DATA/refresh" refresh_token "&grant_type=refresh_token&client_id=$client_id" >"$DATA/refresh.lua"
    run "POST /oauth/token (refresh)" "public app" "$DATA/refresh.lua" "" "$TOKEN_DURATION" "$DATA/refresh"
    run "GET /health" "none" "$DATA/lua/health.lua" ""
    for round in $(seq 1 "${ROUNDS:-2}"); do
        run "GET /fhir/Patient/{id} (SAMPLE patients)" "API token" "$DATA/lua/fhir_read.lua" "authorization: Bearer $api_token"
        run "GET /fhir/Patient/{id} (SAMPLE patients)" "app, user/Patient.rs" "$DATA/lua/fhir_read.lua" "authorization: Bearer $user_access"
        run "GET /fhir/Patient/{id} (one patient)" "API token" "$DATA/one.lua" "authorization: Bearer $api_token"
        run "GET /fhir/Patient/{id} (one patient)" "app, patient/Patient.rs" "$DATA/one.lua" "authorization: Bearer $patient_access"
    done
    bench_stop
done
echo
cat "$OUT/table.md"
echo "results: $OUT"
