#!/usr/bin/env bash
# Install PostgreSQL from Debian's packages (if missing) and start a throw-away cluster on 127.0.0.1
# (port 55432) with user/password bolaco and database bolaco_test. Prints the SQLAlchemy URL for the tests.
set -euo pipefail
PGPORT=${PGPORT:-55432}   # not 5432: a Debian install may start its own cluster there
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq postgresql >/dev/null
fi
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
DATA=${PGDATA_DIR:-/tmp/bolaco-pg}
if ! su postgres -c "$BIN/pg_ctl -D $DATA status" >/dev/null 2>&1; then
  rm -rf "$DATA"
  mkdir -p "$DATA"
  chown postgres "$DATA"
  su postgres -c "$BIN/initdb -D $DATA -A trust -U postgres" >/dev/null
  su postgres -c "$BIN/pg_ctl -D $DATA -l $DATA/log -o '-c listen_addresses=127.0.0.1 -p $PGPORT -k /tmp' -w start" >/dev/null
  psql -h 127.0.0.1 -p "$PGPORT" -U postgres -qc "CREATE USER bolaco PASSWORD 'bolaco'" >/dev/null
  psql -h 127.0.0.1 -p "$PGPORT" -U postgres -qc "CREATE DATABASE bolaco_test OWNER bolaco" >/dev/null
fi
echo "postgresql+psycopg://bolaco:bolaco@127.0.0.1:$PGPORT/bolaco_test"
