# Shared by the benchmark scripts (bench/fhir.sh, smart.sh, passkeys.sh): the release
# binary, the results folder, one fresh server per backend on a free port, and the
# server's CPU time. A script sets NAME (its results prefix) and sources this file:
#
#   bench_database BACKEND   sets `url` ("" for SQLite; a fresh PostgreSQL database
#                            otherwise), or returns 1 when PostgreSQL does not answer
#   bench_serve BACKEND FN   starts `custodian serve` (dev, rate limits off, logging at
#                            warn) on a fresh data directory `DATA` and `url`, after FN
#                            ran in the server's environment (create users, export
#                            more CUSTODIAN_* settings); sets `pid`, `port`, `base`
#   bench_stop               stops that server and drops its database
#   cpu_ticks PID, TICK      the server's CPU time (clock ticks), for µs per request
#
# Everything started is stopped, and every temporary directory and database removed,
# when the script exits. Environment: SKIP_BUILD=1 (use the binary as it is), BIN.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
die() { echo "bench/$NAME: $*" >&2; exit 1; }
for tool in wrk curl python3; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
if [[ -z "${SKIP_BUILD:-}" ]]; then cargo build --release --bin custodian; fi
BIN="${BIN:-$ROOT/target/release/custodian}"
OUT="$ROOT/bench/results/$NAME-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
HOST=127.0.0.1
PIDS=()
DIRS=()
DATABASES=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    for d in "${DIRS[@]}"; do rm -rf "$d"; done
    for db in "${DATABASES[@]}"; do
        psql -h 127.0.0.1 -U postgres -d test -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK="$(getconf CLK_TCK)"

bench_database() {
    url=""
    db=""
    if [[ "$1" == postgres ]]; then
        pg_isready -q -h 127.0.0.1 || { echo "postgres not answering: skipped" >&2; return 1; }
        db="bench_${NAME}_$$"
        psql -h 127.0.0.1 -U postgres -d test -qc "DROP DATABASE IF EXISTS $db" >/dev/null
        psql -h 127.0.0.1 -U postgres -d test -qc "CREATE DATABASE $db" >/dev/null
        DATABASES+=("$db")
        url="postgres://postgres@127.0.0.1:5432/$db"
    fi
}

bench_serve() {
    local backend="$1" setup="$2"
    DATA="$(mktemp -d "${TMPDIR:-/tmp}/custodian-$NAME.XXXXXX")"
    DIRS+=("$DATA")
    port="$(free_port)"
    (
        while IFS= read -r var; do unset "$var"; done < <(compgen -e | grep '^CUSTODIAN_' || true)
        cd "$DATA"
        export CUSTODIAN_DATA_DIR="$DATA" CUSTODIAN_RATE_LIMIT__ENABLED=false CUSTODIAN_LOGGING__LEVEL=warn
        [[ -n "$url" ]] && export CUSTODIAN_DATABASE__URL="$url"
        "$setup"
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
}

bench_stop() {
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [[ -n "$url" ]]; then psql -h 127.0.0.1 -U postgres -d test -qc "DROP DATABASE IF EXISTS $db" >/dev/null || true; fi
}
