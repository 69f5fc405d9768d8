#!/bin/sh
# Start-up for infra/Dockerfile.postgres, the subset of the public image's interface compose uses: on an
# empty data directory, initdb with POSTGRES_USER (password from POSTGRES_PASSWORD, passed through a
# file, never a command line), scram-sha-256 for every TCP client, then the init SQL files.
set -eu
sh /usr/local/bin/tp-check-secrets POSTGRES_PASSWORD
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb --username="$user" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
    --encoding=UTF8 -D "$PGDATA" >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"   # `-c listen_addresses=...` narrows it
  # Socket only while initialising, so nothing connects before the databases exist.
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  if [ "$db" != "postgres" ]; then
    psql -v ON_ERROR_STOP=1 --username "$user" --dbname postgres -c "CREATE DATABASE \"$db\"" >/dev/null
  fi
  for f in /docker-entrypoint-initdb.d/*.sql; do
    [ -e "$f" ] || continue
    echo "tp-postgres: running $f"
    psql -v ON_ERROR_STOP=1 --username "$user" --dbname "$db" -f "$f"
  done
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi
if [ "${1:-}" = "postgres" ]; then
  shift
  exec postgres -D "$PGDATA" "$@"
fi
exec "$@"
