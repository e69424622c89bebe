"""Operator pages and the health probe."""

from __future__ import annotations

import pytest
from django.db import OperationalError


@pytest.mark.django_db
def test_health_answers_ok_without_login(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


@pytest.mark.django_db
def test_health_reports_a_database_failure_without_its_details(client, monkeypatch, caplog):
    # The probe is public: the driver's message (host, port, user name) goes to the log only.
    secret = 'connection to server at "10.1.2.3", port 5432 failed: password for user "ops"'

    def broken_cursor(*args, **kwargs):
        raise OperationalError(secret)

    monkeypatch.setattr("pipelines.views.connection.cursor", broken_cursor)

    response = client.get("/health")

    assert response.status_code == 503
    assert response.json() == {"status": "degraded", "database": "error"}
    assert secret not in response.content.decode()
    assert any(
        secret in record.getMessage() or secret in str(record.exc_info) for record in caplog.records
    )
