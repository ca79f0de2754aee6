"""Data directories and files that only the service's user may have written.

A data directory holds what a service trusts without further proof: signing
keys, the account database, the posts store. If another user owns it, or
group or others may write it, that user can swap its contents (put their own
signing key in ``keys/``) and the service would sign and accept their tokens.
As sshd's ``StrictModes`` does, the services refuse such a path at start with
one line naming the path and the problem; only the owner's own read bits are
tightened silently (0700 directories, 0600 files).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from auth_rpc.errors import DependencyUnavailable

__all__ = ["UnsafeFile", "check_private", "check_private_stat", "private_dir"]

log = logging.getLogger("auth_rpc.serving.private_files")


class UnsafeFile(DependencyUnavailable):
    """A data directory or file the service refuses to use; the message names it and why."""


def check_private_stat(st: os.stat_result, path: Path | str, what: str) -> os.stat_result:
    """Refuse ``st`` (of ``path``) if another user owns it or group/others may write it.

    Raises :class:`UnsafeFile`; returns ``st``.
    """
    uid = os.geteuid()
    if st.st_uid != uid:
        raise UnsafeFile(
            f"{what} {path} is owned by uid {st.st_uid}, not by this service's user (uid {uid}): "
            "refused; chown it to the service's user"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeFile(
            f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
            "refused; chmod go-w it (another user could have replaced its contents)"
        )
    return st


def check_private(path: Path, what: str) -> os.stat_result:
    """:func:`check_private_stat` of ``path`` (symlinks followed). Raises UnsafeFile, OSError."""
    return check_private_stat(os.stat(path), path, what)


def private_dir(path: Path, what: str = "data directory") -> None:
    """Make ``path`` (mode 0700) if missing; refuse it if unsafe; tighten its read bits.

    Raises :class:`UnsafeFile`, ``OSError``.
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = check_private(path, what)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeFile(f"{what} {path} is not a directory")
    if st.st_mode & 0o077:
        log.info("restricting the %s %s to its owner (mode 0700)", what, path)
        os.chmod(path, 0o700)
