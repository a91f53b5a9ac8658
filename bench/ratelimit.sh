#!/usr/bin/env bash
# What the rate limiter costs an authenticated read.
#
# Three server configurations on SQLite, each started fresh, in turn, ROUNDS times
# (off, local, redis, off, local, redis, ...), so that drift of the machine spreads
# over all three:
#   off    CUSTODIAN_RATE_LIMIT__ENABLED=false
#   local  the limiter in this process's memory
#   redis  the limiter in Redis (CUSTODIAN_REDIS__URL), one Lua script per request
# The limit is set far above the load (rate_limit.default 1000000/s) so that every
# request is checked and none is refused: the cost measured is the check's.
# In each run, after a warm-up, wrk measures GET /api/v1/auth/me with an API token
# (token lookup, limiter check keyed by the user, one audit event). The table gives
# req/s and p50/p99 per run and the mean ratio of each limiter against off.
#
# Usage: bench/ratelimit.sh
#   DURATION=10s WARMUP=2s THREADS=2 CONNECTIONS=32 ROUNDS=2
#   SKIP_BUILD=1                 use the binary already in target/release
#   REDIS_URL=redis://127.0.0.1:6379/15   the Redis to use (its keys are prefixed
#                                         per installation; nothing else is touched)
set -euo pipefail

DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-32}"
ROUNDS="${ROUNDS:-2}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/15}"
HOST=127.0.0.1
PASSWORD='Bench-Pass-12345!'

die() { echo "ratelimit: $*" >&2; exit 1; }
[[ "$DURATION" =~ ^[0-9]+s$ && "$WARMUP" =~ ^[0-9]+s$ ]] || die "DURATION and WARMUP: seconds, e.g. 10s"
[[ "$ROUNDS" =~ ^[1-9]$ ]] || die "ROUNDS must be 1 to 9"
for tool in wrk curl python3 redis-cli; do
    command -v "$tool" >/dev/null || die "$tool is not installed (Debian: apt-get install -y wrk curl python3 redis-tools)"
done
redis-cli -u "$REDIS_URL" PING >/dev/null 2>&1 || die "Redis at $REDIS_URL does not answer"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ -n "${SKIP_BUILD:-}" ]] || cargo build --release --bin custodian
BIN="$ROOT/target/release/custodian"
[[ -x "$BIN" ]] || die "release binary missing; run without SKIP_BUILD"
OUT="$ROOT/bench/results/ratelimit-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() { [[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# run NAME KEY=VALUE...: one fresh server, one measurement; prints "req/s p50 p99".
run() {
    local name="$1"; shift
    local dir; dir="$(mktemp -d "$WORK/$name.XXXX")"
    local port; port="$(free_port)"
    local base="http://$HOST:$port"
    (
        while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^CUSTODIAN_' || true)
        cd "$dir"
        export CUSTODIAN_DATA_DIR="$dir" CUSTODIAN_LOGGING__LEVEL=warn \
            CUSTODIAN_SESSION__IDLE_TIMEOUT=60m CUSTODIAN_RATE_LIMIT__DEFAULT=1000000/s \
            CUSTODIAN_RATE_LIMIT__ROUTES='{"POST /api/v1/auth/login": "1000/s", "POST /api/v1/tokens": "1000/s"}'
        for kv in "$@"; do export "${kv?}"; done
        printf '%s\n' "$PASSWORD" | "$BIN" --env dev user create --username loadgen --role admin --password-stdin >/dev/null 2>&1
        exec "$BIN" --env dev serve --listen "$HOST:$port"
    ) >"$OUT/$name-server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 150); do curl -fsS -o /dev/null "$base/health" 2>/dev/null && break; sleep 0.2; done
    local session token
    session="$(curl -fsS -H 'Content-Type: application/json' \
        -d "{\"username\":\"loadgen\",\"password\":\"$PASSWORD\"}" "$base/api/v1/auth/login" | field access_token)"
    token="$(curl -fsS -H 'Content-Type: application/json' -H "Authorization: Bearer $session" \
        -d '{"name":"bench"}' "$base/api/v1/tokens" | field token)"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" -H "Authorization: Bearer $token" "$base/api/v1/auth/me" >/dev/null
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -H "Authorization: Bearer $token" \
        "$base/api/v1/auth/me" >"$OUT/$name.wrk.txt"
    kill -TERM "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
    grep -q "Non-2xx" "$OUT/$name.wrk.txt" && die "$name: non-2xx responses (see $OUT/$name.wrk.txt)"
    python3 - "$OUT/$name.wrk.txt" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def ms(label):
    m = re.search(label + r"\s+([\d.]+)(us|ms|s)", t)
    v = float(m.group(1)); u = m.group(2)
    return v / 1000 if u == "us" else v * 1000 if u == "s" else v
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
print(f"{rps:.0f} {ms('50%'):.2f} {ms('99%'):.2f}")
PY
}

declare -A SUM=([off]=0 [local]=0 [redis]=0)
{
    echo "| round | limiter | /me req/s | p50 (ms) | p99 (ms) |"
    echo "|---|---|---:|---:|---:|"
} >"$OUT/table.md"
for round in $(seq "$ROUNDS"); do
    for cfg in off local redis; do
        case "$cfg" in
            off) env=(CUSTODIAN_RATE_LIMIT__ENABLED=false) ;;
            local) env=() ;;
            redis) env=("CUSTODIAN_REDIS__URL=$REDIS_URL") ;;
        esac
        read -r rps p50 p99 < <(run "$cfg-$round" "${env[@]}")
        echo "| $round | $cfg | $rps | $p50 | $p99 |" >>"$OUT/table.md"
        SUM[$cfg]=$((SUM[$cfg] + rps))
    done
done
{
    echo
    python3 -c "import sys; o,l,r=map(int,sys.argv[1:]); print(f'local ÷ off = {l/o:.2f} (cost {100*(1-l/o):.0f} %); redis ÷ off = {r/o:.2f} (cost {100*(1-r/o):.0f} %)')" \
        "${SUM[off]}" "${SUM[local]}" "${SUM[redis]}"
    echo
    echo "binary: $(git -C "$ROOT" rev-parse --short HEAD), $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ)"
} >>"$OUT/table.md"
cat "$OUT/table.md"
