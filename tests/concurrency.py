"""Running database work in several threads released at the same moment, for the race tests
(PostgreSQL: each thread has its own connection, closed when it ends)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from django.db import connection


def run_together(works: Sequence[Callable[[], Any]], *, timeout: float = 120) -> list[Any]:
    """Run each of ``works`` in its own thread, all released by one barrier; returns their
    results in the order given and re-raises the first error any of them raised."""
    barrier = threading.Barrier(len(works))
    results: list[Any] = [None] * len(works)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = works[index]()
        except BaseException as exc:  # reported to the caller below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(works))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    if any(thread.is_alive() for thread in threads):
        raise AssertionError(f"a racing thread did not finish within {timeout:g}s")
    if errors:
        raise errors[0]
    return results


def together(work: Callable[[], Any], *, threads: int = 2) -> list[Any]:
    """``work`` in ``threads`` threads started at once (``run_together``)."""
    return run_together([work] * threads)
