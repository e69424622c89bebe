"""Writing a tar of files that are each verified against a known checksum while they are read,
with the tar itself hashed while it is written: raw files into a package, package tars into a
transfer bundle. One pass over every byte."""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pipelines.exceptions import NonRetryableError

from .streams import HashingReader, HashingWriter

# Bytes per read while tarring: large enough that Python overhead is negligible next to the I/O.
COPY_BUFFER = 4 * 1024 * 1024


class MemberCorrupt(NonRetryableError):
    """A file going into a tar is missing, has another size, or does not match its checksum.
    Trying again reads the same bytes."""


@dataclass(frozen=True)
class Member:
    arcname: str
    path: Path
    size: int
    checksum: str
    algorithm: str
    what: str  # "raw file", "package", for messages


def write_tar(
    target: Path,
    members: Iterable[Member],
    *,
    algorithm: str,
    claim: str,
    check: Callable[[], None] = lambda: None,
    after_first: Callable[[], None] = lambda: None,
) -> tuple[str, int]:
    """Write a tar of ``members`` to ``target`` through a temporary name next to it (renamed in
    place once complete and fsynced), and return the (checksum, size) of the tar as written.

    ``claim`` names the temporary file; partial files of earlier claims on the same target
    (a worker killed mid-tar) are removed first. ``check`` runs after every chunk read (it may
    raise to stop, e.g. a lost lease); ``after_first`` after the first member. Raises
    ``MemberCorrupt`` for a member that does not match; nothing is left behind on any failure.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        stale.unlink(missing_ok=True)
    partial = target.with_name(f".{target.name}.{claim[:12]}.partial")
    try:
        with open(partial, "wb") as raw:
            out = HashingWriter(raw, algorithm)
            with tarfile.TarFile(
                fileobj=out,  # type: ignore[arg-type]
                mode="w",
                format=tarfile.PAX_FORMAT,
                copybufsize=COPY_BUFFER,
            ) as tar:
                for index, member in enumerate(members):
                    _add(tar, member, check)
                    if index == 0:
                        after_first()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return out.hexdigest(), out.size


def _add(tar: tarfile.TarFile, member: Member, check: Callable[[], None]) -> None:
    try:
        handle = open(member.path, "rb")  # noqa: SIM115 - closed below, after the size check
    except FileNotFoundError as exc:
        raise MemberCorrupt(f"{member.what} {member.arcname} is missing ({member.path})") from exc
    with handle:
        stat = os.fstat(handle.fileno())
        if stat.st_size != member.size:
            raise MemberCorrupt(
                f"{member.what} {member.arcname} is {stat.st_size} bytes, registered as "
                f"{member.size}"
            )
        info = tar.gettarinfo(arcname=member.arcname, fileobj=handle)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        reader = HashingReader(handle, member.algorithm, on_chunk=check)
        tar.addfile(info, fileobj=reader)
        if reader.size != member.size or reader.hexdigest() != member.checksum:
            raise MemberCorrupt(
                f"{member.what} {member.arcname} does not match its registered checksum "
                f"({member.algorithm} {member.checksum[:16]}..., read "
                f"{reader.hexdigest()[:16]}...): it changed since it was registered"
            )
