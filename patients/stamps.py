"""Change stamps: a number per patient that changes whenever a committed transaction changed what the
clinical pages show about that patient, kept by the database itself.

Why: the worklist and the patient page cost tens of milliseconds of Python each (results of every
lesion, template rendering), yet are read far more often than the records change. Pages cache what
they render under the stamps of what they show (``patients.pagecache``): a changed record changes
the stamp, so the next request renders afresh. Nothing is invalidated by hand, so no write path
(services, the worker's bulk updates, the admin, a management command, raw SQL) can forget to.

How: triggers on the tables (patients, lesions, images, reviews here; analyses and model versions
in the inference app's migration) insert a ``DataChange`` row naming the patient -- NULL for
changes every page shows (a model version, a care team's name). A patient's stamp is the id of
its newest row, the global stamp the id of the newest NULL row.

Correctness needs the ids in COMMIT order: a reader that saw stamp s must never later miss a
change that commits with an id below s. On PostgreSQL the triggers are deferred to commit time
and take one transaction-level advisory lock before inserting: ids are drawn by one committing
transaction at a time, and the lock is released only after the commit is visible. Deferred, the
lock is taken after the transaction's own row locks, never before, so it cannot deadlock with
them; it serialises only the few inserts at commit. On SQLite writers are serialised by the
database lock anyway, so plain triggers suffice. Inside a transaction (tests, or a view under
ATOMIC_REQUESTS) the transaction's own changes are not stamped yet: ``patients.pagecache`` does
not use the cache there.

Rows accumulate with every write; :func:`compact` (run by the analysis sweeper) deletes all but
each patient's newest row, which never changes a stamp.
"""
from __future__ import annotations

from django.db import connection
from django.db.models import OuterRef, Subquery

ADVISORY_LOCK_KEY = 7270301  # "the stamp lock": any constant unique to this application
TABLE = "patients_datachange"
VENDORS = ("postgresql", "sqlite")


def enabled() -> bool:
    return connection.vendor in VENDORS


# --- triggers (called from migrations) -----------------------------------------------------------

def install_triggers(schema_editor, name: str, table: str, patient_sql: str | None) -> None:
    """Stamp every insert, update and delete of ``table``. ``patient_sql`` is an SQL expression of
    the changed row's patient id with ``{row}`` for NEW/OLD (None: a global change). A row whose
    patient cannot be found any more (deleted in the same transaction) stamps nothing: the
    deletion of its parent stamps the patient."""
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        for statement in _postgresql(name, table, patient_sql):
            schema_editor.execute(statement)
    elif vendor == "sqlite":
        for statement in _sqlite(name, table, patient_sql):
            schema_editor.execute(statement)


def trigger_migration(triggers):
    """The migration operation installing (and, reversed, removing) ``triggers``: (name, table,
    patient SQL or None) as for :func:`install_triggers`."""
    from django.db import migrations

    def install(apps, schema_editor):
        for name, table, patient_sql in triggers:
            install_triggers(schema_editor, name, table, patient_sql)

    def remove(apps, schema_editor):
        for name, table, _ in triggers:
            remove_triggers(schema_editor, name, table)

    return migrations.RunPython(install, remove)


def remove_triggers(schema_editor, name: str, table: str) -> None:
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(f"DROP TRIGGER IF EXISTS stamp_{name} ON {table}")
        schema_editor.execute(f"DROP FUNCTION IF EXISTS stamp_{name}()")
    elif vendor == "sqlite":
        for op in ("insert", "update", "delete"):
            schema_editor.execute(f"DROP TRIGGER IF EXISTS stamp_{name}_{op}")


def _postgresql(name, table, patient_sql):
    def insert(row):
        if patient_sql is None:
            return f"INSERT INTO {TABLE} (patient_id, txid) VALUES (NULL, txid_current());"
        return (f"p := {patient_sql.format(row=row)};\n"
                f"    IF p IS NOT NULL THEN INSERT INTO {TABLE} (patient_id, txid) VALUES (p, txid_current())"
                f" ON CONFLICT DO NOTHING; END IF;")

    body = f"""
CREATE OR REPLACE FUNCTION stamp_{name}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE p bigint;
BEGIN
  -- ids in commit order (patients/stamps.py): one committing transaction draws them at a time
  PERFORM pg_advisory_xact_lock({ADVISORY_LOCK_KEY});
  IF TG_OP <> 'DELETE' THEN
    {insert("NEW")}
  END IF;
  IF TG_OP <> 'INSERT' THEN
    {insert("OLD")}
  END IF;
  RETURN NULL;
END $$;"""
    return [
        body,
        f"DROP TRIGGER IF EXISTS stamp_{name} ON {table}",
        f"CREATE CONSTRAINT TRIGGER stamp_{name} AFTER INSERT OR UPDATE OR DELETE ON {table}"
        f" DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION stamp_{name}()",
    ]


def _sqlite(name, table, patient_sql):
    out = []
    for op, rows in (("insert", ["NEW"]), ("update", ["NEW", "OLD"]), ("delete", ["OLD"])):
        if patient_sql is None:
            inserts = f"INSERT INTO {TABLE} (patient_id, txid) VALUES (NULL, NULL);"
        else:
            inserts = " ".join(
                f"INSERT INTO {TABLE} (patient_id, txid) SELECT p, NULL FROM (SELECT {patient_sql.format(row=row)} AS p)"
                f" WHERE p IS NOT NULL;" for row in rows)
        out.append(f"DROP TRIGGER IF EXISTS stamp_{name}_{op}")
        out.append(f"CREATE TRIGGER stamp_{name}_{op} AFTER {op.upper()} ON {table} BEGIN {inserts} END")
    return out


# --- reading stamps ------------------------------------------------------------------------------

def patient_stamp(outer_ref: str = "pk") -> Subquery:
    """The stamp of the patient ``OuterRef(outer_ref)`` as a queryset annotation (an index lookup)."""
    from .models import DataChange

    return Subquery(DataChange.objects.filter(patient_id=OuterRef(outer_ref)).order_by("-id").values("id")[:1])


def global_stamp() -> Subquery:
    """The global stamp (model versions, care team names) as an annotation (evaluated once)."""
    from .models import DataChange

    return Subquery(DataChange.objects.filter(patient_id__isnull=True).order_by("-id").values("id")[:1])


def with_stamps(patients_qs):
    """Patients annotated with ``stamp`` and ``global_stamp`` (in the same query)."""
    return patients_qs.annotate(stamp=patient_stamp(), global_stamp=global_stamp())


def compact(*, batch: int = 10_000) -> int:
    """Delete rows that are no patient's newest (and no newest global row): stamps stay the same.
    At most ``batch`` rows per call; returns how many went."""
    from .models import DataChange

    stale = (DataChange.objects.filter(patient_id__isnull=False)
             .filter(id__lt=Subquery(DataChange.objects.filter(patient_id=OuterRef("patient_id"))
                                     .order_by("-id").values("id")[:1])))
    stale_global = DataChange.objects.filter(patient_id__isnull=True).filter(
        id__lt=Subquery(DataChange.objects.filter(patient_id__isnull=True).order_by("-id").values("id")[:1]))
    n = 0
    for qs in (stale, stale_global):
        ids = list(qs.order_by("id").values_list("id", flat=True)[:max(0, batch - n)])
        if ids:
            n += DataChange.objects.filter(id__in=ids).delete()[0]
    return n
