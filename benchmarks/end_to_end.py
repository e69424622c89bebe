"""End to end: from ``simulate_observations --count N`` to every package ARCHIVED at both archive
sites, with ``manage.py facility run --until-idle`` in a subprocess on a fresh var directory.

SPEC §9 sets no end-to-end figure; it bounds the parts (orchestration overhead per step, trigger
latency, dispatch throughput, copy at 0.9 x cp). This script shows what they add up to on the
embedded facility, on two backends:

- ``embedded``: the laptop default, SQLite file + file-system broker (no DATABASE_URL,
  CELERY_BROKER_URL or REDIS_URL in the environment);
- ``postgres``: PostgreSQL (database ``bench_e2e``, created afresh and dropped at the end) with
  Redis DB 9 as the Celery broker and Redis DB 10 as the cache (both flushed before and after).

For each: ``migrate``, ``createcachetable``, ``load_demo_facility``, ``simulate_observations
--count N`` (timed on its own), then ``facility run --until-idle --timeout T --tick 1`` (the
timed figure), each a ``manage.py`` subprocess. At the end a ``manage.py shell -c`` snippet
checks that every RawDataPackage is ``archived`` and has a PRESENT, VERIFIED copy at both
``cologne:lta`` and ``us:lta``; the script fails loudly otherwise. The facility's output is
kept in ``$TMPDIR/bench-e2e-<backend>-facility.log`` (one line per round that found work).

Baseline (a rough floor, not a like-for-like comparison): the raw data of the SOURCE locations
copied with ``cp -r`` five times from a warm page cache (the data path copies every byte about
five times per archive site: tar, bundle, transfer, unpack, archive), then the same followed by
``sync`` of the copies. It has no database, no broker, no hashing and no scheduling, so the ratio
says how far the facility is from moving bytes, not how good it is at orchestrating.

    .venv/bin/python benchmarks/end_to_end.py [--count 100] [--backends embedded,postgres]
        [--tick 1] [--timeout 3600] [--py-spy PATH]

``--py-spy PATH`` runs the facility under ``py-spy record`` (50 samples/s, all threads, idle
threads not sampled), keeps the collapsed stacks in ``--py-spy-dir`` and prints the top
functions by own and inclusive samples; the timing of such a run is slightly inflated.

Prints a table and exits; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _django import BROKER_URL, PG_URL, ROOT, _pg_admin, machine_line

DATABASE = "bench_e2e"
CACHE_URL = "redis://127.0.0.1:6379/10"
CONFIG_VARIABLES = (
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "FACILITY_DATA_ROOT",
    "REDUCTION_SCRIPT_DIR",
    "WORKFLOW_LEASE_SECONDS",
)

VERIFY = """
import json
from django.db.models import Count, Q, Sum
from pipelines.models import DataLocation, PhysicalCopy, RawDataFile, RawDataPackage
archives = [("cologne", "lta"), ("us", "lta")]
packages = RawDataPackage.objects.count()
not_archived = dict(RawDataPackage.objects.exclude(state="archived")
                    .values_list("state").annotate(n=Count("id")))
missing = {}
for site, name in archives:
    have = set(PhysicalCopy.objects.filter(
        kind="raw_data_package", status="present", integrity="verified",
        location__site__short_name=site, location__name=name,
    ).values_list("raw_data_package_id", flat=True))
    missing[f"{site}:{name}"] = packages - len(have & set(
        RawDataPackage.objects.values_list("id", flat=True)))
files = RawDataFile.objects.aggregate(n=Count("id"), size=Sum("size"),
                                      unpackaged=Count("id", Q(raw_data_package__isnull=True)))
sources = list(DataLocation.objects.filter(location_type="source")
               .values_list("root_path", flat=True))
print(json.dumps({"packages": packages, "not_archived": not_archived, "missing": missing,
                  "files": files["n"], "bytes": files["size"] or 0,
                  "unpackaged": files["unpackaged"], "sources": sources}))
"""


@dataclass
class Result:
    backend: str
    migrate: float = 0.0
    simulate: float = 0.0
    run: float = 0.0
    rounds: int = 0
    facility: float = 0.0
    packages: int = 0
    files: int = 0
    bytes: int = 0
    cp_floor: float = 0.0
    cp_sync_floor: float = 0.0
    load_before: str = ""
    load_after: str = ""
    summary: str = ""
    notes: list[str] = field(default_factory=list)


def _env(var_dir: Path, backend: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in CONFIG_VARIABLES and not k.startswith("DJANGO_")
    }
    env["WORKFLOW_VAR_DIR"] = str(var_dir)
    env["DJANGO_SETTINGS_MODULE"] = "workflow_site.settings"
    env["PYTHONUNBUFFERED"] = "1"
    if backend == "postgres":
        env["DATABASE_URL"] = PG_URL.format(name=DATABASE)
        env["CELERY_BROKER_URL"] = BROKER_URL
        env["REDIS_URL"] = CACHE_URL
    return env


def _manage(env: dict[str, str], *args: str, prefix: list[str] | None = None) -> tuple[float, str]:
    """Run ``manage.py args`` (optionally under ``prefix``); return (seconds, stdout+stderr)."""
    argv = [*(prefix or []), sys.executable, "manage.py", *args]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"`manage.py {shlex.join(args)}` exited {done.returncode}:\n{output}")
    return seconds, output


def _flush_redis() -> None:
    import redis

    for url in (BROKER_URL, CACHE_URL):
        redis.Redis.from_url(url).flushdb()


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _cp_floor(sources: list[str], scratch: Path, *, sync: bool) -> float:
    """``cp -r`` of every SOURCE location's directory, five times over (then ``sync`` of the
    copies when asked); the copies are removed outside the timing."""
    existing = [s for s in sources if Path(s).is_dir()]
    for source in existing:  # warm the page cache
        subprocess.run(
            ["bash", "-c", f"find {shlex.quote(source)} -type f -exec cat {{}} + > /dev/null"],
            check=True,
        )
    targets = [scratch / f"copy{i}" for i in range(5)]
    start = time.perf_counter()
    for target in targets:
        target.mkdir()
        subprocess.run(["cp", "-r", *existing, str(target)], check=True)
    if sync:
        copied = [str(p) for t in targets for p in t.rglob("*")]
        for i in range(0, len(copied), 2000):
            subprocess.run(["sync", *copied[i : i + 2000]], check=True)
    seconds = time.perf_counter() - start
    for target in targets:
        shutil.rmtree(target)
    return seconds


def run_backend(backend: str, args: argparse.Namespace) -> Result:
    result = Result(backend)
    var_dir = Path(tempfile.mkdtemp(prefix=f"bench-e2e-{backend}-"))
    if backend == "postgres":
        _pg_admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        _pg_admin(f'CREATE DATABASE "{DATABASE}"')
        _flush_redis()
    env = _env(var_dir, backend)
    try:
        result.migrate, _ = _manage(env, "migrate", "--no-input", "-v", "0")
        _manage(env, "createcachetable")
        _manage(env, "load_demo_facility")
        result.simulate, out = _manage(env, "simulate_observations", "--count", str(args.count))
        print(f"# {backend}: {out.strip().splitlines()[-1]}", flush=True)
        prefix = None
        if args.py_spy:
            raw = Path(args.py_spy_dir) / f"end_to_end-{backend}.txt"
            prefix = [
                args.py_spy,
                "record",
                "--nonblocking",
                "-r",
                "50",
                "-o",
                str(raw),
                "-f",
                "raw",
                "--",
            ]
            result.notes.append(f"py-spy raw stacks: {raw}")
        result.load_before = _load()
        result.run, out = _manage(
            env,
            "facility",
            "run",
            "--until-idle",
            "--timeout",
            str(args.timeout),
            "--tick",
            str(args.tick),
            prefix=prefix,
        )
        result.load_after = _load()
        (var_dir.parent / f"bench-e2e-{backend}-facility.log").write_text(out)
        summary = [line for line in out.splitlines() if "facility idle after" in line]
        if not summary:
            raise SystemExit(f"{backend}: facility run did not end idle:\n{out[-3000:]}")
        result.summary = summary[-1].strip()
        match = re.search(r"after (\d+) round\(s\)", result.summary)
        result.rounds = int(match.group(1)) if match else -1
        match = re.search(r"round\(s\) in ([0-9.]+)s", result.summary)
        result.facility = float(match.group(1)) if match else 0.0

        _, out = _manage(env, "shell", "-c", VERIFY)
        state = json.loads(out.strip().splitlines()[-1])
        problems = []
        if state["not_archived"]:
            problems.append(f"packages not archived: {state['not_archived']}")
        if any(state["missing"].values()):
            problems.append(f"packages without a verified PRESENT copy: {state['missing']}")
        if state["unpackaged"] or not state["packages"]:
            problems.append(f"{state['unpackaged']} unpackaged files, {state['packages']} pkgs")
        if problems:
            raise SystemExit(f"{backend}: " + "; ".join(problems))
        result.packages, result.files, result.bytes = (
            state["packages"],
            state["files"],
            state["bytes"],
        )
        scratch = var_dir / "cp-floor"
        scratch.mkdir()
        result.cp_floor = min(_cp_floor(state["sources"], scratch, sync=False) for _ in range(3))
        result.cp_sync_floor = min(
            _cp_floor(state["sources"], scratch, sync=True) for _ in range(3)
        )
        if args.py_spy:
            _py_spy_report(Path(args.py_spy_dir) / f"end_to_end-{backend}.txt", result)
    finally:
        if backend == "postgres":
            _pg_admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
            _flush_redis()
        shutil.rmtree(var_dir, ignore_errors=True)
    return result


def _py_spy_report(raw: Path, result: Result) -> None:
    """Fold py-spy's raw (collapsed) stacks into self and inclusive sample counts per function."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    print(f"\n## py-spy, {result.backend}: {total} samples (all threads, idle excluded)")
    for title, table in (("self", own), ("inclusive", inclusive)):
        print(f"top {title}:")
        for frame, count in sorted(table.items(), key=lambda x: -x[1])[:25]:
            print(f"  {100 * count / max(total, 1):5.1f}%  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="scans to simulate (100)")
    parser.add_argument("--backends", default="embedded,postgres")
    parser.add_argument("--tick", type=float, default=1.0, help="facility run --tick (1)")
    parser.add_argument("--timeout", type=int, default=3600, help="facility run --timeout")
    parser.add_argument("--py-spy", default=None, help="path of a py-spy binary to profile with")
    parser.add_argument("--py-spy-dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    header = machine_line()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"embedded", "postgres"}
    if unknown:
        raise SystemExit(f"unknown backend(s): {', '.join(sorted(unknown))}")
    results = []
    for backend in backends:
        print(f"# {backend}: starting, load average {_load()}", flush=True)
        results.append(run_backend(backend, args))

    print(
        f"\n{args.count} scans; facility run --until-idle --tick {args.tick:g}; {header}; "
        "run s = the `facility run` subprocess (start-up and worker shutdown included), loop s = "
        "its own figure (first round to idle); cp -r floor = SOURCE data copied 5x from page "
        "cache (best of 3), a rough floor only"
    )
    print(
        f"{'backend':9} {'pkgs':>5} {'files':>6} {'MB':>7} {'simulate s':>10} {'run s':>8} "
        f"{'loop s':>7} {'pkgs/s':>7} {'rounds':>6} {'s/round':>7} {'cp-r x5 s':>9} {'+sync s':>8} "
        f"{'run/cp':>7} {'run/+sync':>9}"
    )
    for r in results:
        print(
            f"{r.backend:9} {r.packages:5d} {r.files:6d} {r.bytes / 1e6:7.1f} {r.simulate:10.1f} "
            f"{r.run:8.1f} {r.facility:7.1f} {r.packages / r.run:7.2f} {r.rounds:6d} "
            f"{r.run / r.rounds:7.2f} "
            f"{r.cp_floor:9.3f} {r.cp_sync_floor:8.3f} {r.run / r.cp_floor:7.0f} "
            f"{r.run / r.cp_sync_floor:9.0f}"
        )
    for r in results:
        print(
            f"{r.backend}: migrate {r.migrate:.1f} s; load {r.load_before} before the run, "
            f"{r.load_after} after; {r.summary}"
        )
        for note in r.notes:
            print(f"  {note}")


if __name__ == "__main__":
    main()
