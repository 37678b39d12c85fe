#!/usr/bin/env bash
# A throw-away PostgreSQL server for tests/test_postgres.py (issue 13, item 5).
#
# Usage (in .ci/run, as root, before the tests):
#
#     eval "$(bash .ci/postgres-setup.sh)"
#
# stdout carries exactly one line,
#
#     export HERETICLAB_TEST_POSTGRES=postgresql://hereticlab:hereticlab@127.0.0.1:55432/hereticlab_test
#
# and nothing else; progress and errors go to stderr. The script exits non-zero (and prints nothing on stdout)
# when it cannot provide a server, so `eval "$(…)"` under `set -e` stops CI there.
#
# What it does:
#   1. Installs Debian's `postgresql` package when no PostgreSQL server binaries are present (apt-get update and
#      install only then; needs root). An installed package is reused as is.
#   2. Creates a private cluster in $HERETICLAB_PG_DIR (default /tmp/hereticlab-postgres: data/, socket/, log)
#      with initdb, owned by the `postgres` user when run as root (by the caller otherwise). It does not touch
#      Debian's own clusters (/etc/postgresql, port 5432).
#   3. Starts it listening on 127.0.0.1 only, port $HERETICLAB_PG_PORT (default 55432), its Unix socket inside
#      the private directory. Durability is off (fsync, synchronous_commit, full_page_writes): test data only.
#   4. Creates the role and database of the URL above (names/password: $HERETICLAB_PG_USER, $HERETICLAB_PG_DB,
#      $HERETICLAB_PG_PASSWORD; all default to hereticlab / hereticlab_test / hereticlab).
#
# Idempotent: a second run finds the server running (pg_ctl status) and only re-checks the role and database;
# it takes well under a second then. The first run takes a few seconds (initdb + start) plus the apt install when
# needed. Stop the server with:  runuser -u postgres -- "$(dirname …)/pg_ctl" -D /tmp/hereticlab-postgres/data stop
set -euo pipefail

BASE=${HERETICLAB_PG_DIR:-/tmp/hereticlab-postgres}
PORT=${HERETICLAB_PG_PORT:-55432}
DB_USER=${HERETICLAB_PG_USER:-hereticlab}
DB_NAME=${HERETICLAB_PG_DB:-hereticlab_test}
DB_PASS=${HERETICLAB_PG_PASSWORD:-hereticlab}
DATA=$BASE/data
SOCK=$BASE/socket
LOG=$BASE/server.log

say() { echo "postgres-setup: $*" >&2; }
die() { say "error: $*"; exit 1; }

for name in DB_USER DB_NAME; do
    [[ ${!name} =~ ^[a-z_][a-z0-9_]*$ ]] || die "$name=${!name} must be a plain lower-case SQL identifier"
done
[[ $DB_PASS =~ ^[A-Za-z0-9._~-]+$ ]] || die "HERETICLAB_PG_PASSWORD may only hold URL-safe characters [A-Za-z0-9._~-]"
[[ $PORT =~ ^[0-9]+$ ]] || die "HERETICLAB_PG_PORT=$PORT is not a port number"

find_bin() {  # newest installed server's bin directory (Debian layout), else whatever is on PATH
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n $dir && -x $dir/initdb && -x $dir/pg_ctl ]]; then
        echo "$dir"
    elif command -v pg_ctl >/dev/null && command -v initdb >/dev/null; then
        dirname "$(command -v pg_ctl)"
    fi
}

BIN=$(find_bin)
if [[ -z $BIN ]]; then
    [[ $EUID -eq 0 ]] || die "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)"
    say "installing Debian's postgresql package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    # The package's own post-install may create and start Debian's cluster on 5432; we do not use it.
    apt-get install -y -qq --no-install-recommends postgresql >&2
    BIN=$(find_bin)
    [[ -n $BIN ]] || die "apt-get installed postgresql but no initdb/pg_ctl was found"
fi

if [[ $EUID -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user to run the server as"
    as_pg() { runuser -u postgres -- "$@"; }
    OWNER=postgres
else
    as_pg() { "$@"; }
    OWNER=$(id -un)
fi

mkdir -p "$BASE"
chown "$OWNER" "$BASE"
chmod 700 "$BASE"  # the socket inside trusts local connections: only the owner (and root) may reach it

if as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    say "reusing the server already running from $DATA"
else
    if [[ ! -s $DATA/PG_VERSION ]]; then
        say "initdb $DATA ($("$BIN/postgres" --version))"
        rm -rf "$DATA"
        as_pg "$BIN/initdb" -D "$DATA" -U postgres -E UTF8 --locale=C.UTF-8 --auth-local=trust \
            --auth-host=scram-sha-256 --no-sync >/dev/null 2>"$BASE/initdb.log" \
            || as_pg "$BIN/initdb" -D "$DATA" -U postgres -E UTF8 --locale=C --auth-local=trust \
                --auth-host=scram-sha-256 --no-sync >/dev/null 2>"$BASE/initdb.log" \
            || { cat "$BASE/initdb.log" >&2; die "initdb failed"; }
    fi
    as_pg mkdir -p "$SOCK"
    say "starting on 127.0.0.1:$PORT"
    if ! as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 start -o \
        "-c listen_addresses=127.0.0.1 -p $PORT -c unix_socket_directories=$SOCK -c max_connections=100 \
         -c fsync=off -c synchronous_commit=off -c full_page_writes=off" >/dev/null; then
        tail -n 20 "$LOG" >&2 || true
        die "the server did not start (is port $PORT taken? set HERETICLAB_PG_PORT)"
    fi
fi

# The running server may have been started with another port by an earlier run: ask it.
RUNNING_PORT=$(head -n 4 "$DATA/postmaster.pid" | tail -n 1)
[[ $RUNNING_PORT == "$PORT" ]] || die "the server in $DATA runs on port $RUNNING_PORT, not $PORT; stop it or set HERETICLAB_PG_PORT=$RUNNING_PORT"

psql_admin() { as_pg "$BIN/psql" -h "$SOCK" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt "$@"; }

if [[ -z $(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'") ]]; then
    psql_admin -c "CREATE ROLE $DB_USER LOGIN PASSWORD '$DB_PASS'" >/dev/null
else
    psql_admin -c "ALTER ROLE $DB_USER LOGIN PASSWORD '$DB_PASS'" >/dev/null
fi
if [[ -z $(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'") ]]; then
    psql_admin -c "CREATE DATABASE $DB_NAME OWNER $DB_USER" >/dev/null
fi

URL="postgresql://$DB_USER:$DB_PASS@127.0.0.1:$PORT/$DB_NAME"
# Check the URL itself works over TCP with the password, as the tests will use it.
PGPASSWORD=$DB_PASS "$BIN/psql" "$URL" -qAt -c "SELECT 1" >/dev/null || die "cannot log in with $URL"
say "ready: $URL"
echo "export HERETICLAB_TEST_POSTGRES=$URL"
