# state_event is the history operators read to answer "why is this stuck?". The ORM refuses to
# update or delete it, but any other writer (a bulk_create with update_conflicts, raw SQL, a
# shell) could rewrite it; these triggers make the database refuse too.
#
# PostgreSQL refuses UPDATE and DELETE of a row (TRUNCATE, a table-level operation an
# administrator or the test runner's flush uses, stays possible). SQLite refuses UPDATE (which
# also covers INSERT ... ON CONFLICT DO UPDATE); DELETE stays possible there because Django's
# flush on SQLite empties tables with DELETE, and SQLite is the laptop default, not production.

from django.db import migrations

POSTGRES_UP = """
CREATE OR REPLACE FUNCTION state_event_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'state_event is append-only: % refused', TG_OP
        USING ERRCODE = 'integrity_constraint_violation';
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER state_event_append_only
    BEFORE UPDATE OR DELETE ON state_event
    FOR EACH ROW EXECUTE FUNCTION state_event_append_only();
"""
POSTGRES_DOWN = """
DROP TRIGGER IF EXISTS state_event_append_only ON state_event;
DROP FUNCTION IF EXISTS state_event_append_only();
"""
SQLITE_UP = """
CREATE TRIGGER state_event_append_only BEFORE UPDATE ON state_event
BEGIN
    SELECT RAISE(ABORT, 'state_event is append-only: UPDATE refused');
END;
"""
SQLITE_DOWN = "DROP TRIGGER IF EXISTS state_event_append_only;"

SQL = {"postgresql": (POSTGRES_UP, POSTGRES_DOWN), "sqlite": (SQLITE_UP, SQLITE_DOWN)}


def _run(apps, schema_editor, index):  # type: ignore[no-untyped-def]
    statements = SQL.get(schema_editor.connection.vendor)
    if statements is not None:
        # One statement for SQLite (the trigger body's ";" belongs to it); PostgreSQL accepts a
        # script without parameters in one execute.
        schema_editor.execute(statements[index].strip(), params=None)


def forwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    _run(apps, schema_editor, 0)


def backwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    _run(apps, schema_editor, 1)


class Migration(migrations.Migration):
    dependencies = [
        ("pipelines", "0002_claim_token"),
    ]

    operations = [
        migrations.RunPython(forwards, backwards),
    ]
