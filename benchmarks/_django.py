"""Shared set-up of the benchmark scripts that need Django: a database of their own, Redis DB 9
as the Celery broker, a temporary WORKFLOW_VAR_DIR, all configured before ``django.setup()``
and removed again at the end (database dropped, Redis DB flushed, directory deleted).

Not a benchmark; imported by the scripts beside it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_URL = "postgres://postgres@127.0.0.1:5432/{name}"
BROKER_URL = "redis://127.0.0.1:6379/9"


def _pg_admin(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN_DSN)
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
    finally:
        conn.close()


def _flush_broker() -> None:
    import redis

    redis.Redis.from_url(BROKER_URL).flushdb()


@contextmanager
def django_environment(prefix: str, *, postgres_db: str | None) -> Iterator[Path]:
    """Configure and set up Django for one benchmark run and migrate its database.

    ``postgres_db`` names a PostgreSQL database created afresh (dropped first if a previous run
    left it); ``None`` uses SQLite in the temporary directory. Yields the temporary directory.
    Everything is removed when the block ends, also on error or Ctrl-C.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))
    os.environ["DJANGO_SETTINGS_MODULE"] = "workflow_site.settings"
    os.environ["WORKFLOW_VAR_DIR"] = str(tmp)
    os.environ["FACILITY_DATA_ROOT"] = str(tmp / "data")
    os.environ["CELERY_BROKER_URL"] = BROKER_URL
    os.environ.pop("REDIS_URL", None)
    os.environ.pop("CELERY_RESULT_BACKEND", None)
    if postgres_db:
        _pg_admin(f'DROP DATABASE IF EXISTS "{postgres_db}" WITH (FORCE)')
        _pg_admin(f'CREATE DATABASE "{postgres_db}"')
        os.environ["DATABASE_URL"] = PG_URL.format(name=postgres_db)
    else:
        os.environ["DATABASE_URL"] = f"sqlite:///{tmp / 'bench.sqlite3'}"
    _flush_broker()
    try:
        import django

        django.setup()
        from django.core.management import call_command

        started = time.perf_counter()
        call_command("migrate", verbosity=0, interactive=False)
        print(f"# migrated {os.environ['DATABASE_URL']} in {time.perf_counter() - started:.1f} s")
        yield tmp
    finally:
        try:
            from django.db import connections

            connections.close_all()
        except Exception:  # clean-up must go on
            pass
        if postgres_db:
            _pg_admin(f'DROP DATABASE IF EXISTS "{postgres_db}" WITH (FORCE)')
        _flush_broker()
        shutil.rmtree(tmp, ignore_errors=True)


def machine_line() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load} at start"
