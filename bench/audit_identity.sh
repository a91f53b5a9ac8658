#!/usr/bin/env bash
# Cost of the audit trail and of sign-in, on SQLite and (when it answers) PostgreSQL.
#
# For each backend (SQLite always; PostgreSQL when `pg_isready -h 127.0.0.1` succeeds):
#
#  1. Audit cost. The server is started three times in turn, each time on a fresh data
#     directory (and, for PostgreSQL, a fresh database):
#       off        CUSTODIAN_AUDIT__ENABLED=false (only for measuring; prod refuses it)
#       group      the default: group commit (audit.max_batch = 256)
#       per-event  CUSTODIAN_AUDIT__MAX_BATCH=1: one transaction per request
#     In each run a user and an API token are created, then wrk measures
#       GET /health          no I/O, full middleware: the in-run baseline
#       GET /api/v1/auth/me  the authenticated read: token lookup, lockout and role
#                            checks against the database, then one audit event that is
#                            committed before the answer
#     and the table gives group ÷ off (audit cost = 1 − that) and per-event ÷ group, both
#     raw and normalised by each run's /health (which absorbs machine drift between runs).
#  2. Login. One more server with the defaults (audit on, group commit, production
#     Argon2id parameters): wrk on POST /api/v1/auth/login with the right password.
#  3. Read under a login flood. On that same server: GET /api/v1/auth/me alone
#     (wrk -t1 -c32), then again while a login flood (wrk -t1 -c32, right password, so
#     Argon2id runs in full) runs in the background; loaded ÷ unloaded.
#
# Absolute numbers on a 2-core machine shared with wrk mean little; compare the ratios,
# which come from the same run.
#
# Usage: bench/audit_identity.sh          (DURATION=10s by default)
#   DURATION=30s                          measured run per endpoint (at most 10m)
#   WARMUP=2s                             unmeasured warm-up before each measurement (0 to skip)
#   THREADS=2 CONNECTIONS=32              wrk -t / -c for the runs that are alone
#   SKIP_BUILD=1                          use the binary already in target/release
#   BACKENDS="sqlite postgres"            which backends to try (PostgreSQL is skipped
#                                         when pg_isready fails)
#   NOISE_MAX=0.25 ATTEMPTS=3             a measurement during which other processes on
#                                         the machine used more than NOISE_MAX cores is
#                                         repeated, up to ATTEMPTS times in all; the
#                                         quietest attempt is kept, and marked † in the
#                                         tables if it is still over NOISE_MAX
#   PGHOST=127.0.0.1 PGPORT=5432 PGUSER=postgres PGADMIN_DB=test
#                                         the PostgreSQL server (trust auth) and the
#                                         database to connect to for CREATE/DROP DATABASE
#
# Raw wrk output, server logs, every measurement (summary.tsv, with the server's CPU and
# the machine's idle time during each run) and the tables go to bench/results/<timestamp>/.
# Everything listens on 127.0.0.1 only; servers, temporary directories and the
# PostgreSQL databases created here are removed on exit.
set -euo pipefail

DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-32}"
BACKENDS="${BACKENDS:-sqlite postgres}"
NOISE_MAX="${NOISE_MAX:-0.25}"
ATTEMPTS="${ATTEMPTS:-3}"
PG_HOST="${PGHOST:-127.0.0.1}"
PG_PORT="${PGPORT:-5432}"
PG_USER="${PGUSER:-postgres}"
PG_ADMIN_DB="${PGADMIN_DB:-test}"
HOST=127.0.0.1
BENCH_USER=loadgen   # not a part of the password: the policy refuses that
BENCH_PASSWORD='Bench-Pass-12345!'

die() { echo "audit_identity: $*" >&2; exit 1; }
say() { echo "audit_identity: $*" >&2; }

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
[[ "$THREADS" =~ ^[1-9][0-9]*$ && "$CONNECTIONS" =~ ^[1-9][0-9]*$ ]] \
    || die "THREADS and CONNECTIONS must be positive integers"
[[ "$ATTEMPTS" =~ ^[1-5]$ ]] || die "ATTEMPTS must be 1 to 5"
[[ "$NOISE_MAX" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "NOISE_MAX must be a number of cores, e.g. 0.25"
[[ "$PG_HOST" == 127.0.0.1 || "$PG_HOST" == localhost || "$PG_HOST" == ::1 ]] \
    || die "PGHOST must be a loopback address"
[[ "$PG_HOST" == ::1 ]] && PG_HOST_URL="[::1]" || PG_HOST_URL="$PG_HOST"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

for tool in wrk curl python3 timeout; do
    command -v "$tool" >/dev/null || die "$tool is not installed (Debian: apt-get install -y wrk curl python3 coreutils)"
done

if [[ -z "${SKIP_BUILD:-}" ]]; then
    say "building the release binary..."
    cargo build --release --bin custodian
fi
CUSTODIAN_BIN="$ROOT/target/release/custodian"
[[ -x "$CUSTODIAN_BIN" ]] || die "release binary missing; run without SKIP_BUILD"
# With SKIP_BUILD the binary may predate the sources: say so, here and in meta.txt.
STALE="$(find src migrations Cargo.toml Cargo.lock -newer "$CUSTODIAN_BIN" -print -quit 2>/dev/null || true)"
[[ -z "$STALE" ]] || say "warning: $STALE is newer than $CUSTODIAN_BIN: the binary measured is not the current source"

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$ROOT/bench/results/$STAMP"
mkdir -p "$OUT"
DB_PREFIX="custodian_bench_$(date -u +%s)_$$"

WORK=""
SERVER_PID=""
SERVER_NAME=""
SERVER_LOG=""
FLOOD_PID=""
DATABASES=()
psql_admin() {
    timeout 30 psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" \
        -d "$PG_ADMIN_DB" "$@"
}
declare -A LOG_ERRORS
log_errors() { grep -ciE ' ERROR |panic' "$1" 2>/dev/null || true; }
# Stops the server; records how many ERROR/panic lines its log got while it ran and
# while it shut down (LOG_ERRORS[name] = "running shutdown").
stop_server() {
    if [[ -n "$SERVER_PID" ]]; then
        local running
        running="$(log_errors "$SERVER_LOG")"
        kill "$SERVER_PID" 2>/dev/null || true
        # It drains in-flight requests for up to server.shutdown_grace (30 s); no longer.
        local i
        for ((i = 0; i < 200; i++)); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.2
        done
        if ((i == 200)); then
            say "server $SERVER_NAME did not stop within 40 s; killing it"
            kill -KILL "$SERVER_PID" 2>/dev/null || true
        fi
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
        LOG_ERRORS[$SERVER_NAME]="$running $(($(log_errors "$SERVER_LOG") - running))"
    fi
}
cleanup() {
    local db
    if [[ -n "$FLOOD_PID" ]]; then
        kill "$FLOOD_PID" 2>/dev/null || true
        wait "$FLOOD_PID" 2>/dev/null || true
    fi
    stop_server
    for db in "${DATABASES[@]}"; do
        psql_admin -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 \
            || echo "audit_identity: could not drop database $db" >&2
    done
    [[ -z "$WORK" ]] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

WORK="$(mktemp -d "${TMPDIR:-/tmp}/custodian-bench-ai.XXXXXX")"
# Run a private copy, so that a rebuild of target/release during the run (by anyone)
# cannot mix two binaries in one set of results.
cp "$CUSTODIAN_BIN" "$WORK/custodian"
BIN_SOURCE="$CUSTODIAN_BIN"
CUSTODIAN_BIN="$WORK/custodian"

# A free loopback port: bind port 0 and report what the kernel chose.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Runs custodian with no CUSTODIAN_* variable from the caller, in its (empty) data
# directory so that no ./config/dev.yaml applies, with the given KEY=VALUE variables.
# Common to every run: rate limiting off (it would answer 429 under load), logging at
# warn, sessions that outlive the run, and no lockout of 127.0.0.1 (the per-address
# spraying block) or of the user.
custodian_env() {
    local dir="$1"
    shift
    while IFS= read -r var; do unset "$var"; done < <(compgen -e | grep '^CUSTODIAN_' || true)
    cd "$dir"
    export CUSTODIAN_DATA_DIR="$dir"
    export CUSTODIAN_RATE_LIMIT__ENABLED=false
    export CUSTODIAN_LOGGING__LEVEL=warn
    export CUSTODIAN_SESSION__IDLE_TIMEOUT=60m
    export CUSTODIAN_LOCKOUT__IP_MAX_FAILURES=0
    export CUSTODIAN_LOCKOUT__MAX_FAILURES=1000000
    local kv
    for kv in "$@"; do export "${kv?}"; done
}

# Starts a server on a fresh store. Sets SERVER_PID, BASE (its URL), API_TOKEN.
#   start_server NAME BACKEND [KEY=VALUE...]
start_server() {
    local name="$1" backend="$2"
    shift 2
    local dir port db
    dir="$(mktemp -d "$WORK/$name.XXXXXX")"
    local env=("$@")
    if [[ "$backend" == postgres ]]; then
        db="${DB_PREFIX}_${#DATABASES[@]}"
        DATABASES+=("$db")
        psql_admin -c "CREATE DATABASE \"$db\"" >/dev/null || die "cannot create database $db"
        env+=("CUSTODIAN_DATABASE__URL=postgres://$PG_USER@$PG_HOST_URL:$PG_PORT/$db")
    fi
    printf '%s\n' "$BENCH_PASSWORD" | (
        custodian_env "$dir" "${env[@]}"
        exec timeout 60 "$CUSTODIAN_BIN" --env dev user create --username "$BENCH_USER" \
            --role admin --password-stdin
    ) >"$OUT/$name-user-create.log" 2>&1 || die "user create failed (see $OUT/$name-user-create.log)"

    port="$(free_port)"
    BASE="http://$HOST:$port"
    SERVER_NAME="$name"
    SERVER_LOG="$OUT/$name-server.log"
    (
        custodian_env "$dir" "${env[@]}"
        exec "$CUSTODIAN_BIN" --env dev serve --listen "$HOST:$port"
    ) >"$SERVER_LOG" 2>&1 &
    SERVER_PID="$!"
    local i
    for ((i = 0; ; i++)); do
        kill -0 "$SERVER_PID" 2>/dev/null || die "server $name exited early (see $OUT/$name-server.log)"
        curl -fsS -o /dev/null --max-time 1 "$BASE/health" 2>/dev/null && break
        ((i < 150)) || die "timed out waiting for server $name (see $OUT/$name-server.log)"
        sleep 0.2
    done

    local login token
    login="$(curl -fsS --max-time 10 -H 'Content-Type: application/json' \
        -d "$(login_body)" "$BASE/api/v1/auth/login")" || die "login failed on $name"
    token="$(json_field access_token <<<"$login")"
    [[ "$token" == cst_* ]] || die "no session token from login on $name"
    API_TOKEN="$(curl -fsS --max-time 10 -H 'Content-Type: application/json' \
        -H "Authorization: Bearer $token" -d '{"name":"bench"}' "$BASE/api/v1/tokens" \
        | json_field token)" || die "token creation failed on $name"
    [[ "$API_TOKEN" == cat_* ]] || die "no API token on $name"
    curl -fsS --max-time 10 -o "$OUT/$name-me.json" -H "Authorization: Bearer $API_TOKEN" \
        "$BASE/api/v1/auth/me" || die "GET /api/v1/auth/me with the API token failed on $name"
}

json_field() {
    python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}
login_body() {
    python3 -c 'import json, sys; print(json.dumps({"username": sys.argv[1], "password": sys.argv[2]}))' \
        "$BENCH_USER" "$BENCH_PASSWORD"
}

LOGIN_LUA="$OUT/login.lua"
{
    echo 'wrk.method = "POST"'
    printf 'wrk.body = [[%s]]\n' "$(login_body)"
    echo 'wrk.headers["Content-Type"] = "application/json"'
} >"$LOGIN_LUA"

# Latency as wrk prints it (e.g. 812.00us, 1.23ms, 1.01s) -> milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v; sub(/[a-z]+$/, "", n); u = v; sub(/^[0-9.]+/, "", u)
        f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : -1
        if (f < 0 || n == "") { print "nan"; exit }
        printf "%.3f", n * f
    }'
}

declare -A RPS P50 P99 ERRS CPU PGCPU WRKCPU OTHER IDLE
CLK_TCK="$(getconf CLK_TCK)"
NPROC="$(nproc)"

# CPU accounting around a measured run, from /proc, as
#   "server pg wrk idle irq total wall": CPU ticks of the server process (all its
#   threads), of all PostgreSQL processes, of this script's finished children (the wrk
#   that was waited for), the machine's idle, interrupt (mostly loopback networking,
#   which no process is charged for) and total ticks (all cores), and the wall clock.
cpu_snapshot() {
    local server pg=0 kids pids
    server="$(awk '{print $14 + $15}' "/proc/$SERVER_PID/stat" 2>/dev/null || echo 0)"
    if pids="$(pgrep -x postgres 2>/dev/null)"; then
        # shellcheck disable=SC2086 # one path per pid
        pg="$(cd /proc && for p in $pids; do cat "$p/stat" 2>/dev/null || true; done \
            | awk '{s += $14 + $15} END {print s + 0}')"
    fi
    kids="$(awk '{print $16 + $17}' "/proc/$$/stat")"
    echo "$server $pg $kids $(awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print $5 + $6, $7 + $8, t }' /proc/stat) $(date +%s.%N)"
}
# Sets, in cores (e.g. 1.62 of 2): CPU[key] (server), PGCPU[key] (PostgreSQL), WRKCPU[key]
# (the measuring wrk), OTHER[key] (everything else that ran, interrupts aside: other
# processes on the machine, a wrk still running in the background, hypervisor steal);
# and IDLE[key] (machine idle %).
#   cpu_account KEY "SNAPSHOT_BEFORE"
cpu_account() {
    local key="$1" before="$2" after r
    after="$(cpu_snapshot)"
    r="$(awk -v b="$before" -v a="$after" -v hz="$CLK_TCK" -v n="$NPROC" 'BEGIN {
        split(b, x, " "); split(a, y, " "); w = y[7] - x[7]; t = y[6] - x[6]
        if (w <= 0 || t <= 0) { print "n/a n/a n/a n/a n/a"; exit }
        s = (y[1] - x[1]) / hz / w; p = (y[2] - x[2]) / hz / w; k = (y[3] - x[3]) / hz / w
        if (p < 0) p = 0  # a PostgreSQL process (autovacuum) exited: its time is gone
        busy = n * (1 - (y[4] - x[4] + y[5] - x[5]) / t); o = busy - s - p - k; if (o < 0) o = 0
        printf "%.2f %.2f %.2f %.2f %.0f%%\n", s, p, k, o, 100 * (y[4] - x[4]) / t }')"
    read -r "CPU[$key]" "PGCPU[$key]" "WRKCPU[$key]" "OTHER[$key]" "IDLE[$key]" <<<"$r"
    IDLE[$key]="${IDLE[$key]/\%/ %}"
}
# Parses a wrk output file into RPS/P50/P99/ERRS[key].
parse_wrk() {
    local key="$1" raw="$2" non2xx sockerr
    RPS[$key]="$(awk '/^Requests\/sec:/ {print $2}' "$raw")"
    [[ -n "${RPS[$key]}" ]] || die "could not parse $raw"
    P50[$key]="$(to_ms "$(awk '$1 == "50%" {print $2}' "$raw")")"
    P99[$key]="$(to_ms "$(awk '$1 == "99%" {print $2}' "$raw")")"
    non2xx="$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$raw")"
    sockerr="$(awk -F'Socket errors: ' 'NF > 1 {print $2}' "$raw")"
    ERRS[$key]="${non2xx:+non-2xx: $non2xx}${non2xx:+${sockerr:+; }}${sockerr:+socket: $sockerr}"
}

# wrk, bounded in time. Login runs get a long request timeout: Argon2id on 2 cores
# queues requests for well over wrk's default 2 s.
#   run_wrk OUTFILE DURATION THREADS URL [wrk args...]
run_wrk() {
    local raw="$1" dur="$2" threads="$3" url="$4"
    shift 4
    local secs
    secs="$(duration_secs "$dur")"
    timeout $((secs + 60)) wrk -t"$threads" -c"$CONNECTIONS" -d"$dur" --timeout 30s --latency \
        "$@" "$url" >"$raw" || die "wrk failed or timed out: $raw"
}

# Copies every measurement of key FROM to key TO.
copy_measurement() {
    local from="$1" to="$2" name
    for name in RPS P50 P99 ERRS CPU PGCPU WRKCPU OTHER IDLE; do
        local -n arr="$name"
        # shellcheck disable=SC2004,SC2034 # arr names an associative array
        arr[$to]="${arr[$from]:-}"
        unset -n arr
    done
}
is_noisy() { awk -v o="${OTHER[$1]:-0}" -v m="$NOISE_MAX" 'BEGIN { exit !(o == "n/a" || o > m) }'; }

# Runs ATTEMPT_FN KEY~n ARGS... up to ATTEMPTS times, until another process's CPU use
# during the measurement is at most NOISE_MAX cores, and keeps the quietest attempt as
# KEY. TRIES[KEY] says "kept/attempts".
#   with_retries KEY ATTEMPT_FN [args...]
declare -A TRIES
with_retries() {
    local key="$1" fn="$2"
    shift 2
    local a best=""
    for ((a = 1; a <= ATTEMPTS; a++)); do
        "$fn" "$key~$a" "$@"
        if [[ -z "$best" ]] || awk -v o="${OTHER[$key~$a]}" -v b="${OTHER[$key~$best]}" \
            'BEGIN { exit !(b == "n/a" || (o != "n/a" && o < b)) }'; then
            best="$a"
        fi
        is_noisy "$key~$a" || break
        ((a < ATTEMPTS)) && say "$key: another process used ${OTHER[$key~$a]} cores; measuring again"
    done
    copy_measurement "$key~$best" "$key"
    TRIES[$key]="$best/$((a > ATTEMPTS ? ATTEMPTS : a))"
}

# One warm-up and measured run under KEY (attempt n is saved as wrk-KEY.n.txt).
#   measure_once KEY~n THREADS URL [wrk args...]
measure_once() {
    local key="$1" threads="$2" url="$3"
    shift 3
    local file="${key/\~/.}" before
    if ((WARMUP_S > 0)); then
        run_wrk "$OUT/wrk-$file-warmup.txt" "$WARMUP" "$threads" "$url" "$@"
    fi
    say "wrk $DURATION: $key"
    before="$(cpu_snapshot)"
    run_wrk "$OUT/wrk-$file.txt" "$DURATION" "$threads" "$url" "$@"
    cpu_account "$key" "$before"
    parse_wrk "$key" "$OUT/wrk-$file.txt"
}
#   measure KEY THREADS URL [wrk args...]
measure() {
    local key="$1"
    shift
    with_retries "$key" measure_once "$@"
}

# The authenticated read while a login flood runs: the flood (wrk -t1, right password)
# starts 1 s before the measured read and ends 1 s after it. The flood's own numbers go
# under BACKEND-flood~n.
#   flood_once BACKEND-me-loaded~n BACKEND
flood_once() {
    local key="$1" backend="$2"
    local n="${key##*~}" before
    timeout $((DURATION_S + 62)) wrk -t1 -c"$CONNECTIONS" -d"$((DURATION_S + 2))s" --timeout 30s \
        --latency -s "$LOGIN_LUA" "$BASE/api/v1/auth/login" >"$OUT/wrk-$backend-flood.$n.txt" &
    FLOOD_PID="$!"
    sleep 1
    say "wrk $DURATION: $key (login flood running)"
    before="$(cpu_snapshot)"
    run_wrk "$OUT/wrk-$backend-me-loaded.$n.txt" "$DURATION" 1 "$BASE/api/v1/auth/me" \
        -H "Authorization: Bearer $API_TOKEN"
    cpu_account "$key" "$before"
    parse_wrk "$key" "$OUT/wrk-$backend-me-loaded.$n.txt"
    wait "$FLOOD_PID" || die "the login flood's wrk failed or timed out"
    FLOOD_PID=""
    parse_wrk "$backend-flood~$n" "$OUT/wrk-$backend-flood.$n.txt"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
# (a / b) / (c / d): a ratio normalised by the ratio of the in-run baselines.
nratio() {
    awk -v a="$1" -v b="$2" -v c="$3" -v d="$4" \
        'BEGIN { if (b > 0 && c > 0 && d > 0) printf "%.2f", (a / b) / (c / d); else print "n/a" }'
}
pct_cost() { awk -v r="$1" 'BEGIN { if (r == "n/a") print "n/a"; else printf "%.0f %%", (1 - r) * 100 }'; }

ACTIVE=()
for backend in $BACKENDS; do
    case "$backend" in
        sqlite) ACTIVE+=(sqlite) ;;
        postgres)
            if command -v pg_isready >/dev/null && command -v psql >/dev/null \
                && timeout 10 pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; then
                ACTIVE+=(postgres)
            else
                say "PostgreSQL at $PG_HOST:$PG_PORT is not ready (or pg_isready/psql missing): skipped"
            fi
            ;;
        *) die "unknown backend '$backend' (use sqlite and/or postgres)" ;;
    esac
done
((${#ACTIVE[@]} > 0)) || die "no backend to measure"

CPU_MODEL="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nproc: $(nproc)"
    echo "cpu: ${CPU_MODEL:-unknown}"
    echo "kernel: $(uname -r)"
    echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
    echo "wrk: $(wrk -v 2>&1 | head -n1 || true)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "binary: $("$CUSTODIAN_BIN" --version 2>/dev/null || echo custodian), built $(date -u -r "$BIN_SOURCE" +%Y-%m-%dT%H:%M:%SZ), sha256 $(sha256sum "$CUSTODIAN_BIN" | cut -c1-16)${STALE:+ (OLDER than $STALE: not the current source)}"
    echo "backends: ${ACTIVE[*]}"
    if [[ " ${ACTIVE[*]} " == *" postgres "* ]]; then
        echo "postgres: $(psql_admin -Atc 'SHOW server_version' 2>/dev/null || echo unknown)"
    fi
    echo "alone: wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency (warm-up $WARMUP)"
    echo "concurrent: wrk -t1 -c$CONNECTIONS each"
    # Commit latency is bounded below by fsync: record what it costs here.
    python3 - "$WORK" <<'PY' || true
import os, statistics, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
times = []
for _ in range(200):
    os.write(fd, b"x" * 4096)
    t = time.perf_counter()
    os.fsync(fd)
    times.append(time.perf_counter() - t)
os.close(fd)
os.unlink(path)
times.sort()
print("fsync of a 4 KiB append (temp dir): median %.3f ms, p99 %.3f ms"
      % (statistics.median(times) * 1000, times[int(0.99 * len(times))] * 1000))
PY
} >"$OUT/meta.txt"

MODES=(off group per-event)
declare -A MODE_ENV=(
    [off]="CUSTODIAN_AUDIT__ENABLED=false"
    [group]=""
    [per-event]="CUSTODIAN_AUDIT__MAX_BATCH=1"
)
declare -A MODE_LABEL=(
    [off]="off"
    [group]="group commit (max_batch 256)"
    [per-event]="one transaction per event (max_batch 1)"
)

for backend in "${ACTIVE[@]}"; do
    # 1. Audit cost.
    for mode in "${MODES[@]}"; do
        say "$backend, audit $mode"
        read -r -a extra <<<"${MODE_ENV[$mode]}"
        start_server "$backend-audit-$mode" "$backend" "${extra[@]}"
        measure "$backend-$mode-health" "$THREADS" "$BASE/health"
        measure "$backend-$mode-me" "$THREADS" "$BASE/api/v1/auth/me" \
            -H "Authorization: Bearer $API_TOKEN"
        stop_server
    done

    # 2. Login, and 3. read under a login flood, on one default server.
    say "$backend, login and login flood"
    start_server "$backend-identity" "$backend"
    measure "$backend-login" "$THREADS" "$BASE/api/v1/auth/login" -s "$LOGIN_LUA"

    # Both reads with one wrk thread, as under the flood, so they compare.
    measure "$backend-me-unloaded" 1 "$BASE/api/v1/auth/me" -H "Authorization: Bearer $API_TOKEN"

    with_retries "$backend-me-loaded" flood_once "$backend"
    copy_measurement "$backend-flood~${TRIES[$backend-me-loaded]%/*}" "$backend-flood"
    stop_server
done

err() { echo "${ERRS[$1]:-none}"; }
# req/s of KEY with DECIMALS, marked † when other processes used over NOISE_MAX cores.
rps() {
    printf "%.${2:-0}f" "${RPS[$1]}"
    if is_noisy "$1"; then printf '†'; fi
}

# Every measurement (each attempt as KEY~n; the kept one as KEY), one per line.
{
    printf 'key\treq_per_s\tp50_ms\tp99_ms\tserver_cores\tpostgres_cores\twrk_cores\tother_cores\tmachine_idle\tkept/attempts\terrors\n'
    for k in $(printf '%s\n' "${!RPS[@]}" | sort); do
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$k" "${RPS[$k]}" "${P50[$k]}" "${P99[$k]}" \
            "${CPU[$k]:-}" "${PGCPU[$k]:-}" "${WRKCPU[$k]:-}" "${OTHER[$k]:-}" "${IDLE[$k]:-}" \
            "${TRIES[$k]:-}" "$(err "$k")"
    done
} >"$OUT/summary.tsv"

{
    echo "### Audit cost: GET /api/v1/auth/me with an API token, $CONNECTIONS clients, wrk -t$THREADS"
    echo
    echo "| backend | audit | /health req/s | /me req/s | /me p50 (ms) | /me p99 (ms) | /me ÷ /health | vs audit off | vs group commit | /me: server CPU (cores) / machine idle | errors |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    for backend in "${ACTIVE[@]}"; do
        for mode in "${MODES[@]}"; do
            h="$backend-$mode-health" m="$backend-$mode-me"
            vs_off="—" vs_group="—"
            if [[ "$mode" != off ]]; then
                o="$backend-off"
                vs_off="$(ratio "${RPS[$m]}" "${RPS[$o-me]}") ($(nratio "${RPS[$m]}" "${RPS[$h]}" "${RPS[$o-me]}" "${RPS[$o-health]}"))"
            fi
            if [[ "$mode" == per-event ]]; then
                g="$backend-group"
                vs_group="$(ratio "${RPS[$m]}" "${RPS[$g-me]}") ($(nratio "${RPS[$m]}" "${RPS[$h]}" "${RPS[$g-me]}" "${RPS[$g-health]}"))"
            fi
            e="$(err "$h")"
            if [[ "$e" == none ]]; then
                e="$(err "$m")"
            else
                e="/health: $e; /me: $(err "$m")"
            fi
            printf '| %s | %s | %s | %s | %.3f | %.3f | %s | %s | %s | %s / %s | %s |\n' \
                "$backend" "${MODE_LABEL[$mode]}" "$(rps "$h")" "$(rps "$m")" "${P50[$m]}" "${P99[$m]}" \
                "$(ratio "${RPS[$m]}" "${RPS[$h]}")" "$vs_off" "$vs_group" "${CPU[$m]}" "${IDLE[$m]}" "$e"
        done
    done
    echo
    echo "Ratios are of /me req/s; in brackets, normalised by each run's /health req/s."
    echo "Server CPU is the custodian process's (of $NPROC cores; PostgreSQL's processes are not in it);"
    echo "machine idle is the whole machine's, wrk included."
    echo -n "Audit cost (1 − group commit ÷ off):"
    for backend in "${ACTIVE[@]}"; do
        r="$(ratio "${RPS[$backend-group-me]}" "${RPS[$backend-off-me]}")"
        n="$(nratio "${RPS[$backend-group-me]}" "${RPS[$backend-group-health]}" "${RPS[$backend-off-me]}" "${RPS[$backend-off-health]}")"
        echo -n " $backend $(pct_cost "$r") (normalised $(pct_cost "$n"));"
    done
    echo " goal ≤ 20 %."
    echo
    echo "### Login: POST /api/v1/auth/login, right password, $CONNECTIONS clients, wrk -t$THREADS"
    echo
    echo "| backend | logins/s | p50 (ms) | p99 (ms) | server CPU (cores) / machine idle | errors |"
    echo "|---|---:|---:|---:|---:|---|"
    for backend in "${ACTIVE[@]}"; do
        k="$backend-login"
        printf '| %s | %s | %.1f | %.1f | %s / %s | %s |\n' "$backend" "$(rps "$k" 1)" "${P50[$k]}" "${P99[$k]}" \
            "${CPU[$k]}" "${IDLE[$k]}" "$(err "$k")"
    done
    echo
    echo "### Read under a login flood: GET /api/v1/auth/me (wrk -t1 -c$CONNECTIONS) alone, then beside a login flood (wrk -t1 -c$CONNECTIONS)"
    echo
    echo "| backend | /me alone req/s | p50 / p99 (ms) | /me under flood req/s | p50 / p99 (ms) | under flood ÷ alone | flood logins/s | server CPU (cores): alone / under flood | errors |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
    for backend in "${ACTIVE[@]}"; do
        u="$backend-me-unloaded" l="$backend-me-loaded" f="$backend-flood"
        e="alone: $(err "$u"); under flood: $(err "$l"); flood: $(err "$f")"
        [[ "$e" == "alone: none; under flood: none; flood: none" ]] && e=none
        printf '| %s | %s | %.3f / %.3f | %s | %.3f / %.3f | %s | %.1f | %s / %s | %s |\n' "$backend" \
            "$(rps "$u")" "${P50[$u]}" "${P99[$u]}" "$(rps "$l")" "${P50[$l]}" "${P99[$l]}" \
            "$(ratio "${RPS[$l]}" "${RPS[$u]}")" "${RPS[$f]}" "${CPU[$u]}" "${CPU[$l]}" "$e"
    done
    echo
    echo "Goal: under flood ÷ alone ≥ 0.70."
    echo
    # How clean the run was: CPU that neither the server, PostgreSQL nor the measuring
    # wrk used (other sessions on a shared machine).
    repeated=0 noisy=0
    for k in "${!TRIES[@]}"; do
        [[ "${TRIES[$k]#*/}" != 1 ]] && repeated=$((repeated + 1))
        is_noisy "$k" && noisy=$((noisy + 1))
    done
    worst="$(for k in "${!TRIES[@]}"; do echo "${OTHER[$k]} $k"; done | sort -rn | head -n1)"
    echo "Interference: $repeated of ${#TRIES[@]} measurements were repeated because other processes used over $NOISE_MAX cores;"
    echo "$noisy kept measurement(s) still had more (marked †); the most was ${worst% *} cores (${worst#* })."
    echo "Under the flood, the flood's own wrk counts as another process."
    echo
    logs=""
    for name in $(printf '%s\n' "${!LOG_ERRORS[@]}" | sort); do
        read -r running shutdown <<<"${LOG_ERRORS[$name]}"
        if ((running + shutdown > 0)); then
            logs+=" $name: $running while running, $shutdown while shutting down;"
        fi
    done
    echo "Server logs, ERROR or panic lines:${logs:- none}"
} >"$OUT/tables.md"

echo
cat "$OUT/meta.txt"
echo
cat "$OUT/tables.md"
echo
echo "raw output: ${OUT#"$ROOT"/}"
