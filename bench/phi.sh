#!/usr/bin/env bash
# PHI reads and search, on SQLite and (when it answers) PostgreSQL.
#
# For each backend (SQLite always; PostgreSQL when `pg_isready -h 127.0.0.1` succeeds),
# on a fresh data directory (and, for PostgreSQL, a fresh database):
#
#  1. Seeding. A doctor is created (`custodian user create --role doctor`), then
#     `custodian demo seed` inserts synthetic patients in chunks of SEED_CHUNK until
#     PATIENTS are in, or until the next chunk would end after SEED_BUDGET: the time is
#     measured and the number reached is reported. A chunk that stops on a random MRN
#     already taken (see below) is counted and the loop goes on.
#  2. One server on that store; login, then an API token (cat_…). The first
#     SAMPLE patients by id (pages of 100 of GET /api/v1/patients) give the ids and MRNs
#     the load cycles over.
#  3. wrk, one endpoint at a time, all with the API token except /health:
#       GET /health                            no I/O, full middleware: the in-run baseline
#       GET /api/v1/auth/me                    token checks + one committed audit event
#       GET /api/v1/patients/{id}              RBAC, audit event committed before the
#                                              answer, every field decrypted; cycles over
#                                              the SAMPLE ids (a Lua script), so no hot row
#       GET /api/v1/patients?q=<MRN>           blind-index search, one match; cycles over
#                                              the SAMPLE MRNs
#       GET /api/v1/patients?q=<family>&limit=20
#                                              blind-index search, ~N/24 matches, a page of
#                                              20 (each named in its own audit event);
#                                              cycles over the 24 family names of the seed
#       GET /api/v1/patients?q=<family>&limit=1
#                                              the same search with a page of 1: the
#                                              difference is the cost of 19 more rows
#                                              (decryption, audit events, JSON)
#       GET /api/v1/patients?q=<first 3 letters of a family name>&limit=20
#                                              a prefix search (name tags): the best 100
#                                              of ~N/24 ranked, a page of 20; cycles over
#                                              the 24 prefixes
#       GET /api/v1/patients?q=<given> <family>&limit=20
#                                              a full name (two words, both must match):
#                                              cycles over the SAMPLE patients' names
#       GET /api/v1/patients?q=<MM/DD/YYYY>&limit=20
#                                              a birth date as typed in the US; cycles
#                                              over the SAMPLE patients' birth dates
#
# Before seeding and before each backend's measurements, the script waits until no
# process named `wrk` and no `bench/audit_identity.sh` has run for QUIET seconds (another
# benchmark on the same machine). A measurement during which other processes used more
# than NOISE_MAX cores is repeated (after waiting for quiet again), up to ATTEMPTS times;
# the quietest attempt is kept and marked † in the tables if it is still noisy.
#
# Usage: bench/phi.sh                     (DURATION=10s by default)
#   DURATION=30s WARMUP=2s                measured run / unmeasured warm-up (at most 10m)
#   THREADS=2 CONNECTIONS=32              wrk -t / -c
#   PATIENTS=100000 SEED_CHUNK=5000 SEED_BUDGET=15m
#                                         patients to seed, per CLI call, time allowed
#   SAMPLE=1000                           ids / MRNs the reads cycle over (100 to 5000)
#   QUIET=30 QUIET_MAX=2h                 seconds of quiet needed; longest wait for it
#   NOISE_MAX=0.25 ATTEMPTS=3             see above
#   SKIP_BUILD=1                          use the binary already in target/release
#   SEED_ARGS=--without-clinical-data     flags of `demo seed` (empty: coded data too)
#   BACKENDS="sqlite postgres"
#   PG_ANALYZE=1                          on PostgreSQL, after the measurements: VACUUM ANALYZE
#                                         the tables and measure every search again
#                                         (0 to skip); useful where autovacuum is off
#   PGHOST=127.0.0.1 PGPORT=5432 PGUSER=postgres PGADMIN_DB=test
#                                         the PostgreSQL server (trust auth) and the
#                                         database to connect to for CREATE/DROP DATABASE
#
# How the database runs the two searches (PostgreSQL: EXPLAIN ANALYZE; SQLite: EXPLAIN
# QUERY PLAN and a timed run, when sqlite3 is installed), after seeding and again after
# the measurements, goes to BACKEND-plans.txt.
#
# Raw wrk output, Lua scripts (no token in them: it is passed with -H), server and CLI
# logs, summary.tsv and tables.md go to bench/results/<timestamp>/. Everything listens
# on 127.0.0.1 only; the server, temporary directories and the databases created here
# are removed on exit.
set -euo pipefail

DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-32}"
BACKENDS="${BACKENDS:-sqlite postgres}"
PATIENTS="${PATIENTS:-100000}"
SEED_CHUNK="${SEED_CHUNK:-5000}"
SEED_BUDGET="${SEED_BUDGET:-15m}"
SAMPLE="${SAMPLE:-1000}"
QUIET="${QUIET:-30}"
QUIET_MAX="${QUIET_MAX:-2h}"
NOISE_MAX="${NOISE_MAX:-0.25}"
ATTEMPTS="${ATTEMPTS:-3}"
PG_ANALYZE="${PG_ANALYZE:-1}"
# The patient tables only, by default: coded clinical data (labs, conditions,
# medications) takes five times as long to seed and no search here reads it.
SEED_ARGS="${SEED_ARGS:---without-clinical-data}"
PG_HOST="${PGHOST:-127.0.0.1}"
PG_PORT="${PGPORT:-5432}"
PG_USER="${PGUSER:-postgres}"
PG_ADMIN_DB="${PGADMIN_DB:-test}"
HOST=127.0.0.1
BENCH_USER=loadgen   # not a part of the password: the policy refuses that
BENCH_PASSWORD='Bench-Pass-12345!'

die() { echo "phi: $*" >&2; exit 1; }
say() { echo "phi: $(date -u +%H:%M:%S) $*" >&2; }

# Bounded durations: a number with s, m or h.
duration_secs() {
    local d="$1" max="${2:-600}"
    [[ "$d" =~ ^([0-9]+)(s|m|h)$ ]] || die "duration '$d': use e.g. 10s or 1m"
    local n="${BASH_REMATCH[1]}"
    [[ "${BASH_REMATCH[2]}" == m ]] && n=$((n * 60))
    [[ "${BASH_REMATCH[2]}" == h ]] && n=$((n * 3600))
    ((n <= max)) || die "duration '$d' is over $max s"
    echo "$n"
}
DURATION_S="$(duration_secs "$DURATION")"
((DURATION_S > 0)) || die "DURATION must be more than 0"
[[ "$WARMUP" == 0 ]] && WARMUP=0s
WARMUP_S="$(duration_secs "$WARMUP")"
SEED_BUDGET_S="$(duration_secs "$SEED_BUDGET" 7200)"
QUIET_MAX_S="$(duration_secs "$QUIET_MAX" 86400)"
for v in THREADS CONNECTIONS PATIENTS SEED_CHUNK SAMPLE QUIET; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be an integer"
done
((THREADS > 0 && CONNECTIONS > 0 && PATIENTS > 0 && SEED_CHUNK > 0)) || die "THREADS, CONNECTIONS, PATIENTS, SEED_CHUNK must be positive"
((PATIENTS <= 1000000)) || die "PATIENTS is at most 1000000"
((SAMPLE >= 100 && SAMPLE <= 5000)) || die "SAMPLE must be 100 to 5000"
[[ "$ATTEMPTS" =~ ^[1-5]$ ]] || die "ATTEMPTS must be 1 to 5"
[[ "$NOISE_MAX" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "NOISE_MAX must be a number of cores, e.g. 0.25"
[[ "$PG_HOST" == 127.0.0.1 || "$PG_HOST" == localhost || "$PG_HOST" == ::1 ]] \
    || die "PGHOST must be a loopback address"
[[ "$PG_HOST" == ::1 ]] && PG_HOST_URL="[::1]" || PG_HOST_URL="$PG_HOST"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

for tool in wrk curl python3 timeout pgrep; do
    command -v "$tool" >/dev/null || die "$tool is not installed (Debian: apt-get install -y wrk curl python3 coreutils procps)"
done

if [[ -z "${SKIP_BUILD:-}" ]]; then
    say "building the release binary..."
    cargo build --release --bin custodian
fi
CUSTODIAN_BIN="$ROOT/target/release/custodian"
[[ -x "$CUSTODIAN_BIN" ]] || die "release binary missing; run without SKIP_BUILD"

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$ROOT/bench/results/$STAMP"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/custodian-bench-phi.XXXXXX")"
DB_PREFIX="custodian_bench_phi_$(date -u +%s)_$$"

SERVER_PID=""
SERVER_NAME=""
SERVER_LOG=""
DATABASES=()
psql_admin() {
    timeout 30 psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" \
        -d "$PG_ADMIN_DB" "$@"
}
declare -A LOG_ERRORS
log_errors() { grep -ciE ' ERROR |panic' "$1" 2>/dev/null || true; }
stop_server() {
    if [[ -n "$SERVER_PID" ]]; then
        local running
        running="$(log_errors "$SERVER_LOG")"
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
        LOG_ERRORS[$SERVER_NAME]="$running $(($(log_errors "$SERVER_LOG") - running))"
    fi
}
cleanup() {
    local db
    stop_server
    for db in "${DATABASES[@]}"; do
        psql_admin -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 \
            || echo "phi: could not drop database $db" >&2
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Waits until no process named wrk and no bench/audit_identity.sh has been seen for
# QUIET seconds (polled every 2 s); gives up after QUIET_MAX. For the first CPU_WAIT
# seconds it also waits for the machine itself to be quiet (under 0.3 cores busy in
# each 2 s poll): other work (a build, tests) would disturb the measurement too.
CPU_WAIT="${CPU_WAIT:-300}"
[[ "$CPU_WAIT" =~ ^[0-9]+$ ]] || die "CPU_WAIT must be an integer"
busy_cores() {
    awk -v b="$1" -v a="$2" -v n="$(nproc)" 'BEGIN {
        split(b, x, " "); split(a, y, " "); t = y[3] - x[3]
        printf "%.2f", (t > 0) ? n * (1 - (y[1] - x[1] + y[2] - x[2]) / t) : 0 }'
}
stat_idle() { awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print $5, $6, t }' /proc/stat; }
wait_quiet() {
    local start last now why="" said="" s0 s1 cores
    start="$(date +%s)" last="$start"
    s0="$(stat_idle)"
    while :; do
        sleep 2
        s1="$(stat_idle)" now="$(date +%s)"
        cores="$(busy_cores "$s0" "$s1")" s0="$s1"
        why=""
        if pgrep -x wrk >/dev/null || pgrep -f 'bench/audit_identity\.sh' >/dev/null; then
            why="another benchmark (wrk or bench/audit_identity.sh) is running"
        elif ((now - start < CPU_WAIT)) && awk -v c="$cores" 'BEGIN { exit !(c > 0.3) }'; then
            why="the machine is busy ($cores cores)"
        fi
        if [[ -n "$why" ]]; then
            [[ -z "$said" ]] && say "$why; waiting for $QUIET s of quiet"
            said=1 last="$now"
        fi
        ((now - last >= QUIET)) && break
        ((now - start <= QUIET_MAX_S)) || die "no $QUIET s of quiet within $QUIET_MAX"
    done
    [[ -n "$said" ]] && say "quiet again after $((now - start)) s"
    return 0
}

# custodian with no CUSTODIAN_* variable from the caller, in its (empty) data directory
# so that no ./config/dev.yaml applies, with the given KEY=VALUE variables.
custodian_env() {
    local dir="$1"
    shift
    while IFS= read -r var; do unset "$var"; done < <(compgen -e | grep '^CUSTODIAN_' || true)
    cd "$dir"
    export CUSTODIAN_DATA_DIR="$dir"
    export CUSTODIAN_RATE_LIMIT__ENABLED=false
    export CUSTODIAN_LOGGING__LEVEL=warn
    export CUSTODIAN_SESSION__IDLE_TIMEOUT=60m
    local kv
    for kv in "$@"; do export "${kv?}"; done
}

json_field() {
    python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}
login_body() {
    python3 -c 'import json, sys; print(json.dumps({"username": sys.argv[1], "password": sys.argv[2]}))' \
        "$BENCH_USER" "$BENCH_PASSWORD"
}

# Latency as wrk prints it (e.g. 812.00us, 1.23ms, 1.01s) -> milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v; sub(/[a-z]+$/, "", n); u = v; sub(/^[0-9.]+/, "", u)
        f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : -1
        if (f < 0 || n == "") { print "nan"; exit }
        printf "%.3f", n * f
    }'
}

declare -A RPS P50 P99 ERRS CPU PGCPU WRKCPU OTHER IDLE TRIES
declare -A SEED_N SEED_R SEED_S SEED_NOTE SIZE ROWS COLLISIONS
CLK_TCK="$(getconf CLK_TCK)"
NPROC="$(nproc)"

# CPU accounting around a measured run, as in bench/audit_identity.sh:
# "server pg wrk idle irq total wall" (ticks; wall in seconds).
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
# Sets, in cores: CPU[key] (server), PGCPU[key] (PostgreSQL), WRKCPU[key] (the measuring
# wrk), OTHER[key] (everything else: other sessions, hypervisor steal); IDLE[key] (%).
cpu_account() {
    local key="$1" before="$2" after r
    after="$(cpu_snapshot)"
    r="$(awk -v b="$before" -v a="$after" -v hz="$CLK_TCK" -v n="$NPROC" 'BEGIN {
        split(b, x, " "); split(a, y, " "); w = y[7] - x[7]; t = y[6] - x[6]
        if (w <= 0 || t <= 0) { print "n/a n/a n/a n/a n/a"; exit }
        s = (y[1] - x[1]) / hz / w; p = (y[2] - x[2]) / hz / w; k = (y[3] - x[3]) / hz / w
        if (p < 0) p = 0
        busy = n * (1 - (y[4] - x[4] + y[5] - x[5]) / t); o = busy - s - p - k; if (o < 0) o = 0
        printf "%.2f %.2f %.2f %.2f %.0f%%\n", s, p, k, o, 100 * (y[4] - x[4]) / t }')"
    read -r "CPU[$key]" "PGCPU[$key]" "WRKCPU[$key]" "OTHER[$key]" "IDLE[$key]" <<<"$r"
    IDLE[$key]="${IDLE[$key]/\%/ %}"
}
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
#   run_wrk OUTFILE DURATION URL [wrk args...]
run_wrk() {
    local raw="$1" dur="$2" url="$3"
    shift 3
    local secs
    secs="$(duration_secs "$dur")"
    timeout $((secs + 60)) wrk -t"$THREADS" -c"$CONNECTIONS" -d"$dur" --timeout 10s --latency \
        "$@" "$url" >"$raw" || die "wrk failed or timed out: $raw"
}
copy_measurement() {
    local from="$1" to="$2" name
    for name in RPS P50 P99 ERRS CPU PGCPU WRKCPU OTHER IDLE; do
        local -n arr="$name"
        # shellcheck disable=SC2004,SC2034
        arr[$to]="${arr[$from]:-}"
        unset -n arr
    done
}
is_noisy() { awk -v o="${OTHER[$1]:-0}" -v m="$NOISE_MAX" 'BEGIN { exit !(o == "n/a" || o > m) }'; }

#   measure_once KEY~n URL [wrk args...]
measure_once() {
    local key="$1" url="$2"
    shift 2
    local file="${key/\~/.}" before
    if ((WARMUP_S > 0)); then
        run_wrk "$OUT/wrk-$file-warmup.txt" "$WARMUP" "$url" "$@"
    fi
    say "wrk $DURATION: $key"
    before="$(cpu_snapshot)"
    run_wrk "$OUT/wrk-$file.txt" "$DURATION" "$url" "$@"
    cpu_account "$key" "$before"
    parse_wrk "$key" "$OUT/wrk-$file.txt"
}
# Up to ATTEMPTS runs until other processes used at most NOISE_MAX cores; keeps the
# quietest as KEY. Before a repeat, waits for the other benchmark (if any) to finish.
#   measure KEY URL [wrk args...]
measure() {
    local key="$1"
    shift
    local a best=""
    for ((a = 1; a <= ATTEMPTS; a++)); do
        measure_once "$key~$a" "$@"
        if [[ -z "$best" ]] || awk -v o="${OTHER[$key~$a]}" -v b="${OTHER[$key~$best]}" \
            'BEGIN { exit !(b == "n/a" || (o != "n/a" && o < b)) }'; then
            best="$a"
        fi
        is_noisy "$key~$a" || break
        if ((a < ATTEMPTS)); then
            say "$key: other processes used ${OTHER[$key~$a]} cores; measuring again"
            wait_quiet
        fi
    done
    copy_measurement "$key~$best" "$key"
    TRIES[$key]="$best/$((a > ATTEMPTS ? ATTEMPTS : a))"
}

# A Lua script cycling over the request paths in FILE (one a line); each wrk thread
# starts at a different place in the list.
#   cycle_lua FILE > SCRIPT
cycle_lua() {
    echo '-- generated by bench/phi.sh: cycles over these paths'
    echo 'local paths = {'
    sed 's/.*/  "&",/' "$1"
    echo '}'
    cat <<'LUA'
local n = #paths
local threads = 0
function setup(thread)
  thread:set("start", (threads * 7919) % n)
  threads = threads + 1
end
function init(args)
  i = start or 0
end
function request()
  i = i % n + 1
  return wrk.format("GET", paths[i])
end
LUA
}

# How the database runs the two searches, with the real blind indexes of one patient
# (the SQL of src/records/store.rs, no cursor), appended to BACKEND-plans.txt.
#   capture_plans WHEN            (uses backend, db, dir)
plan_sql() {
    if [[ "$1" != - ]]; then
        echo "SELECT id FROM patients WHERE (bi_mrn IN ('$1') OR bi_ssn IN ('$1')) AND deleted_at IS NULL ORDER BY id LIMIT 100"
    else
        echo "SELECT patient_id FROM (SELECT patient_id FROM patient_terms WHERE tag = '$2' \
AND patient_id > '' ORDER BY patient_id LIMIT 101) AS t0 ORDER BY patient_id LIMIT 101"
    fi
}
capture_plans() {
    local bm bf q what
    {
        echo "######## $1"
        if [[ "$backend" == postgres ]]; then
            pgq() { timeout 60 psql -X -q -At -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$db" "$@"; }
            echo "== pg_stat_user_tables: n_live_tup, last_autoanalyze, last_analyze"
            pgq -c "SELECT n_live_tup, last_autoanalyze, last_analyze FROM pg_stat_user_tables WHERE relname = 'patients'"
            read -r bm bf < <(pgq -F ' ' -c "SELECT p.bi_mrn, t.tag FROM patients p JOIN patient_terms t ON t.patient_id = p.id ORDER BY p.id DESC LIMIT 1")
            echo "== search by MRN (EXPLAIN ANALYZE)"
            pgq -c "EXPLAIN (ANALYZE, BUFFERS) $(plan_sql "$bm" -)"
            echo "== a page of one name tag (EXPLAIN ANALYZE)"
            pgq -c "EXPLAIN (ANALYZE, BUFFERS) $(plan_sql - "$bf")"
        elif command -v sqlite3 >/dev/null; then
            sq() { timeout 60 sqlite3 -readonly "$dir/custodian.sqlite" "$@"; }
            read -r bm bf < <(sq -separator ' ' "SELECT p.bi_mrn, t.tag FROM patients p JOIN patient_terms t ON t.patient_id = p.id ORDER BY p.id DESC LIMIT 1")
            for what in MRN "name tag"; do
                if [[ "$what" == MRN ]]; then q="$(plan_sql "$bm" -)"; else q="$(plan_sql - "$bf")"; fi
                echo "== search by $what (EXPLAIN QUERY PLAN; then the query alone, timed)"
                sq "EXPLAIN QUERY PLAN $q"
                printf '.timer on\n%s;\n' "$q" | sq | grep -i '^run time' || true
            done
        else
            echo "sqlite3 is not installed: no query plan"
        fi
        echo
    } >>"$OUT/$backend-plans.txt" 2>&1 || say "$backend: could not get the query plans"
}

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
    echo "nproc: $NPROC"
    echo "cpu: ${CPU_MODEL:-unknown}"
    echo "kernel: $(uname -r)"
    echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
    echo "wrk: $(wrk -v 2>&1 | head -n1 || true)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock migrations 2>/dev/null || echo ' (with uncommitted changes to the server)')"
    echo "backends: ${ACTIVE[*]}"
    if [[ " ${ACTIVE[*]} " == *" postgres "* ]]; then
        echo "postgres: $(psql_admin -Atc 'SHOW server_version' 2>/dev/null || echo unknown)"
    fi
    echo "load: wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency (warm-up $WARMUP)"
    echo "seed: $PATIENTS patients wanted, chunks of $SEED_CHUNK, budget $SEED_BUDGET per backend"
    echo "sample: $SAMPLE patient ids / MRNs cycled over"
} >"$OUT/meta.txt"

for backend in "${ACTIVE[@]}"; do
    dir="$(mktemp -d "$WORK/$backend.XXXXXX")"
    env=()
    if [[ "$backend" == postgres ]]; then
        db="${DB_PREFIX}_${#DATABASES[@]}"
        DATABASES+=("$db")
        psql_admin -c "CREATE DATABASE \"$db\"" >/dev/null || die "cannot create database $db"
        env+=("CUSTODIAN_DATABASE__URL=postgres://$PG_USER@$PG_HOST_URL:$PG_PORT/$db")
    fi

    # Patients and records in the store.
    store_counts() {
        if [[ "$backend" == postgres ]]; then
            timeout 60 psql -X -q -At -F ' ' -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$db" \
                -c "SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM records)"
        else
            timeout 60 python3 - "$dir/custodian.sqlite" <<'PY'
import sqlite3, sys
c = sqlite3.connect("file:%s?mode=ro" % sys.argv[1], uri=True)
print(*c.execute("SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM records)").fetchone())
PY
        fi
    }

    # 1. User and seed.
    printf '%s\n' "$BENCH_PASSWORD" | (
        custodian_env "$dir" "${env[@]}"
        exec timeout 60 "$CUSTODIAN_BIN" --env dev user create --username "$BENCH_USER" \
            --role doctor --password-stdin
    ) >"$OUT/$backend-user-create.log" 2>&1 || die "user create failed (see $OUT/$backend-user-create.log)"

    wait_quiet
    say "$backend: seeding up to $PATIENTS patients"
    # `demo seed` draws each MRN at random from 10^8 values and fails on the first one
    # already taken (about 12,500 patients in, on average): the patients inserted before
    # stay, so the loop counts what is in the store and runs it again (COLLISIONS counts
    # those failures). Any other failure stops the script.
    seeded=0 records=0 t0="$(date +%s.%N)" pace=0 note="" collisions=0
    : >"$OUT/$backend-seed.log"
    while ((seeded < PATIENTS)); do
        n=$((PATIENTS - seeded < SEED_CHUNK ? PATIENTS - seeded : SEED_CHUNK))
        elapsed="$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
        # Stop when the next chunk, at the pace so far, would end after the budget.
        if awk -v e="$elapsed" -v p="$pace" -v n="$n" -v b="$SEED_BUDGET_S" \
            'BEGIN { exit !(p > 0 && e + n / p > b) }'; then
            note="stopped at $seeded: the next chunk would have ended after $SEED_BUDGET"
            say "$backend: $note"
            break
        fi
        if made="$(
            custodian_env "$dir" "${env[@]}"
            # shellcheck disable=SC2086 # SEED_ARGS is a list of flags
            exec timeout $((SEED_BUDGET_S + 600)) "$CUSTODIAN_BIN" --env dev demo seed --patients "$n" $SEED_ARGS \
                2>>"$OUT/$backend-seed.log"
        )"; then
            echo "chunk of $n: $made" >>"$OUT/$backend-seed.log"
        elif tail -n1 "$OUT/$backend-seed.log" | grep -q 'a patient with this MRN exists'; then
            collisions=$((collisions + 1))
            echo "chunk of $n: stopped by an MRN collision" >>"$OUT/$backend-seed.log"
        else
            die "demo seed failed (see $OUT/$backend-seed.log)"
        fi
        read -r seeded records < <(store_counts) || die "cannot count the patients in the $backend store"
        pace="$(awk -v a="$t0" -v b="$(date +%s.%N)" -v n="$seeded" 'BEGIN { printf "%.3f", n / (b - a) }')"
        say "$backend: $seeded patients after $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }') s ($collisions MRN collisions)"
    done
    COLLISIONS[$backend]="$collisions"
    SEED_N[$backend]="$seeded"
    SEED_R[$backend]="$records"
    SEED_S[$backend]="$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
    SEED_NOTE[$backend]="$note"
    if [[ "$backend" == postgres ]]; then
        SIZE[$backend]="$(psql_admin -Atc "SELECT pg_size_pretty(pg_database_size('$db'))")"
    else
        SIZE[$backend]="$(du -sh "$dir" | cut -f1)"
    fi

    capture_plans "after seeding"

    # 2. Server, token, sample.
    port="$(free_port)"
    BASE="http://$HOST:$port"
    SERVER_NAME="$backend"
    SERVER_LOG="$OUT/$backend-server.log"
    (
        custodian_env "$dir" "${env[@]}"
        exec "$CUSTODIAN_BIN" --env dev serve --listen "$HOST:$port"
    ) >"$SERVER_LOG" 2>&1 &
    SERVER_PID="$!"
    for ((i = 0; ; i++)); do
        kill -0 "$SERVER_PID" 2>/dev/null || die "server $backend exited early (see $SERVER_LOG)"
        curl -fsS -o /dev/null --max-time 1 "$BASE/health" 2>/dev/null && break
        ((i < 300)) || die "timed out waiting for server $backend (see $SERVER_LOG)"
        sleep 0.2
    done
    login="$(curl -fsS --max-time 10 -H 'Content-Type: application/json' \
        -d "$(login_body)" "$BASE/api/v1/auth/login")" || die "login failed on $backend"
    session="$(json_field access_token <<<"$login")"
    [[ "$session" == cst_* ]] || die "no session token from login on $backend"
    API_TOKEN="$(curl -fsS --max-time 10 -H 'Content-Type: application/json' \
        -H "Authorization: Bearer $session" -d '{"name":"bench"}' "$BASE/api/v1/tokens" \
        | json_field token)" || die "token creation failed on $backend"
    [[ "$API_TOKEN" == cat_* ]] || die "no API token on $backend"

    # The first SAMPLE patients by id, and a check of each kind of request; writes the
    # path lists and prints "rows per answer" for the two searches.
    BASE="$BASE" TOKEN="$API_TOKEN" SAMPLE="$SAMPLE" P="$OUT/$backend" python3 - \
        >"$OUT/$backend-sample.txt" 2>"$OUT/$backend-sample.log" <<'PY' \
        || die "sampling patients failed on $backend (see $OUT/$backend-sample.log)"
import json, os, sys, urllib.parse, urllib.request
base, token, sample, p = os.environ["BASE"], os.environ["TOKEN"], int(os.environ["SAMPLE"]), os.environ["P"]
def get(path):
    req = urllib.request.Request(base + path, headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200, (path, r.status)
        return json.load(r)
ids, mrns, families, names, births, cursor = [], [], set(), [], [], None
while len(ids) < sample:
    page = get("/api/v1/patients?limit=100" + ("&cursor=" + urllib.parse.quote(cursor) if cursor else ""))
    for it in page["items"]:
        ids.append(it["id"]); mrns.append(it["mrn"]); families.add(it["family_name"])
        names.append("%s %s" % (it["given_name"], it["family_name"]))
        y, m, d = it["birth_date"].split("-")
        births.append("%s/%s/%s" % (m, d, y))
    cursor = page["next_cursor"]
    if not cursor:
        break
ids, mrns = ids[:sample], mrns[:sample]
one = get("/api/v1/patients/" + urllib.parse.quote(ids[0], safe=""))
assert one["id"] == ids[0] and one["family_name"], "GET /patients/{id} gave another patient"
m = get("/api/v1/patients?q=" + urllib.parse.quote(mrns[0]))
assert [i["mrn"] for i in m["items"]] == [mrns[0]], "search by MRN did not find exactly that patient"
families = sorted(families)
n = get("/api/v1/patients?limit=20&q=" + urllib.parse.quote(families[0]))
assert n["items"] and all(i["family_name"] == families[0] for i in n["items"]), "search by name"
with open(p + "-get.paths", "w") as f:
    f.writelines("/api/v1/patients/%s\n" % urllib.parse.quote(i, safe="") for i in ids)
with open(p + "-mrn.paths", "w") as f:
    f.writelines("/api/v1/patients?q=%s\n" % urllib.parse.quote(x) for x in mrns)
with open(p + "-name.paths", "w") as f:
    f.writelines("/api/v1/patients?q=%s&limit=20\n" % urllib.parse.quote(x) for x in families)
with open(p + "-name1.paths", "w") as f:
    f.writelines("/api/v1/patients?q=%s&limit=1\n" % urllib.parse.quote(x) for x in families)
with open(p + "-prefix.paths", "w") as f:
    f.writelines("/api/v1/patients?q=%s&limit=20\n" % urllib.parse.quote(x[:3]) for x in families)
with open(p + "-fullname.paths", "w") as f:
    f.writelines("/api/v1/patients?q=%s&limit=20\n" % urllib.parse.quote(x) for x in names[:sample])
with open(p + "-dob.paths", "w") as f:
    f.writelines("/api/v1/patients?q=%s&limit=20\n" % urllib.parse.quote(x) for x in births[:sample])
px = get("/api/v1/patients?limit=20&q=" + urllib.parse.quote(families[0][:3]))
assert px["items"] and all(i["family_name"].startswith(families[0][:3]) for i in px["items"]), "prefix search"
fn = get("/api/v1/patients?limit=20&q=" + urllib.parse.quote(names[0]))
assert any(i["id"] == ids[0] for i in fn["items"]), "full-name search"
db = get("/api/v1/patients?limit=20&q=" + urllib.parse.quote(births[0]))
assert any(i["id"] == ids[0] for i in db["items"]), "birth-date search"
print("ids %d, family names %d" % (len(ids), len(families)), file=sys.stderr)
print(len(m["items"]), len(n["items"]), len(px["items"]), len(fn["items"]), len(db["items"]))
PY
    read -r "ROWS[$backend-mrn]" "ROWS[$backend-name]" "ROWS[$backend-prefix]" "ROWS[$backend-fullname]" \
        "ROWS[$backend-dob]" <"$OUT/$backend-sample.txt"
    for kind in get mrn name name1 prefix fullname dob; do
        cycle_lua "$OUT/$backend-$kind.paths" >"$OUT/$backend-$kind.lua"
    done
    say "$backend: $(wc -l <"$OUT/$backend-get.paths") ids, $(wc -l <"$OUT/$backend-name.paths") family names"

    # 3. Measurements.
    wait_quiet
    auth=(-H "Authorization: Bearer $API_TOKEN")
    measure "$backend-health" "$BASE/health"
    measure "$backend-me" "$BASE/api/v1/auth/me" "${auth[@]}"
    measure "$backend-get" "$BASE/" "${auth[@]}" -s "$OUT/$backend-get.lua"
    measure "$backend-mrn" "$BASE/" "${auth[@]}" -s "$OUT/$backend-mrn.lua"
    measure "$backend-name" "$BASE/" "${auth[@]}" -s "$OUT/$backend-name.lua"
    measure "$backend-name1" "$BASE/" "${auth[@]}" -s "$OUT/$backend-name1.lua"
    measure "$backend-prefix" "$BASE/" "${auth[@]}" -s "$OUT/$backend-prefix.lua"
    measure "$backend-fullname" "$BASE/" "${auth[@]}" -s "$OUT/$backend-fullname.lua"
    measure "$backend-dob" "$BASE/" "${auth[@]}" -s "$OUT/$backend-dob.lua"
    ROWS[$backend-name1]=1
    if [[ "$backend" == postgres && "$PG_ANALYZE" == 1 ]]; then
        # The planner's statistics: autovacuum may be off (or not have run yet) on this
        # server, so measure the searches again once the tables are analysed.
        capture_plans "after the measurements, before VACUUM ANALYZE"
        timeout 300 psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$db" \
            -c "VACUUM (ANALYZE) patients" -c "VACUUM (ANALYZE) records" \
            -c "VACUUM (ANALYZE) patient_terms" || die "VACUUM (ANALYZE) failed"
        capture_plans "after VACUUM ANALYZE"
        wait_quiet
        for kind in mrn name name1 prefix fullname dob; do
            measure "$backend-$kind+analyze" "$BASE/" "${auth[@]}" -s "$OUT/$backend-$kind.lua"
            ROWS[$backend-$kind+analyze]="${ROWS[$backend-$kind]}"
        done
        stop_server
    else
        stop_server
        capture_plans "after the measurements"
    fi
done

err() { echo "${ERRS[$1]:-none}"; }
rps() {
    printf "%.${2:-0}f" "${RPS[$1]}"
    if is_noisy "$1"; then printf '†'; fi
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
# Microseconds of CPU (cores at saturation) per request.
us_per() { awk -v c="$1" -v r="$2" 'BEGIN { if (c != "n/a" && r > 0) printf "%.0f", c / r * 1e6; else print "n/a" }'; }
yes_no() { awk -v v="$1" -v t="$2" -v op="$3" 'BEGIN {
    ok = (op == ">=") ? (v >= t) : (v <= t); printf "%s", ok ? "met" : "missed" }'; }

{
    printf 'key\treq_per_s\tp50_ms\tp99_ms\tserver_cores\tpostgres_cores\twrk_cores\tother_cores\tmachine_idle\tkept/attempts\terrors\n'
    for k in $(printf '%s\n' "${!RPS[@]}" | sort); do
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$k" "${RPS[$k]}" "${P50[$k]}" "${P99[$k]}" \
            "${CPU[$k]:-}" "${PGCPU[$k]:-}" "${WRKCPU[$k]:-}" "${OTHER[$k]:-}" "${IDLE[$k]:-}" \
            "${TRIES[$k]:-}" "$(err "$k")"
    done
} >"$OUT/summary.tsv"

{
    echo "### Seeding: custodian demo seed, chunks of $SEED_CHUNK"
    echo
    echo "| backend | patients | records | seconds | patients/s | store size | MRN collisions | note |"
    echo "|---|---:|---:|---:|---:|---:|---:|---|"
    for b in "${ACTIVE[@]}"; do
        printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$b" "${SEED_N[$b]}" "${SEED_R[$b]}" "${SEED_S[$b]}" \
            "$(awk -v n="${SEED_N[$b]}" -v s="${SEED_S[$b]}" 'BEGIN { printf "%.0f", (s > 0) ? n / s : 0 }')" \
            "${SIZE[$b]}" "${COLLISIONS[$b]}" "${SEED_NOTE[$b]:-—}"
    done
    echo
    echo "### Reads: $CONNECTIONS clients, wrk -t$THREADS, API token; GET /api/v1/patients/{id} cycles over $SAMPLE ids"
    echo
    echo "| backend | endpoint | req/s | p50 (ms) | p99 (ms) | ÷ /health req/s | server µs CPU / req | PostgreSQL µs CPU / req | machine idle | errors |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
    for b in "${ACTIVE[@]}"; do
        for e in health me get; do
            k="$b-$e"
            # shellcheck disable=SC2016 # backquotes for markdown
            case "$e" in
                health) label='`GET /health`' ;;
                me) label='`GET /api/v1/auth/me`' ;;
                get) label='`GET /api/v1/patients/{id}`' ;;
            esac
            pg="—"; [[ "$b" == postgres ]] && pg="$(us_per "${PGCPU[$k]}" "${RPS[$k]}")"
            printf '| %s | %s | %s | %.3f | %.3f | %s | %s | %s | %s | %s |\n' "$b" "$label" "$(rps "$k")" \
                "${P50[$k]}" "${P99[$k]}" "$(ratio "${RPS[$k]}" "${RPS[$b-health]}")" \
                "$(us_per "${CPU[$k]}" "${RPS[$k]}")" "$pg" "${IDLE[$k]}" "$(err "$k")"
        done
    done
    echo
    echo -n "Targets for GET /api/v1/patients/{id}: ≥ 0.40 of /health req/s and p99 ≤ 10 ms."
    for b in "${ACTIVE[@]}"; do
        r="$(ratio "${RPS[$b-get]}" "${RPS[$b-health]}")"
        echo -n " $b: ratio $r ($(yes_no "$r" 0.40 '>=')), p99 ${P99[$b-get]} ms ($(yes_no "${P99[$b-get]}" 10 '<='));"
    done
    echo
    echo
    echo "### Search: $CONNECTIONS clients, wrk -t$THREADS, API token"
    echo
    echo "| backend | patients | query | rows per answer | req/s | p50 (ms) | p99 (ms) | ÷ /health req/s | server µs CPU / req | PostgreSQL µs CPU / req | errors |"
    echo "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"
    for b in "${ACTIVE[@]}"; do
        for e in mrn name name1 prefix fullname dob mrn+analyze name+analyze name1+analyze \
            prefix+analyze fullname+analyze dob+analyze; do
            k="$b-$e"
            [[ -n "${RPS[$k]:-}" ]] || continue
            # shellcheck disable=SC2016 # backquotes for markdown
            case "$e" in
                mrn) label="\`q=<MRN>\` (cycles over $SAMPLE)" ;;
                name) label='`q=<family name>&limit=20` (cycles over 24)' ;;
                mrn+analyze) label="\`q=<MRN>\`, after \`VACUUM ANALYZE\`" ;;
                name+analyze) label='`q=<family name>&limit=20`, after `VACUUM ANALYZE`' ;;
                name1) label='`q=<family name>&limit=1` (same query, 1 row)' ;;
                name1+analyze) label='`q=<family name>&limit=1`, after `VACUUM ANALYZE`' ;;
                prefix) label='`q=<3 letters of a family name>&limit=20` (cycles over 24)' ;;
                fullname) label="\`q=<given> <family>&limit=20\` (cycles over $SAMPLE)" ;;
                dob) label="\`q=<MM/DD/YYYY>&limit=20\` (cycles over $SAMPLE)" ;;
                prefix+analyze) label='`q=<3 letters of a family name>&limit=20`, after `VACUUM ANALYZE`' ;;
                fullname+analyze) label='`q=<given> <family>&limit=20`, after `VACUUM ANALYZE`' ;;
                dob+analyze) label='`q=<MM/DD/YYYY>&limit=20`, after `VACUUM ANALYZE`' ;;
            esac
            pg="—"; [[ "$b" == postgres ]] && pg="$(us_per "${PGCPU[$k]}" "${RPS[$k]}")"
            printf '| %s | %s | %s | %s | %s | %.3f | %.3f | %s | %s | %s | %s |\n' "$b" "${SEED_N[$b]}" "$label" \
                "${ROWS[$k]}" "$(rps "$k")" "${P50[$k]}" "${P99[$k]}" "$(ratio "${RPS[$k]}" "${RPS[$b-health]}")" \
                "$(us_per "${CPU[$k]}" "${RPS[$k]}")" "$pg" "$(err "$k")"
        done
    done
    echo
    echo -n "Target for a prefix search (issue 22): p99 ≤ 50 ms on SQLite."
    for k in "${ACTIVE[@]/%/-prefix}" "${ACTIVE[@]/%/-prefix+analyze}"; do
        [[ -n "${P99[$k]:-}" ]] && echo -n " ${k%-prefix*}${k#*-prefix}: ${P99[$k]} ms ($(yes_no "${P99[$k]}" 50 '<='));"
    done
    echo
    echo -n "Target for search by name: p99 ≤ 20 ms."
    for b in "${ACTIVE[@]}"; do
        echo -n " $b: ${P99[$b-name]} ms ($(yes_no "${P99[$b-name]}" 20 '<='));"
        if [[ -n "${RPS[$b-name+analyze]:-}" ]]; then
            echo -n " $b after VACUUM ANALYZE: ${P99[$b-name+analyze]} ms ($(yes_no "${P99[$b-name+analyze]}" 20 '<='));"
        fi
    done
    echo
    echo
    repeated=0 noisy=0
    for k in "${!TRIES[@]}"; do
        [[ "${TRIES[$k]#*/}" != 1 ]] && repeated=$((repeated + 1))
        is_noisy "$k" && noisy=$((noisy + 1))
    done
    worst="$(for k in "${!TRIES[@]}"; do echo "${OTHER[$k]} $k"; done | sort -rn | head -n1)"
    echo "Interference: $repeated of ${#TRIES[@]} measurements were repeated because other processes used over $NOISE_MAX cores;"
    echo "$noisy kept measurement(s) still had more (marked †); the most was ${worst% *} cores (${worst#* })."
    echo
    logs=""
    for name in $(printf '%s\n' "${!LOG_ERRORS[@]}" | sort); do
        read -r running shutdown <<<"${LOG_ERRORS[$name]}"
        if ((running + shutdown > 0)); then
            logs+=" $name: $running while running, $shutdown while shutting down;"
        fi
    done
    echo "Server logs, ERROR or panic lines:${logs:- none}"
    seedlogs=""
    for b in "${ACTIVE[@]}"; do
        c="$(log_errors "$OUT/$b-seed.log")"
        ((c > 0)) && seedlogs+=" $b: $c;"
    done
    echo "Seed logs, ERROR or panic lines:${seedlogs:- none}"
} >"$OUT/tables.md"

echo
cat "$OUT/meta.txt"
echo
cat "$OUT/tables.md"
echo
echo "raw output: ${OUT#"$ROOT"/}"
