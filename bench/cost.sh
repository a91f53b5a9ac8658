#!/usr/bin/env bash
# What one request costs the machine, A/B between binaries or settings, in one session.
#
# On a shared 2-core machine req/s moves by ±30 % from one run to the next; the work a
# request makes the server do moves far less. For each variant this script starts a
# server on a fresh store (SQLite, or PostgreSQL with BACKEND=postgres), seeds a few
# patients, and runs wrk on
#   GET /health                  no I/O, full middleware
#   GET /api/v1/auth/me          token check + one committed audit event
#   GET /api/v1/patients/{id}    RBAC, every field decrypted, one committed audit event
#   GET /api/v1/patients?q=<family name>&limit=20
#                                a name search (blind index), a page of 20 patients
#                                decrypted; only when ENDPOINTS names `search`
# and reads from /proc, before and after each wrk run, per request:
#   cpu   the server process's user + system CPU (all its threads)
#   cs    the server's context switches (voluntary + involuntary, all threads)
#   write bytes the server caused to be written to storage (SQLite's WAL, checkpoints)
#   pg    CPU of every process of the local PostgreSQL (BACKEND=postgres)
# Variants run in turn, ROUNDS times, so that drift hits all of them alike.
#
# Usage: bench/cost.sh VARIANT...
#   a VARIANT is NAME=BINARY[,VAR=VALUE...], e.g.
#     bench/cost.sh old=/tmp/custodian.old new=target/release/custodian
#     bench/cost.sh on=target/release/custodian off=target/release/custodian,CUSTODIAN_AUDIT__ENABLED=false
#   BACKEND=sqlite|postgres  ROUNDS=2  DURATION=5s  CONNECTIONS=32  PATIENTS=2000
#   ENDPOINTS="health me patient" (any of health, me, patient, search)
#   PGHOST=127.0.0.1 PGPORT=5432 PGUSER=postgres PGADMIN_DB=test (trust auth)
#
# Prints one line per variant, endpoint and round, and a mean per variant and endpoint.
# Listens on 127.0.0.1 only; removes its servers, directories and databases on exit.
# Build the binaries first (cargo build --release); nothing is built here.
set -euo pipefail

BACKEND="${BACKEND:-sqlite}"
ROUNDS="${ROUNDS:-2}"
DURATION="${DURATION:-5s}"
CONNECTIONS="${CONNECTIONS:-32}"
PATIENTS="${PATIENTS:-2000}"
ENDPOINTS="${ENDPOINTS:-health me patient}"
PG_HOST="${PGHOST:-127.0.0.1}"
PG_PORT="${PGPORT:-5432}"
PG_USER="${PGUSER:-postgres}"
PG_ADMIN_DB="${PGADMIN_DB:-test}"
BENCH_USER=loadgen
BENCH_PASSWORD='Bench-Pass-12345!'

die() { echo "cost: $*" >&2; exit 1; }
(($# > 0)) || die "name at least one variant: NAME=BINARY[,VAR=VALUE...] (see the header)"
[[ "$BACKEND" == sqlite || "$BACKEND" == postgres ]] || die "BACKEND is sqlite or postgres"
[[ "$ROUNDS" =~ ^[1-9]$ ]] || die "ROUNDS is 1 to 9"
[[ "$DURATION" =~ ^[0-9]+s$ ]] || die "DURATION is a number of seconds, e.g. 5s"
for what in $ENDPOINTS; do
    [[ "$what" =~ ^(health|me|patient|search)$ ]] || die "ENDPOINTS: unknown endpoint $what"
done
[[ "$CONNECTIONS" =~ ^[0-9]+$ && "$PATIENTS" =~ ^[0-9]+$ ]] || die "CONNECTIONS and PATIENTS are integers"
((PATIENTS >= 1 && PATIENTS <= 100000)) || die "PATIENTS is 1 to 100000"
[[ "$PG_HOST" == 127.0.0.1 || "$PG_HOST" == localhost ]] || die "PGHOST must be a loopback address"
for tool in wrk curl python3; do
    command -v "$tool" >/dev/null || die "$tool is not installed (Debian: apt-get install -y wrk curl python3)"
done
[[ "$BACKEND" == sqlite ]] || command -v psql >/dev/null || die "psql is not installed"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/custodian-bench-cost.XXXXXX")"
SERVER_PID=""
DB=""
psql_admin() {
    timeout 30 psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$PG_ADMIN_DB" "$@"
}
stop() {
    if [[ -n "$SERVER_PID" ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
    if [[ -n "$DB" ]]; then
        psql_admin -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
        DB=""
    fi
}
trap 'stop; rm -rf "$WORK"' EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
json_field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# Starts variant $1 (binary $2, settings in the rest) on a fresh store; sets BASE, TOKEN.
start() {
    local name="$1" bin="$2"
    shift 2
    local dir="$WORK/$name"
    rm -rf "$dir"
    mkdir -p "$dir"
    local -a env=("CUSTODIAN_DATA_DIR=$dir" CUSTODIAN_RATE_LIMIT__ENABLED=false
        CUSTODIAN_LOGGING__LEVEL=warn CUSTODIAN_SESSION__IDLE_TIMEOUT=60m)
    if [[ "$BACKEND" == postgres ]]; then
        DB="custodian_bench_cost_$$_$RANDOM"
        psql_admin -c "CREATE DATABASE $DB" >/dev/null
        env+=("CUSTODIAN_DATABASE__URL=postgres://$PG_USER@$PG_HOST:$PG_PORT/$DB")
    fi
    env+=("$@")
    run() { env $(compgen -e | grep '^CUSTODIAN_' | sed 's/^/-u /') "${env[@]}" "$bin" --env dev "$@"; }
    # In the background the subshell becomes the server, so $! is the server's pid.
    serve() { exec env $(compgen -e | grep '^CUSTODIAN_' | sed 's/^/-u /') "${env[@]}" "$bin" --env dev serve "$@"; }
    printf '%s\n' "$BENCH_PASSWORD" | run user create --username "$BENCH_USER" --role doctor \
        --password-stdin >"$dir/cli.log" 2>&1 || die "$name: user create failed (see $dir/cli.log)"
    run demo seed --patients "$PATIENTS" >>"$dir/cli.log" 2>&1 || die "$name: demo seed failed"
    local port
    port="$(free_port)"
    BASE="http://127.0.0.1:$port"
    serve --listen "127.0.0.1:$port" >"$dir/server.log" 2>&1 &
    SERVER_PID="$!"
    for ((i = 0; ; i++)); do
        kill -0 "$SERVER_PID" 2>/dev/null || die "$name: the server exited (see $dir/server.log)"
        curl -fsS -o /dev/null --max-time 1 "$BASE/health" 2>/dev/null && break
        ((i < 150)) || die "$name: the server did not start"
        sleep 0.2
    done
    local session
    session="$(curl -fsS --max-time 10 -H 'Content-Type: application/json' \
        -d "{\"username\":\"$BENCH_USER\",\"password\":\"$BENCH_PASSWORD\"}" \
        "$BASE/api/v1/auth/login" | json_field access_token)" || die "$name: login failed"
    TOKEN="$(curl -fsS --max-time 10 -H 'Content-Type: application/json' \
        -H "Authorization: Bearer $session" -d '{"name":"bench"}' "$BASE/api/v1/tokens" \
        | json_field token)" || die "$name: token creation failed"
    # A Lua script cycling over the first 100 patients (ids only; no token in it).
    curl -fsS --max-time 10 -H "Authorization: Bearer $TOKEN" "$BASE/api/v1/patients?limit=100" \
        | python3 -c '
import json, sys
ids = [i["id"] for i in json.load(sys.stdin)["items"]]
print("ids = {" + ",".join("\"%s\"" % i for i in ids) + "}")
print("n = 0")
print("request = function() n = n + 1; return wrk.format(\"GET\", \"/api/v1/patients/\" .. ids[(n % #ids) + 1]) end")
' >"$dir/read.lua" || die "$name: listing patients failed"
    LUA="$dir/read.lua"
    # The same for a name search: the family names of that first page, in turn.
    curl -fsS --max-time 10 -H "Authorization: Bearer $TOKEN" "$BASE/api/v1/patients?limit=100" \
        | python3 -c '
import json, sys
names = sorted({i["family_name"] for i in json.load(sys.stdin)["items"]})
print("names = {" + ",".join("\"%s\"" % n for n in names) + "}")
print("n = 0")
print("request = function() n = n + 1; return wrk.format(\"GET\", \"/api/v1/patients?limit=20&q=\" .. names[(n % #names) + 1]) end")
' >"$dir/search.lua" || die "$name: listing patients failed"
    SEARCH_LUA="$dir/search.lua"
}

TICK="$(getconf CLK_TCK)"
server_cpu() { awk '{print $14 + $15}' "/proc/$SERVER_PID/stat"; }
server_cs() { cat /proc/"$SERVER_PID"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s + 0}'; }
server_writes() { awk '/^write_bytes/ {print $2}' "/proc/$SERVER_PID/io"; }
pg_cpu() {
    local s=0 p
    for p in $(pgrep -x postgres 2>/dev/null || true); do
        s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$s"
}

measure() {
    local variant="$1" round="$2" what="$3" out
    local c0 x0 w0 g0 c1 x1 w1 g1
    c0="$(server_cpu)" x0="$(server_cs)" w0="$(server_writes)" g0="$(pg_cpu)"
    case "$what" in
        health) out="$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" "$BASE/health")" ;;
        me) out="$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" -H "Authorization: Bearer $TOKEN" "$BASE/api/v1/auth/me")" ;;
        patient) out="$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" -s "$LUA" -H "Authorization: Bearer $TOKEN" "$BASE")" ;;
        search) out="$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" -s "$SEARCH_LUA" -H "Authorization: Bearer $TOKEN" "$BASE")" ;;
    esac
    c1="$(server_cpu)" x1="$(server_cs)" w1="$(server_writes)" g1="$(pg_cpu)"
    grep -q 'Non-2xx' <<<"$out" && die "$variant: $what answered errors: $(grep Non-2xx <<<"$out")"
    local n rps
    n="$(awk '/requests in/ {print $1}' <<<"$out")"
    rps="$(awk '/Requests\/sec/ {print $2}' <<<"$out")"
    awk -v v="$variant" -v r="$round" -v w="$what" -v n="$n" -v rps="$rps" -v t="$TICK" \
        -v c=$((c1 - c0)) -v x=$((x1 - x0)) -v b=$((w1 - w0)) -v g=$((g1 - g0)) 'BEGIN {
        printf "%s\t%s\t%s\t%.0f\t%.0f\t%.1f\t%.1f\t%.0f\n", v, r, w, rps, c / t * 1e6 / n, x / n, b / 1024 / n, g / t * 1e6 / n }'
}

RESULTS="$WORK/results.tsv"
printf 'variant\tround\tendpoint\treq/s\tcpu us/req\tcs/req\twritten KB/req\tpostgres us/req\n'
for ((round = 1; round <= ROUNDS; round++)); do
    for variant in "$@"; do
        name="${variant%%=*}"
        spec="${variant#*=}"
        IFS=',' read -r -a parts <<<"$spec"
        bin="${parts[0]}"
        [[ -x "$bin" ]] || die "$name: $bin is not an executable"
        start "$name" "$bin" "${parts[@]:1}"
        for what in $ENDPOINTS; do
            measure "$name" "$round" "$what" | tee -a "$RESULTS"
        done
        stop
    done
done
echo
echo "mean over $ROUNDS round(s), $BACKEND, $CONNECTIONS connections, $DURATION each:"
printf 'variant\tendpoint\treq/s\tcpu us/req\tcs/req\twritten KB/req\tpostgres us/req\n'
awk -F'\t' '{ k = $1 "\t" $3; n[k]++; for (i = 4; i <= 8; i++) s[k, i] += $i; order[k] = NR }
    END { for (k in n) printf "%s\t%.0f\t%.0f\t%.1f\t%.1f\t%.0f\n", k, s[k,4]/n[k], s[k,5]/n[k], s[k,6]/n[k], s[k,7]/n[k], s[k,8]/n[k] }' \
    "$RESULTS" | sort
