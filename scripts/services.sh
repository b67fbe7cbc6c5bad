#!/usr/bin/env bash
# Local Redis and PostgreSQL for development, tests and the demo.
#
#   scripts/services.sh up     print `export CONSOLIDATOR_…=…` lines to eval
#   scripts/services.sh down   stop the private instances this script started
#   scripts/services.sh clean  down, then delete their state
#   scripts/services.sh status show what is configured and what answers
#
# `up` uses the servers named by CONSOLIDATOR_REDIS_URL and CONSOLIDATOR_DATABASE_URL (defaults:
# the usual local ports) when they answer. Otherwise it installs what is missing from Debian
# packages and starts private instances (Redis on 6391, PostgreSQL on 5441, both on 127.0.0.1,
# overridable with SERVICES_REDIS_PORT and SERVICES_PG_PORT) whose state lives in <repo>/.state.
# It never stops or reconfigures a server it did not start. Running `up` twice is harmless.
#
# Only the export lines go to stdout; every diagnostic goes to stderr.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
STATE="$REPO/.state"
# PostgreSQL runs as the `postgres` user, which may not be able to reach a repository under a
# private home directory; its state then lives here instead.
FALLBACK_STATE="/var/tmp/session-consolidator-$(printf '%s' "$REPO" | cksum | cut -d' ' -f1)"

DEFAULT_REDIS_URL="redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
REDIS_PORT="${SERVICES_REDIS_PORT:-6391}"
PG_PORT="${SERVICES_PG_PORT:-5441}"
PRIVATE_REDIS_URL="redis://127.0.0.1:${REDIS_PORT}/0"
PRIVATE_DATABASE_URL="postgresql+asyncpg://postgres@127.0.0.1:${PG_PORT}/postgres"

log() { printf 'services: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Runs a command with root rights (apt-get): directly when root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# ---------------------------------------------------------------------------------------------
# Packages

APT_UPDATED=0
APT_LOG="$STATE/apt.log"
POLICY_RC_D=/usr/sbin/policy-rc.d
POLICY_RC_D_OURS=0

cleanup() {
    # The temporary policy that kept apt from starting system-wide services.
    if [ "$POLICY_RC_D_OURS" -eq 1 ]; then
        as_root rm -f "$POLICY_RC_D" || true
    fi
}
trap cleanup EXIT

apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found; install these yourself: $*"
    mkdir -p "$STATE"
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update (output in $APT_LOG)"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$APT_LOG" 2>&1 || {
            tail -n 20 "$APT_LOG" >&2
            die "apt-get update failed"
        }
        APT_UPDATED=1
    fi
    # Installing a server package would start a system-wide instance; we only want the binaries.
    if [ ! -e "$POLICY_RC_D" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$POLICY_RC_D" >/dev/null
        as_root chmod 755 "$POLICY_RC_D"
        POLICY_RC_D_OURS=1
    fi
    log "apt-get install $* (output in $APT_LOG)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "$@" >>"$APT_LOG" 2>&1 || {
        tail -n 20 "$APT_LOG" >&2
        die "apt-get install $* failed"
    }
    cleanup
    POLICY_RC_D_OURS=0
}

# ---------------------------------------------------------------------------------------------
# Small helpers

# Quotes a value for a POSIX shell's eval.
shell_quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

# Prints "host port" of a URL (defaults: 127.0.0.1 and the given port).
host_port() {
    python3 - "$1" "$2" <<'EOF'
import sys
from urllib.parse import urlsplit

u = urlsplit(sys.argv[1])
try:
    port = u.port or int(sys.argv[2])
except ValueError:
    port = int(sys.argv[2])
print(u.hostname or "127.0.0.1", port)
EOF
}

tcp_open() { # host port
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# ---------------------------------------------------------------------------------------------
# Redis

redis_answers() { # url
    local url="$1" reply
    if command -v redis-cli >/dev/null 2>&1; then
        reply="$(timeout 5 redis-cli --no-auth-warning -u "$url" ping 2>/dev/null || true)"
        [ "$reply" = "PONG" ]
        return
    fi
    # No client installed: speak just enough RESP to send AUTH (if any) and PING.
    timeout 5 python3 - "$url" <<'EOF' 2>/dev/null
import socket
import sys
from urllib.parse import unquote, urlsplit

u = urlsplit(sys.argv[1])
if u.scheme != "redis":
    sys.exit(1)  # TLS, unix sockets, sentinel: leave those to redis-cli


def command(*args: str) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=3) as s:
    f = s.makefile("rb")
    if u.password is not None:
        auth = [unquote(u.password)]
        if u.username:
            auth.insert(0, unquote(u.username))
        s.sendall(command("AUTH", *auth))
        if not f.readline().startswith(b"+OK"):
            sys.exit(1)
    s.sendall(command("PING"))
    sys.exit(0 if f.readline().startswith(b"+PONG") else 1)
EOF
}

redis_server_bin() {
    command -v redis-server 2>/dev/null ||
        { [ -x /usr/bin/redis-server ] && echo /usr/bin/redis-server; }
}

redis_pidfile() { echo "$STATE/redis/redis.pid"; }

start_private_redis() {
    local bin dir
    bin="$(redis_server_bin || true)"
    if [ -z "$bin" ]; then
        apt_install redis-server
        bin="$(redis_server_bin || true)"
        [ -n "$bin" ] || die "redis-server still not found after installing it"
    fi
    dir="$STATE/redis"
    mkdir -p "$dir"
    if tcp_open 127.0.0.1 "$REDIS_PORT"; then
        die "port $REDIS_PORT is taken by something that is not Redis; set SERVICES_REDIS_PORT"
    fi
    log "starting a private Redis on 127.0.0.1:$REDIS_PORT (state in $dir)"
    "$bin" --daemonize yes --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$dir" --pidfile "$(redis_pidfile)" --logfile "$dir/redis.log" >&2 ||
        die "redis-server did not start; see $dir/redis.log"
    local i
    for i in $(seq 1 100); do
        redis_answers "$PRIVATE_REDIS_URL" && return 0
        sleep 0.1
    done
    tail -n 20 "$dir/redis.log" >&2 || true
    die "the private Redis on port $REDIS_PORT does not answer"
}

stop_private_redis() {
    local pidfile pid i
    pidfile="$(redis_pidfile)"
    [ -f "$pidfile" ] || return 0
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    # Only a redis-server this script started, never whatever now has that pid.
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
        grep -q redis-server "/proc/$pid/cmdline" 2>/dev/null; then
        log "stopping the private Redis (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "the private Redis ignores SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

ensure_redis() {
    local url="${CONSOLIDATOR_REDIS_URL:-$DEFAULT_REDIS_URL}"
    if redis_answers "$url"; then
        log "Redis answers at $(redact "$url")"
        REDIS_URL_OUT="$url"
        return
    fi
    if redis_answers "$PRIVATE_REDIS_URL"; then
        log "Redis does not answer at $(redact "$url"); using the private one on port $REDIS_PORT"
    else
        log "Redis does not answer at $(redact "$url")"
        start_private_redis
    fi
    REDIS_URL_OUT="$PRIVATE_REDIS_URL"
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL

redact() { printf '%s' "$1" | sed -E 's#(://[^:/@]*):[^@]*@#\1:***@#'; }

# The URL in libpq's form: no SQLAlchemy driver suffix, no driver-specific query parameters.
libpq_url() {
    printf '%s' "$1" | sed -E 's#^postgres(ql)?(\+[a-z0-9_]+)?://#postgresql://#; s#\?.*$##'
}

pg_bindir() {
    local d
    d="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null |
        sort -V | tail -n 1)"
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then
        echo "$d"
        return
    fi
    d="$(command -v initdb 2>/dev/null || true)"
    [ -n "$d" ] && dirname "$(readlink -f "$d")"
}

pg_answers() { # url
    local url bindir hp
    url="$(libpq_url "$1")"
    bindir="$(pg_bindir || true)"
    local psql
    psql="$(command -v psql 2>/dev/null || true)"
    [ -z "$psql" ] && [ -n "$bindir" ] && [ -x "$bindir/psql" ] && psql="$bindir/psql"
    if [ -n "$psql" ]; then
        PGCONNECT_TIMEOUT=5 timeout 10 "$psql" -w -X -q -A -t -d "$url" -c 'select 1' \
            </dev/null >/dev/null 2>&1
        return
    fi
    # No client installed: an open port is the best sign we can get.
    read -r -a hp <<<"$(host_port "$1" 5432)"
    tcp_open "${hp[0]}" "${hp[1]}"
}

# Runs a command as the postgres user (PostgreSQL refuses to run as root).
as_pg() {
    if [ "$(id -u)" -ne 0 ]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        # from / because the postgres user may not be allowed into the current directory
        (cd / && runuser -u postgres -- "$@")
    else
        local quoted="" a
        for a in "$@"; do quoted+=" $(shell_quote "$a")"; done
        su postgres -s /bin/sh -c "cd / &&$quoted"
    fi
}

# The directory holding the private cluster, reachable by the postgres user. Prints it.
pg_state_dir() {
    local dir="$STATE/pg"
    if [ "$(id -u)" -ne 0 ]; then
        mkdir -p "$dir"
        echo "$dir"
        return
    fi
    mkdir -p "$dir"
    chmod 755 "$STATE"
    chown postgres:postgres "$dir"
    chmod 700 "$dir"
    # unix socket paths are limited to about 107 bytes
    local sock="$dir/run/.s.PGSQL.$PG_PORT"
    if [ "${#sock}" -le 100 ] && as_pg test -w "$dir" 2>/dev/null; then
        echo "$dir"
        return
    fi
    rmdir "$dir" 2>/dev/null || true
    log "the postgres user cannot use $dir; keeping PostgreSQL's state in $FALLBACK_STATE"
    dir="$FALLBACK_STATE/pg"
    mkdir -p "$dir"
    chmod 755 "$FALLBACK_STATE"
    chown postgres:postgres "$dir"
    chmod 700 "$dir"
    echo "$dir"
}

# Where an existing private cluster lives (for down/clean), if any.
existing_pg_dirs() {
    local d
    for d in "$STATE/pg" "$FALLBACK_STATE/pg"; do
        [ -f "$d/data/PG_VERSION" ] && echo "$d"
    done
    return 0
}

start_private_pg() {
    local bindir dir
    bindir="$(pg_bindir || true)"
    if [ -z "$bindir" ]; then
        apt_install postgresql
        bindir="$(pg_bindir || true)"
        [ -n "$bindir" ] || die "initdb still not found after installing postgresql"
    fi
    if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
        die "there is no postgres user to run PostgreSQL as (install the postgresql package)"
    fi
    dir="$(pg_state_dir)"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        log "creating a private PostgreSQL cluster in $dir/data"
        rm -rf "$dir/data"
        as_pg "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-locale \
            --no-sync >"$dir/initdb.log" 2>&1 || {
            tail -n 20 "$dir/initdb.log" >&2
            die "initdb failed; see $dir/initdb.log"
        }
        printf "\ninclude_if_exists = 'local.conf'\n" >>"$dir/data/postgresql.conf"
    fi
    as_pg mkdir -p "$dir/run"
    # Rewritten at every start so a changed port or moved directory takes effect.
    {
        echo "port = $PG_PORT"
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = $(shell_quote "$dir/run")"
        echo "max_connections = 200"
    } | as_pg tee "$dir/data/local.conf" >/dev/null

    if as_pg "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        log "restarting the private PostgreSQL, which runs but does not answer"
        as_pg "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
    fi
    if tcp_open 127.0.0.1 "$PG_PORT"; then
        die "port $PG_PORT is taken by something else; set SERVICES_PG_PORT"
    fi
    log "starting a private PostgreSQL on 127.0.0.1:$PG_PORT (state in $dir)"
    as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 start >&2 || {
        tail -n 20 "$dir/postgres.log" >&2 || true
        die "PostgreSQL did not start; see $dir/postgres.log"
    }
    local i
    for i in $(seq 1 100); do
        pg_answers "$PRIVATE_DATABASE_URL" && return 0
        sleep 0.2
    done
    tail -n 20 "$dir/postgres.log" >&2 || true
    die "the private PostgreSQL on port $PG_PORT does not answer"
}

stop_private_pg() {
    local bindir dir
    bindir="$(pg_bindir || true)"
    [ -n "$bindir" ] || return 0
    while read -r dir; do
        [ -n "$dir" ] || continue
        if as_pg "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
            log "stopping the private PostgreSQL in $dir"
            as_pg "$bindir/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >&2 ||
                as_pg "$bindir/pg_ctl" -D "$dir/data" -m immediate -w stop >&2 || true
        fi
    done < <(existing_pg_dirs)
}

ensure_pg() {
    local url="${CONSOLIDATOR_DATABASE_URL:-$DEFAULT_DATABASE_URL}"
    if pg_answers "$url"; then
        log "PostgreSQL answers at $(redact "$url")"
        DATABASE_URL_OUT="$url"
        return
    fi
    if pg_answers "$PRIVATE_DATABASE_URL"; then
        log "PostgreSQL does not answer at $(redact "$url"); using the private one on port $PG_PORT"
    else
        log "PostgreSQL does not answer at $(redact "$url")"
        start_private_pg
    fi
    DATABASE_URL_OUT="$PRIVATE_DATABASE_URL"
}

# ---------------------------------------------------------------------------------------------

ensure_python() {
    command -v python3 >/dev/null 2>&1 || apt_install python3
}

cmd_up() {
    ensure_python
    REDIS_URL_OUT=""
    DATABASE_URL_OUT=""
    ensure_redis
    ensure_pg
    printf 'export CONSOLIDATOR_REDIS_URL=%s\n' "$(shell_quote "$REDIS_URL_OUT")"
    printf 'export CONSOLIDATOR_DATABASE_URL=%s\n' "$(shell_quote "$DATABASE_URL_OUT")"
}

cmd_down() {
    stop_private_redis
    stop_private_pg
}

cmd_clean() {
    cmd_down
    log "removing $STATE"
    rm -rf "$STATE"
    if [ -d "$FALLBACK_STATE" ]; then
        log "removing $FALLBACK_STATE"
        rm -rf "$FALLBACK_STATE"
    fi
}

cmd_status() {
    local r="${CONSOLIDATOR_REDIS_URL:-$DEFAULT_REDIS_URL}"
    local p="${CONSOLIDATOR_DATABASE_URL:-$DEFAULT_DATABASE_URL}"
    local u
    for u in "$r" "$PRIVATE_REDIS_URL"; do
        if redis_answers "$u"; then
            log "redis $(redact "$u"): answers"
        else
            log "redis $(redact "$u"): no answer"
        fi
    done
    for u in "$p" "$PRIVATE_DATABASE_URL"; do
        if pg_answers "$u"; then
            log "postgres $(redact "$u"): answers"
        else
            log "postgres $(redact "$u"): no answer"
        fi
    done
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
clean) cmd_clean ;;
status) cmd_status ;;
*)
    echo "usage: $0 up|down|clean|status" >&2
    exit 2
    ;;
esac
