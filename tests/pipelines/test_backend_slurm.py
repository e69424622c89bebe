"""The SLURM backend's pure parts: the batch script, resource mapping, parsing of squeue/scontrol/
sacct output and the partition check. The real-cluster tests are in test_backend_slurm_cluster.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError

from pipelines.backends.base import BACKENDS, JOB_DONE_CALLBACK_ENV, BackendError, JobSpec
from pipelines.backends.slurm import (
    SQUEUE_FORMAT,
    PartitionLimits,
    batch_script,
    check_against_partition,
    parse_key_values,
    parse_sacct,
    parse_squeue,
    partition_limits_from,
    resource_flags,
    slurm_memory,
    slurm_minutes,
    slurm_time,
    status_from_exit_file,
    status_from_row,
)


def _spec(tmp_path: Path, **overrides) -> JobSpec:  # type: ignore[no-untyped-def]
    values = {
        "name": "run-12-1",
        "command": ["python", "-m", "pipelines.demo.reduction", "calibrate"],
        "run_dir": tmp_path / "run",
        "env": {"WORKFLOW_OUTPUT_DIR": "/workflow/output/"},
        "resources": {"cpu": 4, "memory_gb": 16, "time_hours": 2},
    }
    values.update(overrides)
    return JobSpec(**values)


def _sbatch_options(script: str) -> list[str]:
    return [
        line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")
    ]


def test_behaviour_29_slurm_script_carries_cpus_memory_time_and_the_configured_partition(
    tmp_path,
) -> None:
    script = batch_script(_spec(tmp_path), partition="science")

    options = _sbatch_options(script)
    assert "--cpus-per-task=4" in options
    assert "--mem=16G" in options
    assert "--time=02:00:00" in options
    assert "--partition=science" in options
    assert "--job-name=run-12-1" in options
    assert f"--output={tmp_path / 'run' / 'logs' / 'stdout.log'}" in options
    assert f"--error={tmp_path / 'run' / 'logs' / 'stderr.log'}" in options
    assert f"--chdir={tmp_path / 'run'}" in options


def test_without_a_configured_partition_the_script_names_none(tmp_path) -> None:
    options = _sbatch_options(batch_script(_spec(tmp_path), partition=""))

    assert not [option for option in options if option.startswith("--partition")]


@pytest.mark.parametrize(
    ("hours", "expected"),
    [
        (2, "02:00:00"),
        (1 / 60, "00:01:00"),
        (0.5, "00:30:00"),
        (0.1, "00:06:00"),  # 6.000000000000001 minutes in floating point
        (1.01, "01:01:00"),  # 60.6 minutes round up: never less time than asked
        (23.99, "1-00:00:00"),  # 1439.4 minutes round up to a whole day
        (24, "1-00:00:00"),
        (720, "30-00:00:00"),
    ],
)
def test_time_hours_become_slurm_time_rounded_up_to_the_minute(hours, expected) -> None:
    assert slurm_time(hours) == expected


@pytest.mark.parametrize(
    ("gigabytes", "expected"), [(16, "16G"), (16.0, "16G"), (0.5, "512M"), (1.3, "1332M")]
)
def test_memory_is_whole_gigabytes_or_megabytes_rounded_up(gigabytes, expected) -> None:
    assert slurm_memory(gigabytes) == expected


def test_keys_left_out_leave_slurm_defaults_except_one_cpu() -> None:
    assert resource_flags({}) == ["--nodes=1", "--ntasks=1", "--cpus-per-task=1"]


def test_the_script_exports_the_job_environment_but_not_the_completion_push(tmp_path) -> None:
    spec = _spec(
        tmp_path,
        env={"WORKFLOW_INPUT_DIR": "/a dir/with 'quotes'", JOB_DONE_CALLBACK_ENV: "{secret}"},
    )

    script = batch_script(spec)

    assert "export WORKFLOW_INPUT_DIR='/a dir/with '\"'\"'quotes'\"'\"''" in script
    assert JOB_DONE_CALLBACK_ENV not in script
    assert "{secret}" not in script


def test_the_script_refuses_an_environment_name_bash_cannot_export(tmp_path) -> None:
    with pytest.raises(BackendError, match="environment variable name 'BAD-NAME'"):
        batch_script(_spec(tmp_path, env={"BAD-NAME": "x"}))


def test_the_script_refuses_a_run_directory_with_whitespace(tmp_path) -> None:
    with pytest.raises(BackendError, match="contains whitespace"):
        batch_script(_spec(tmp_path, run_dir=tmp_path / "a run"))


@pytest.mark.parametrize(("command", "code"), [("exit 0", 0), ("exit 3", 3), ("kill -9 $$", 137)])
def test_the_script_writes_the_commands_exit_code_as_json_and_exits_with_it(
    tmp_path, command, code
) -> None:
    """The script runs under plain bash too (SLURM only reads the #SBATCH comments)."""
    spec = _spec(tmp_path, command=["bash", "-c", f"echo hello; {command}"], resources={})
    (spec.run_dir / "logs").mkdir(parents=True)
    script = tmp_path / "job.sbatch"
    script.write_text(batch_script(spec))

    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)

    assert result.returncode == code
    assert result.stdout == "hello\n"
    from pipelines.backends.base import read_json

    ended = read_json(spec.run_dir / "logs" / "exit_code")
    assert ended is not None
    assert ended["exit_code"] == code
    assert ended["reason"] == {0: "", 3: "exit code 3", 137: "killed by signal 9"}[code]
    assert isinstance(ended["wall_seconds"], float)
    assert not list((spec.run_dir / "logs").glob(".exit_code*"))


def test_squeue_rows_are_parsed_by_the_format_the_backend_asks_for() -> None:
    assert "exit_code:|" in SQUEUE_FORMAT and SQUEUE_FORMAT.endswith("WorkDir:")
    text = (
        "3|run-1-1|FAILED|NonZeroExitCode|768|2026-12-02T10:03:01|2026-12-02T10:03:02|/tmp/a|b\n"
        "4|run-2-1|PENDING|JobHeldUser|0|N/A|N/A|/tmp/c\n"
        "\n"
    )

    rows = parse_squeue(text)

    assert set(rows) == {"3", "4"}
    assert rows["3"].exit_status == 768
    assert rows["3"].work_dir == "/tmp/a|b"
    assert rows["4"].state == "PENDING"


def _row(state: str, reason: str = "None", exit_status: int = 0):  # type: ignore[no-untyped-def]
    line = (
        f"7|run-1-1|{state}|{reason}|{exit_status}|2026-12-02T10:00:00|2026-12-02T10:01:30|/tmp/r"
    )
    return parse_squeue(line)["7"]


@pytest.mark.parametrize(
    ("state", "reason", "exit_status", "expected_state", "expected_code", "reason_part"),
    [
        ("PENDING", "Resources", 0, "pending", None, "Resources"),
        ("PENDING", "JobHeldUser", 0, "pending", None, "JobHeldUser"),
        ("RUNNING", "None", 0, "running", None, ""),
        ("COMPLETING", "None", 0, "running", None, ""),
        ("COMPLETED", "None", 0, "completed", 0, ""),
        ("FAILED", "NonZeroExitCode", 3 << 8, "failed", 3, "exit code 3"),
        ("FAILED", "NonZeroExitCode", 9, "failed", 137, "exit code 137"),
        ("TIMEOUT", "TimeLimit", 0, "failed", None, "SLURM TIMEOUT"),
        ("CANCELLED", "None", 0, "failed", None, "SLURM CANCELLED"),
        ("NODE_FAIL", "None", 0, "failed", None, "SLURM NODE_FAIL"),
        ("OUT_OF_MEMORY", "OutOfMemory", 0, "failed", None, "ran out of memory"),
    ],
)
def test_every_slurm_state_maps_to_the_normalised_vocabulary(
    state, reason, exit_status, expected_state, expected_code, reason_part
) -> None:
    status = status_from_row(_row(state, reason, exit_status), None)

    assert status.state == expected_state  # behaviour 51
    assert status.exit_code == expected_code
    assert reason_part in status.reason


def test_a_finished_job_takes_its_wall_time_from_the_exit_code_file() -> None:
    status = status_from_row(_row("COMPLETED"), {"exit_code": 0, "wall_seconds": 12.5})

    assert status.wall_seconds == 12.5
    assert status.started_at is not None and status.finished_at is not None


def test_a_forgotten_job_reads_its_end_from_the_exit_code_file() -> None:
    ok = status_from_exit_file("8", {"exit_code": 0, "reason": "", "wall_seconds": 1})
    bad = status_from_exit_file("9", {"exit_code": 3, "reason": "exit code 3"})

    assert (ok.state, ok.exit_code, ok.wall_seconds) == ("completed", 0, 1.0)
    assert (bad.state, bad.exit_code, bad.reason) == ("failed", 3, "exit code 3")


def test_sacct_rows_become_statuses() -> None:
    text = (
        "11|COMPLETED|0:0|2026-12-02T10:00:00|2026-12-02T10:00:05|5|None\n"
        "12|FAILED|3:0|2026-12-02T10:00:00|2026-12-02T10:00:05|5|NonZeroExitCode\n"
        "13|TIMEOUT|0:15|2026-12-02T10:00:00|2026-12-02T10:01:05|65|TimeLimit\n"
        "13.batch|CANCELLED|0:15|...\n"
    )

    statuses = parse_sacct(text)

    assert set(statuses) == {"11", "12", "13"}
    assert (statuses["11"].state, statuses["11"].exit_code) == ("completed", 0)
    assert (statuses["12"].state, statuses["12"].exit_code) == ("failed", 3)
    assert statuses["13"].state == "failed" and "TIMEOUT" in statuses["13"].reason


def test_scontrol_records_keep_values_with_spaces() -> None:
    record = parse_key_values(
        "PartitionName=debug Default=YES MaxTime=1-00:00:00 Command=/bin/echo a b Nodes=vm"
    )

    assert record["Command"] == "/bin/echo a b"
    assert record["MaxTime"] == "1-00:00:00"


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("UNLIMITED", None),
        ("infinite", None),
        ("02:00:00", 120),
        ("1-00:00:00", 1440),
        ("30", 30),
        ("5:30", 6),
        ("2-12", 3600),
    ],
)
def test_slurm_durations_are_read_in_minutes(text, minutes) -> None:
    assert slurm_minutes(text) == minutes


def test_partition_limits_take_the_largest_node_capped_by_the_partition() -> None:
    record = parse_key_values(
        "PartitionName=short MaxTime=04:00:00 MaxCPUsPerNode=8 MaxMemPerNode=UNLIMITED"
    )

    limits = partition_limits_from(record, [(16, 64000), (32, 128000)])

    assert limits == PartitionLimits("short", 8, 128000, 240)


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        (
            {"cpu": 9},
            "resource 'cpu' = 9 is beyond SLURM partition 'short': a job there gets at most 8",
        ),
        ({"memory_gb": 200}, "resource 'memory_gb' = 200 is beyond SLURM partition 'short'"),
        (
            {"time_hours": 5},
            "resource 'time_hours' = 5 is beyond SLURM partition 'short': MaxTime is 04:00:00",
        ),
    ],
)
def test_resources_beyond_the_partition_are_refused_naming_the_limit(resources, message) -> None:
    limits = PartitionLimits("short", 8, 128000, 240)

    with pytest.raises(ValidationError) as caught:
        check_against_partition(resources, limits)

    assert message in caught.value.messages[0]


def test_resources_within_the_partition_pass() -> None:
    check_against_partition(
        {"cpu": 8, "memory_gb": 125, "time_hours": 4}, PartitionLimits("short", 8, 128000, 240)
    )


def test_the_registry_names_the_slurm_backend() -> None:
    assert BACKENDS["slurm"] == "pipelines.backends.slurm.SlurmBackend"


def test_without_slurm_commands_submit_is_a_backend_error_and_validation_refuses(
    monkeypatch, tmp_path
) -> None:
    """A worker without the SLURM client (or a cluster that does not answer) may retry a
    submission later; a step saved meanwhile is refused, saying why."""
    from pipelines.backends import slurm

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(slurm, "_PARTITION_CACHE", {})
    backend = slurm.SlurmBackend(partition="", state_dir=tmp_path / "index")

    with pytest.raises(BackendError, match="scontrol not found: the SLURM client commands"):
        backend.submit(_spec(tmp_path, resources={"cpu": 1}))
    with pytest.raises(ValidationError, match="cannot check the resources against SLURM"):
        backend.validate_resources({"cpu": 1})
    assert not (tmp_path / "run" / "logs").exists()
