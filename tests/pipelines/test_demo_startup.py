"""Starting `manage.py demo` on a first run: it says "ready" only once it listens, fails loudly
when it cannot serve, and `make` names the package a fresh Debian needs for the venv."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from pipelines.models import ExecutedObsUnit
from tests.subprocesses import ROOT, clean_env

# Every wait here is bounded; the setup of a fresh demo takes about 20 s on a laptop.
STARTUP_SECONDS = 150


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other server is listening on (never 8000)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
        client.settimeout(2)
        return client.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.django_db
def test_a_taken_port_fails_before_the_setup(taken_port: int) -> None:
    out = StringIO()
    with pytest.raises(CommandError, match=f"127.0.0.1:{taken_port}: Address already in use"):
        call_command("demo", "--port", str(taken_port), "--count", "1", stdout=out)
    assert "Demo ready" not in out.getvalue()
    assert ExecutedObsUnit.objects.count() == 0


def test_a_taken_port_exits_non_zero_with_the_port_in_the_message(
    tmp_path: Path, taken_port: int
) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "demo", "--port", str(taken_port)],
        cwd=ROOT,
        env=clean_env(tmp_path / "var"),
        capture_output=True,
        text=True,
        timeout=STARTUP_SECONDS,
        check=False,
    )
    assert result.returncode != 0
    assert f"cannot serve the demo on 127.0.0.1:{taken_port}" in result.stderr
    assert "--port 8001" in result.stderr and "make demo PORT=8001" in result.stderr
    assert "Demo ready" not in result.stdout


def test_a_port_taken_after_the_check_still_fails(tmp_path: Path, taken_port: int) -> None:
    # Another server takes the port between the check and the start: daphne logs the listen
    # failure and returns normally; the demo must not exit 0.
    script = (
        "import django\ndjango.setup()\n"
        "from django.core.management import call_command\n"
        "from pipelines.management.commands import demo\n"
        "demo.Command.check_port_free = lambda self: None\n"
        "demo.Command.run_facility = lambda self: None\n"
        f"call_command('demo', '--port', '{taken_port}', '--count', '0')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=clean_env(tmp_path / "var"),
        capture_output=True,
        text=True,
        timeout=STARTUP_SECONDS,
        check=False,
    )
    assert result.returncode != 0
    assert f"cannot serve the demo on 127.0.0.1:{taken_port}" in result.stderr
    assert "Address already in use" in result.stderr
    assert "Demo ready" not in result.stdout


def test_ready_is_said_once_the_port_accepts_connections(tmp_path: Path) -> None:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "manage.py", "demo", "--port", str(port), "--count", "0"],
        cwd=ROOT,
        env=clean_env(tmp_path / "var"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        os.set_blocking(process.stdout.fileno(), False)
        deadline = time.monotonic() + STARTUP_SECONDS
        ready = False
        while not ready and time.monotonic() < deadline and process.poll() is None:
            line = process.stdout.readline()
            if not line:
                time.sleep(0.1)
                continue
            lines.append(line)
            if line.startswith("Demo ready"):
                # Checked at once: the port was bound before the line was written.
                assert _accepts(port), "said ready before listening"
                ready = True
        assert ready, "".join(lines)
        assert lines[-1].strip() == f"Demo ready: http://127.0.0.1:{port}/"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    assert not _accepts(port)


# --- make: the venv ---------------------------------------------------------------------------
FAKE_PYTHON_WITHOUT_ENSUREPIP = """#!/bin/sh
# Behaves like Debian's python3.11 without the python3.11-venv package.
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin" && touch "$3/bin/python"
    echo "The virtual environment was not created successfully because ensurepip is not" >&2
    echo "available.  On Debian/Ubuntu systems, you need to install the python3-venv" >&2
    echo "package using the following command." >&2
    exit 1
fi
if [ "$1" = "-c" ]; then echo 3.11; exit 0; fi
exit 2
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_names_the_venv_package_when_ensurepip_is_missing(tmp_path: Path) -> None:
    fake = tmp_path / "python3.11"
    fake.write_text(FAKE_PYTHON_WITHOUT_ENSUREPIP)
    fake.chmod(0o755)
    venv = tmp_path / "venv"

    result = subprocess.run(
        ["make", "-s", "-C", str(ROOT), f"VENV={venv}", f"PYTHON={fake}", f"{venv}/bin/python"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode != 0
    message = [line for line in result.stderr.splitlines() if line.startswith("make: ")]
    assert len(message) >= 1
    assert "apt-get install python3.11-venv" in message[0]
    assert "Traceback" not in result.stderr
    # The half-made venv is gone, so the next make run tries again instead of calling its pip.
    assert not venv.exists()
