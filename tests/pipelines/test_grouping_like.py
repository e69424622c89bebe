"""``like`` answers the same on SQLite and PostgreSQL: case-sensitive SQL LIKE.

SQLite's own LIKE ignores ASCII case, so the filter engine compiles ``like`` to GLOB there
(``like_to_glob``) and to ``LIKE ... ESCAPE '\\'`` on PostgreSQL. The table below is run through
both translations at the SQL level: SQLite through the standard library (so every run, CI's
PostgreSQL one included, checks the GLOB translation) and PostgreSQL when the run uses it. The
ORM-level tests in test_grouping.py run the same operator on whichever database the run uses.
"""

from __future__ import annotations

import sqlite3

import pytest
from django.db import connection

from pipelines.grouping import like_to_glob

# (text, pattern, does it match?) under case-sensitive SQL LIKE with '\' as escape character.
CASES = [
    ("NGC253", "NGC%", True),
    ("ngc253", "NGC%", False),
    ("NGC253", "ngc%", False),
    ("ÄBC", "äbc", False),
    ("NGC253", "NGC25_", True),
    ("NGC2533", "NGC25_", False),
    ("NGC_x", "NGC\\_x", True),
    ("NGCax", "NGC\\_x", False),
    ("100%", "100\\%", True),
    ("1000", "100\\%", False),
    ("a\\b", "a\\\\b", True),
    ("ab", "a\\b", True),  # an escaped ordinary character is that character
    ("M*star", "M*%", True),
    ("Mxstar", "M*%", False),
    ("M?x", "M?x", True),
    ("Mqx", "M?x", False),
    ("[a]", "[a]", True),
    ("a", "[a]", False),
    ("a]", "a]", True),
    ("é", "_", True),
    ("éé", "_", False),
    ("line\nbreak", "line%", True),
    ("line\nbreak", "line_break", True),
    ("", "%", True),
    ("", "_", False),
    ("abc", "%b%", True),
    ("abc", "%B%", False),
    ("abc", "abc", True),
    ("abc", "ab", False),
]


@pytest.mark.parametrize(("text", "pattern", "expected"), CASES)
def test_the_glob_translation_answers_case_sensitive_like_on_sqlite(
    text: str, pattern: str, expected: bool
) -> None:
    with sqlite3.connect(":memory:") as db:
        (matched,) = db.execute("SELECT ? GLOB ?", (text, like_to_glob(pattern))).fetchone()

    assert bool(matched) is expected


def test_sqlite_like_itself_ignores_case_which_is_why_glob_is_used() -> None:
    with sqlite3.connect(":memory:") as db:
        (matched,) = db.execute("SELECT 'ngc253' LIKE 'NGC%'").fetchone()

    assert matched == 1


@pytest.mark.django_db
def test_postgresql_like_with_the_escape_parameter_gives_the_same_answers(
    require_postgres: None,
) -> None:
    with connection.cursor() as cursor:
        for text, pattern, expected in CASES:
            cursor.execute("SELECT %s LIKE %s ESCAPE %s", [text, pattern, "\\"])
            (matched,) = cursor.fetchone()
            assert matched is expected, (text, pattern)
