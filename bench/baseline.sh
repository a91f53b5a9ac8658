#!/usr/bin/env bash
# Baseline throughput and latency of Custodian against a bare axum handler.
#
# Builds the release binary and examples/bare.rs, starts both on free loopback ports,
# and runs wrk against:
#   bare       GET /        (examples/bare.rs: no middleware at all)
#   health     GET /health  (custodian: full middleware stack, no database)
#   ready      GET /ready   (custodian: middleware + one database round trip)
# It prints a markdown table with each endpoint's ratio to the bare handler, measured in
# the same session (absolute numbers on a shared, noisy machine mean little; ratios do).
#
# Usage: bench/baseline.sh            (DURATION=10s by default)
#   DURATION=30s bench/baseline.sh    measured run per endpoint
#   WARMUP=2s                         unmeasured warm-up per endpoint (0 to skip)
#   THREADS=2 CONNECTIONS=32          wrk -t / -c
#   SKIP_BUILD=1                      use the binaries already in target/release
#
# Raw wrk output, server logs and the table go to bench/results/<timestamp>/.
# Everything listens on 127.0.0.1 only, and both servers are stopped on exit.
set -euo pipefail

DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-32}"
HOST=127.0.0.1

die() { echo "baseline: $*" >&2; exit 1; }

# Bounded durations only: a number with s or m, at most 10 minutes.
duration_secs() {
    local d="$1"
    [[ "$d" =~ ^([0-9]+)(s|m)$ ]] || die "duration '$d': use e.g. 10s or 1m"
    local n="${BASH_REMATCH[1]}"
    [[ "${BASH_REMATCH[2]}" == m ]] && n=$((n * 60))
    ((n <= 600)) || die "duration '$d' is over 10 minutes"
    echo "$n"
}
DURATION_S="$(duration_secs "$DURATION")"
((DURATION_S > 0)) || die "DURATION must be more than 0"
[[ "$WARMUP" == 0 ]] && WARMUP=0s
WARMUP_S="$(duration_secs "$WARMUP")"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

command -v wrk >/dev/null || die "wrk is not installed (Debian: apt-get install -y wrk)"
command -v curl >/dev/null || die "curl is not installed (Debian: apt-get install -y curl)"

if [[ -z "${SKIP_BUILD:-}" ]]; then
    echo "baseline: building release binaries..." >&2
    cargo build --release --bin custodian --example bare
fi
CUSTODIAN_BIN="$ROOT/target/release/custodian"
BARE_BIN="$ROOT/target/release/examples/bare"
[[ -x "$CUSTODIAN_BIN" && -x "$BARE_BIN" ]] || die "release binaries missing; run without SKIP_BUILD"

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$ROOT/bench/results/$STAMP"
mkdir -p "$OUT"
DATA_DIR="$(mktemp -d "${TMPDIR:-/tmp}/custodian-bench.XXXXXX")"

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$DATA_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A free loopback port: bind port 0 and report what the kernel chose.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_for() {
    local url="$1" pid="$2" i
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || die "server for $url exited early (logs in $OUT)"
        curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null && return 0
        sleep 0.2
    done
    die "timed out waiting for $url (logs in $OUT)"
}

BARE_PORT="$(free_port)"
CUSTODIAN_PORT="$(free_port)"
while [[ "$CUSTODIAN_PORT" == "$BARE_PORT" ]]; do CUSTODIAN_PORT="$(free_port)"; done

# Custodian in dev, with defaults only: no CUSTODIAN_* variable leaks in from the
# caller, and it runs in the empty data directory so that no ./config/dev.yaml applies.
# Rate limiting is off (it would otherwise answer 429 under load); logging at warn.
(
    while IFS= read -r var; do unset "$var"; done < <(compgen -e | grep '^CUSTODIAN_' || true)
    cd "$DATA_DIR"
    export CUSTODIAN_DATA_DIR="$DATA_DIR"
    export CUSTODIAN_RATE_LIMIT__ENABLED=false
    export CUSTODIAN_LOGGING__LEVEL=warn
    exec "$CUSTODIAN_BIN" --env dev serve --listen "$HOST:$CUSTODIAN_PORT"
) >"$OUT/custodian.log" 2>&1 &
PIDS+=("$!")
CUSTODIAN_PID="$!"

"$BARE_BIN" "$HOST:$BARE_PORT" >"$OUT/bare.log" 2>&1 &
PIDS+=("$!")
BARE_PID="$!"

wait_for "http://$HOST:$BARE_PORT/" "$BARE_PID"
wait_for "http://$HOST:$CUSTODIAN_PORT/health" "$CUSTODIAN_PID"
curl -fsS --max-time 5 "http://$HOST:$CUSTODIAN_PORT/ready" >"$OUT/ready.json" \
    || die "/ready does not answer 200: $(cat "$OUT/ready.json" 2>/dev/null)"

CPU_MODEL="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nproc: $(nproc)"
    echo "cpu: ${CPU_MODEL:-unknown}"
    echo "kernel: $(uname -r)"
    echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
    echo "wrk: $(wrk -v 2>&1 | head -n1 || true)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo uncommitted)"
    echo "load: wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency (warm-up $WARMUP)"
} >"$OUT/meta.txt"

# Latency as wrk prints it (e.g. 812.00us, 1.23ms, 1.01s) -> milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v; sub(/[a-z]+$/, "", n); u = v; sub(/^[0-9.]+/, "", u)
        f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : -1
        if (f < 0) { print "nan"; exit }
        printf "%.3f", n * f
    }'
}

NAMES=(bare health ready)
URLS=("http://$HOST:$BARE_PORT/" "http://$HOST:$CUSTODIAN_PORT/health" "http://$HOST:$CUSTODIAN_PORT/ready")
LABELS=("bare axum handler \`GET /\`" "custodian \`GET /health\`" "custodian \`GET /ready\` (1 DB query)")
declare -A RPS P50 P99 ERRS

for i in "${!NAMES[@]}"; do
    name="${NAMES[$i]}" url="${URLS[$i]}"
    if ((WARMUP_S > 0)); then
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" "$url" >"$OUT/wrk-$name-warmup.txt"
    fi
    echo "baseline: wrk $DURATION against $url" >&2
    raw="$OUT/wrk-$name.txt"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$url" >"$raw"
    RPS[$name]="$(awk '/^Requests\/sec:/ {print $2}' "$raw")"
    P50[$name]="$(to_ms "$(awk '$1 == "50%" {print $2}' "$raw")")"
    P99[$name]="$(to_ms "$(awk '$1 == "99%" {print $2}' "$raw")")"
    non2xx="$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$raw")"
    sockerr="$(awk -F'Socket errors: ' 'NF > 1 {print $2}' "$raw")"
    ERRS[$name]="${non2xx:+non-2xx: $non2xx}${non2xx:+${sockerr:+; }}${sockerr:+socket: $sockerr}"
    [[ -n "${RPS[$name]}" ]] || die "could not parse $raw"
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

{
    echo "| endpoint | req/s | req/s vs bare | p50 (ms) | p50 vs bare | p99 (ms) | p99 vs bare | errors |"
    echo "|---|---:|---:|---:|---:|---:|---:|---|"
    for i in "${!NAMES[@]}"; do
        n="${NAMES[$i]}"
        printf '| %s | %.0f | %s | %.3f | %s | %.3f | %s | %s |\n' \
            "${LABELS[$i]}" "${RPS[$n]}" "$(ratio "${RPS[$n]}" "${RPS[bare]}")" \
            "${P50[$n]}" "$(ratio "${P50[$n]}" "${P50[bare]}")" \
            "${P99[$n]}" "$(ratio "${P99[$n]}" "${P99[bare]}")" \
            "${ERRS[$n]:-none}"
    done
} >"$OUT/table.md"

echo
cat "$OUT/meta.txt"
echo
cat "$OUT/table.md"
echo
echo "raw output: ${OUT#"$ROOT"/}"
