"""Joining paths that come from users or data onto a location root without leaving it.

Relative paths of raw files, packages and products arrive from clients (ingest API, forms,
tar members); every one of them passes through here before the file system is touched
(SPEC §8: paths never escape their location's root).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from pipelines.exceptions import UnsafePath


def normalize_relative_path(relative: str | os.PathLike[str]) -> str:
    """The canonical POSIX form of a relative path, checked without touching the disk.

    Collapses ``.`` components, repeated and trailing slashes. Raises ``UnsafePath`` for an
    empty path, a NUL byte, an absolute path or any ``..`` component (even one that would stay
    inside the root: stored paths are canonical, so there is never a reason to send one).
    """
    text = os.fspath(relative)
    if "\x00" in text:
        raise UnsafePath(f"path {text!r} contains a NUL byte")
    if not text.strip():
        raise UnsafePath("path is empty")
    if text.startswith("/"):
        raise UnsafePath(f"path {text!r} is absolute; it must be relative to the location root")
    parts = PurePosixPath(text).parts
    if ".." in parts:
        raise UnsafePath(f"path {text!r} contains '..'; it could leave the location root")
    normalized = PurePosixPath(*parts).as_posix() if parts else ""
    if normalized in ("", "."):
        raise UnsafePath(f"path {text!r} names the location root itself, not a file below it")
    return normalized


def safe_join(root: str | os.PathLike[str], relative: str | os.PathLike[str]) -> Path:
    """``root / relative`` after proving the result stays inside ``root``.

    The lexical checks of ``normalize_relative_path`` come first; then the joined path is
    resolved (following symlinks, tolerating parts that do not exist yet) and must still lie
    under the resolved root, so a symlink inside the root cannot point out of it. Returns the
    joined path in the caller's spelling of ``root`` (not the resolved one). Raises
    ``UnsafePath``; raises ``ValueError`` when ``root`` itself is empty (a configuration error).
    """
    if not os.fspath(root):
        raise ValueError("location root is empty")
    normalized = normalize_relative_path(relative)
    root_path = Path(root)
    candidate = root_path / normalized
    resolved_root = root_path.resolve()
    resolved = candidate.resolve()
    if resolved != resolved_root and not resolved.is_relative_to(resolved_root):
        raise UnsafePath(
            f"path {normalized!r} resolves to {resolved}, outside the location root "
            f"{resolved_root} (through a symlink)"
        )
    return candidate
