"""The test harness itself: a transactional test's teardown TRUNCATE that PostgreSQL picks as a
deadlock victim (a live worker process committing at that moment) is run again, not reported as an
error of the next test (tests/conftest.py)."""
import re
import threading
import time

import psycopg
import pytest
from django.core.management.color import no_style
from django.core.management.sql import sql_flush
from django.db import connection
from django.test import TransactionTestCase

from tests import conftest
from tests.factories import PatientFactory


def _other_connection():
    s = connection.settings_dict
    return psycopg.connect(host=s["HOST"] or None, port=s["PORT"] or None, user=s["USER"],
                           password=s["PASSWORD"] or None, dbname=s["NAME"], autocommit=False)


@pytest.mark.django_db(transaction=True)
def test_a_teardown_flush_chosen_as_deadlock_victim_is_run_again(monkeypatch):
    if connection.vendor != "postgresql":
        pytest.skip("deadlock detection between two sessions is PostgreSQL's")
    PatientFactory()
    tables = re.findall(r'"([^"]+)"', sql_flush(no_style(), connection)[0])
    last, others = tables[-1], tables[:-1]
    attempts = []

    def counting(self):
        attempts.append(time.monotonic())
        return flush(self)

    flush = conftest._flush
    monkeypatch.setattr(conftest, "_flush", counting)
    locked, done, errors = threading.Event(), threading.Event(), []

    def worker_like_session():
        # holds the table TRUNCATE locks last, then (while TRUNCATE waits for it, holding the
        # others) asks for the others: the lock cycle a committing worker's stamp trigger makes
        try:
            with _other_connection() as other:
                other.execute(f'LOCK TABLE "{last}" IN ACCESS SHARE MODE')
                locked.set()
                time.sleep(0.5)
                other.execute("LOCK TABLE " + ", ".join(f'"{t}"' for t in others) + " IN ACCESS SHARE MODE")
                other.commit()
        except Exception as exc:  # noqa: BLE001 -- reported by the assertion below
            errors.append(exc)
        finally:
            locked.set()
            done.set()

    thread = threading.Thread(target=worker_like_session)
    thread.start()
    assert locked.wait(10)
    case = TransactionTestCase()
    case.databases = {"default"}
    case._fixture_teardown()  # the flush pytest-django runs after a transactional test
    assert done.wait(30)
    thread.join()
    assert errors == []  # the other session was not the victim: the flush was
    assert len(attempts) == 2, "the first flush should have deadlocked and the second succeeded"
    from patients.models import Patient
    assert not Patient.objects.exists()
