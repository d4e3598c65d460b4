#!/usr/bin/env bash
# Installs the built wheel in a fresh virtualenv, away from the checkout, and
# proves it is complete: every migration shipped, the schema created on SQLite
# and on a throw-away MariaDB database, `hostdev demo` runs to the end. Also
# checks the sdist carries the files an operator or packager needs.
#
# Usage: tools/smoke_install.sh DIST_DIR   (what `make dist` built)
# pip's cache makes the install fast after the first run (libvirt-python is
# built once); nothing is fetched beyond the package index.
set -euo pipefail

checkout=$(cd "$(dirname "$0")/.." && pwd)
dist=$(cd "${1:?usage: $0 DIST_DIR}" && pwd)
wheel=$(ls "$dist"/hostdev-*.whl)
sdist=$(ls "$dist"/hostdev-*.tar.gz)
socket=${HOSTDEV_TEST_MARIADB_SOCKET:-/run/mysqld/mysqld.sock}
work=$(mktemp -d "${TMPDIR:-/tmp}/hostdev-smoke.XXXXXX")
db="hostdev_smoke_$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')"
bin=$work/venv/bin

fail() { echo "smoke: $*" >&2; exit 1; }

mariadb_sql() { # statement: run as root through the socket, with the wheel's PyMySQL
    "$bin/python" - "$socket" "$1" <<'PY'
import sys
import pymysql
with pymysql.connect(unix_socket=sys.argv[1], user="root", autocommit=True) as conn:
    conn.cursor().execute(sys.argv[2])
PY
}

cleanup() {
    if [ -x "$bin/python" ]; then mariadb_sql "DROP DATABASE IF EXISTS \`$db\`" || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

started=$(date +%s)
# The sdist: the DBAs' SQL, sample configs, alerts, dashboard, units, migrations.
listing=$(tar tzf "$sdist")
for file in sql/schema-mysql.sql sql/alembic.ini etc/mgmt.properties etc/agent.properties \
        etc/rabbitmq/definitions.json \
        etc/prometheus/hostdev-rules.yml etc/grafana/hostdev.json \
        systemd/hostdev-mgmt.service systemd/hostdev-agent.service docs/install.md \
        mgmt/persistence/migrations/env.py; do
    grep -q "^hostdev-[^/]*/$file\$" <<<"$listing" || fail "$file is missing from $sdist"
done

# The wheel: every migration of the checkout, the Alembic environment and template.
shipped=$(unzip -Z1 "$wheel" | sed -n 's|^hostdev/mgmt/persistence/migrations/||p' | sort)
expected=$(cd "$checkout/mgmt/persistence/migrations" \
    && ls env.py script.py.mako versions/*.py | sort)
[ "$shipped" = "$expected" ] || fail "the wheel's migrations differ from the checkout's:
$(diff <(echo "$expected") <(echo "$shipped") || true)"

python3 -m venv "$work/venv"
"$bin/pip" install -q "$wheel[agent]"
cd "$work"  # nothing may come from the checkout from here on

head=$("$bin/python" -c '
from alembic.script import ScriptDirectory
from hostdev.mgmt.persistence.database import MIGRATIONS_DIR
print(ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head())')
[ -n "$head" ] && [ "$head" != None ] || fail "no head revision in the installed package"

sqlite_url="sqlite:///$work/hostdev.db"
"$bin/hostdev-mgmt" db upgrade --db-url "$sqlite_url" >/dev/null
[ "$("$bin/hostdev-mgmt" db current --db-url "$sqlite_url")" = "$head" ] \
    || fail "SQLite is not at $head after db upgrade"

mariadb_sql "CREATE DATABASE \`$db\` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
mariadb_url="mysql+pymysql://root@localhost/$db?unix_socket=$socket"
"$bin/hostdev-mgmt" db upgrade --db-url "$mariadb_url" >/dev/null
[ "$("$bin/hostdev-mgmt" db current --db-url "$mariadb_url")" = "$head" ] \
    || fail "MariaDB is not at $head after db upgrade"

"$bin/hostdev" demo >"$work/demo.log" 2>&1 || {
    tail -n 20 "$work/demo.log" >&2
    fail "hostdev demo failed (its output ends above)"
}
grep -q "^Deployed 6 VMs" "$work/demo.log" || fail "hostdev demo did not tell its story"

echo "smoke: $(basename "$wheel") in a fresh virtualenv: schema $head on SQLite and" \
     "MariaDB, hostdev demo ran; sdist complete ($(( $(date +%s) - started )) s)"
