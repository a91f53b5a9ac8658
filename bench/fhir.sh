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
HOST=127.0.0.1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
die() { echo "bench/fhir: $*" >&2; exit 1; }
for tool in wrk curl python3; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
if [[ -z "${SKIP_BUILD:-}" ]]; then cargo build --release --bin custodian; fi
BIN="$ROOT/target/release/custodian"
OUT="$ROOT/bench/results/fhir-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
PIDS=()
DIRS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    for d in "${DIRS[@]}"; do rm -rf "$d"; done
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK="$(getconf CLK_TCK)"

{
    echo "| backend | endpoint | req/s | p50 | p99 | server CPU µs/req |"
    echo "|---|---|---:|---:|---:|---:|"
} >"$OUT/table.md"

for backend in $BACKENDS; do
    DATA="$(mktemp -d "${TMPDIR:-/tmp}/custodian-fhir.XXXXXX")"
    DIRS+=("$DATA")
    url=""
    if [[ "$backend" == postgres ]]; then
        pg_isready -q -h 127.0.0.1 || { echo "postgres not answering: skipped" >&2; continue; }
        db="bench_fhir_$$"
        psql -h 127.0.0.1 -U postgres -d test -qc "DROP DATABASE IF EXISTS $db" >/dev/null
        psql -h 127.0.0.1 -U postgres -d test -qc "CREATE DATABASE $db" >/dev/null
        url="postgres://postgres@127.0.0.1:5432/$db"
    fi
    port="$(free_port)"
    (
        while IFS= read -r var; do unset "$var"; done < <(compgen -e | grep '^CUSTODIAN_' || true)
        cd "$DATA"
        export CUSTODIAN_DATA_DIR="$DATA" CUSTODIAN_RATE_LIMIT__ENABLED=false CUSTODIAN_LOGGING__LEVEL=warn
        export CUSTODIAN_SERVER__MAX_BODY=16MiB
        [[ -n "$url" ]] && export CUSTODIAN_DATABASE__URL="$url"
        printf '%s\n' 'Correct-Horse-Staple-9!' | "$BIN" --env dev user create --username bench --role doctor --password-stdin >/dev/null
        exec "$BIN" --env dev serve --listen "$HOST:$port"
    ) >"$OUT/$backend-server.log" 2>&1 &
    pid="$!"
    PIDS+=("$pid")
    for _ in $(seq 1 150); do
        kill -0 "$pid" 2>/dev/null || die "the server exited (see $OUT/$backend-server.log)"
        curl -fsS -o /dev/null "http://$HOST:$port/health" 2>/dev/null && break
        sleep 0.2
    done
    base="http://$HOST:$port"
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
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [[ -n "$url" ]]; then psql -h 127.0.0.1 -U postgres -d test -qc "DROP DATABASE IF EXISTS $db" >/dev/null || true; fi
done
echo
cat "$OUT/table.md"
echo "results: $OUT"
