#!/usr/bin/env bash
# FHIR reads and searches against the release binary, on SQLite and (when it answers)
# PostgreSQL, in the same run as /health and the /api/v1 patient read.
#
# For each backend, on a fresh data directory (and database):
#  1. Seeding: PATIENTS synthetic patients with OBS laboratory Observations each (LOINC
#     codes, UCUM units, dates over two years), through POST /fhir transaction Bundles of
#     PER_BUNDLE patients (the real write path: validated, sealed, versioned). Timed.
#  2. wrk (THREADS, CONNECTIONS, DURATION), one endpoint at a time, cycling over SAMPLE
#     patients (a Lua script; the token is passed with -H, never written):
#       GET /health                                    the in-run baseline
#       GET /api/v1/patients/{id}                      the /api/v1 read (audited, decrypted)
#       GET /fhir/Patient/{id}                         the FHIR read (audited, decrypted)
#       GET /fhir/Observation?patient={id}&category=laboratory
#                                                      one page (20) of a compartment search
#       GET /fhir/Patient?name={family}                a name search
#     Each row: req/s, p50, p99 (wrk), and the server's CPU time per request (from
#     /proc/<pid>/stat before and after).
#
# Usage: bench/fhir.sh        PATIENTS=10000 OBS=50 DURATION=10s CONNECTIONS=32
#   SKIP_BUILD=1 BACKENDS="sqlite postgres" SAMPLE=1000 PER_BUNDLE=20
# Results (raw wrk output, logs, table.md) go to bench/results/fhir-<timestamp>/.
set -euo pipefail
PATIENTS="${PATIENTS:-10000}"
OBS="${OBS:-50}"
DURATION="${DURATION:-10s}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-32}"
SAMPLE="${SAMPLE:-1000}"
PER_BUNDLE="${PER_BUNDLE:-20}"
BACKENDS="${BACKENDS:-sqlite postgres}"
NAME=fhir
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

{
    echo "| backend | endpoint | req/s | p50 | p99 | server CPU µs/req |"
    echo "|---|---|---:|---:|---:|---:|"
} >"$OUT/table.md"

setup() {
    export CUSTODIAN_SERVER__MAX_BODY=16MiB
    printf '%s\n' 'Correct-Horse-Staple-9!' | "$BIN" --env dev user create --username bench --role doctor --password-stdin >/dev/null
}

for backend in $BACKENDS; do
    bench_database "$backend" || continue
    bench_serve "$backend" setup
    token="$(curl -fsS -X POST "$base/api/v1/auth/login" -H 'content-type: application/json' \
        -d '{"username":"bench","password":"Correct-Horse-Staple-9!"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')"
    start=$(date +%s.%N)
    BASE="$base" TOKEN="$token" PATIENTS="$PATIENTS" OBS="$OBS" PER_BUNDLE="$PER_BUNDLE" SAMPLE="$SAMPLE" \
        OUTDIR="$OUT/$backend" python3 "$ROOT/bench/fhir_seed.py"
    end=$(date +%s.%N)
    echo "$backend: seeded $PATIENTS patients x $OBS observations in $(python3 -c "print(round($end-$start,1))") s" | tee -a "$OUT/seed.txt"
    run() {
        local name="$1" lua="$2" before after reqs file
        file="$OUT/$backend-$(printf '%s' "$name" | tr -c 'A-Za-z0-9' '_').txt"
        before="$(cpu_ticks "$pid")"
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -H "authorization: Bearer $token" \
            -s "$lua" "$base" >"$file" 2>&1
        after="$(cpu_ticks "$pid")"
        reqs="$(awk '/requests in/ {print $1}' "$file")"
        local rps p50 p99 cpu
        rps="$(awk '/Requests\/sec/ {print $2}' "$file")"
        p50="$(awk '$1=="50%" {print $2}' "$file")"
        p99="$(awk '$1=="99%" {print $2}' "$file")"
        cpu="$(python3 -c "print(round(($after-$before)/$TICK*1e6/max($reqs,1)))")"
        non2xx="$(awk '/Non-2xx/ {print $NF}' "$file")"
        [[ -z "$non2xx" ]] || echo "warning: $backend $name: $non2xx non-2xx answers" | tee -a "$OUT/seed.txt"
        echo "| $backend | $name | $rps | $p50 | $p99 | $cpu |" | tee -a "$OUT/table.md"
    }
    run "GET /health" "$OUT/$backend/health.lua"
    run "GET /api/v1/patients/{id}" "$OUT/$backend/api_read.lua"
    run "GET /fhir/Patient/{id}" "$OUT/$backend/fhir_read.lua"
    run "GET /fhir/Observation?patient&category=laboratory" "$OUT/$backend/obs_page.lua"
    run "GET /fhir/Patient?name=" "$OUT/$backend/name.lua"
    bench_stop
done
echo
cat "$OUT/table.md"
echo "results: $OUT"
