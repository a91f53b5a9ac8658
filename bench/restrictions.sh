#!/usr/bin/env bash
# What a patient's restriction costs the FHIR search it filters (issue 25: at most
# 10%), against the release binary, on SQLite and (when it answers) PostgreSQL.
#
# For each backend, on a fresh data directory (and database):
#  1. Seeding: PATIENTS patients with OBS laboratory Observations each, one in LABELLED
#     labelled PSY; the first SAMPLE patients get patient accounts (invited, accepted).
#  2. wrk, as a nurse, on GET /fhir/Observation?patient={id}&category=laboratory (one
#     page of 20, cycling over the SAMPLE patients), five runs alternating:
#       open-N        no active restriction (after the first, the ended ones are kept,
#                     inactive)
#       restricted-N  every sampled patient restricts PSY to doctors: the nurse's search
#                     reads the patient's Consents and takes the labelled ones out
#     The ratio: mean restricted req/s over mean open req/s (the machine is noisy; the
#     alternation puts its drift on both sides).
#
# Usage: bench/restrictions.sh     PATIENTS=200 OBS=50 SAMPLE=50 LABELLED=10
#   DURATION=10s CONNECTIONS=16 SKIP_BUILD=1 BACKENDS="sqlite postgres"
# Results (raw wrk output, logs, table.md) go to bench/results/restrictions-<timestamp>/.
set -euo pipefail
PATIENTS="${PATIENTS:-200}"
OBS="${OBS:-50}"
SAMPLE="${SAMPLE:-50}"
LABELLED="${LABELLED:-10}"
DURATION="${DURATION:-10s}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-16}"
BACKENDS="${BACKENDS:-sqlite postgres}"
NAME=restrictions
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

{
    echo "| backend | run | req/s | p50 | p99 | server CPU µs/req |"
    echo "|---|---|---:|---:|---:|---:|"
} >"$OUT/table.md"

PW='Correct-Horse-Staple-9!'
setup() {
    export CUSTODIAN_SERVER__MAX_BODY=16MiB
    printf '%s\n' "$PW" | "$BIN" --env dev user create --username bench --role doctor --password-stdin >/dev/null
    printf '%s\n' "$PW" | "$BIN" --env dev user create --username nurse --role nurse --password-stdin >/dev/null
}
login() {
    curl -fsS -X POST "$base/api/v1/auth/login" -H 'content-type: application/json' \
        -d "{\"username\":\"$1\",\"password\":\"$PW\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'
}

for backend in $BACKENDS; do
    bench_database "$backend" || continue
    bench_serve "$backend" setup
    doctor="$(login bench)"
    nurse="$(login nurse)"
    helper() { BASE="$base" TOKEN="$doctor" DATA="$DATA" OUTDIR="$OUT/$backend" PATIENTS="$PATIENTS" \
        OBS="$OBS" SAMPLE="$SAMPLE" LABELLED="$LABELLED" MODE="$1" python3 "$ROOT/bench/restrictions_seed.py"; }
    helper seed
    declare -A RPS=()
    run() {
        local name="$1" before after reqs file rps p50 p99 cpu non2xx
        file="$OUT/$backend-$name.txt"
        before="$(cpu_ticks "$pid")"
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -H "authorization: Bearer $nurse" \
            -s "$OUT/$backend/obs_page.lua" "$base" >"$file" 2>&1
        after="$(cpu_ticks "$pid")"
        reqs="$(awk '/requests in/ {print $1}' "$file")"
        rps="$(awk '/Requests\/sec/ {print $2}' "$file")"
        p50="$(awk '$1=="50%" {print $2}' "$file")"
        p99="$(awk '$1=="99%" {print $2}' "$file")"
        cpu="$(python3 -c "print(round(($after-$before)/$TICK*1e6/max($reqs,1)))")"
        non2xx="$(awk '/Non-2xx/ {print $NF}' "$file")"
        [[ -z "$non2xx" ]] || die "$backend $name: $non2xx non-2xx answers"
        RPS[$name]="$rps"
        echo "| $backend | $name | $rps | $p50 | $p99 | $cpu |" | tee -a "$OUT/table.md"
    }
    first="$(sed -n 's/^  "\(.*\)",$/\1/p' "$OUT/$backend/obs_page.lua" | head -n1)"
    # Alternating, so that the machine's drift falls on both sides.
    run open-1
    for k in 1 2; do
        helper restrict
        # The nurse's page now leaves the labelled observations out; check one answer.
        curl -fsS -H "authorization: Bearer $nurse" "$base$first" | python3 -c '
import json, sys
b = json.load(sys.stdin)
assert any(e["resource"]["resourceType"] == "OperationOutcome" for e in b["entry"]), "no withheld count"
assert b["meta"]["security"][0]["code"] == "REDACTED"'
        run "restricted-$k"
        helper unrestrict
        run "open-$((k + 1))"
    done
    python3 -c "
o = [${RPS[open-1]}, ${RPS[open-2]}, ${RPS[open-3]}]
r = [${RPS[restricted-1]}, ${RPS[restricted-2]}]
print('| $backend | mean(restricted) / mean(open) | %.2f | | | |' % ((sum(r) / len(r)) / (sum(o) / len(o))))" | tee -a "$OUT/table.md"
    unset RPS
    bench_stop
done
echo
cat "$OUT/table.md"
echo "results: $OUT"
