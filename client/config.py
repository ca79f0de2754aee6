"""The saved login of ``posts-client``: one JSON file, mode 0600.

The file lives in the user's configuration directory as the platform names it
(``platformdirs.user_config_dir("posts-client")``: ``~/.config/posts-client``
on Linux, ``~/Library/Application Support/posts-client`` on macOS,
``%APPDATA%\\posts-client`` on Windows). The command line may point it
elsewhere; this module never reads the environment.

It is written atomically: a temporary file created with mode 0600 in the same
directory, flushed to disk, then renamed over the old one, so a crash never
leaves a half-written file and a rotated refresh token is never lost to a
partial write. The directory is created with mode 0700. On POSIX a file that
other users may read, or that belongs to someone else, is refused (as ssh does
with a private key). So is a directory that belongs to someone else, or whose
parent lets another user rename and replace it (writable by group or others
without the sticky bit, or owned by another user than root): whoever can
replace the directory can swap the tokens. An existing directory of the user's
own that group or others may enter is tightened to 0700
(:func:`secure_config_dir`).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

__all__ = [
    "TOKEN_FILE_NAME",
    "ConfigError",
    "SavedLogin",
    "default_config_dir",
    "delete_login",
    "load_login",
    "save_login",
    "secure_config_dir",
    "token_file",
]

TOKEN_FILE_NAME = "tokens.json"  # noqa: S105  # a file name, not a secret
_FORMAT_VERSION = 1
_MAX_FILE_BYTES = 64 * 1024


class ConfigError(Exception):
    """The token file is unreadable, malformed or unsafe (the message names the file)."""


@dataclass(frozen=True)
class SavedLogin:
    """What one login leaves on disk. Tokens are left out of ``repr``."""

    auth: str  # HOST:PORT of the Auth service the tokens came from
    posts: str  # HOST:PORT of the Posts service
    subject: str
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at: float  # unix seconds
    lifetime_s: float
    scope: str = ""
    framed: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def to_json(self) -> str:
        return json.dumps({"version": _FORMAT_VERSION, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: Path) -> SavedLogin:
        """Parse and check every field; raises :class:`ConfigError`."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{where}: not valid JSON") from exc
        if not isinstance(data, dict) or data.get("version") != _FORMAT_VERSION:
            raise ConfigError(f"{where}: unknown format")
        strings = ("auth", "posts", "subject", "access_token", "refresh_token", "scope")
        numbers = ("expires_at", "lifetime_s")
        optional_strings = ("tls_ca", "tls_cert", "tls_key")
        values: dict[str, Any] = {}
        for name in strings:
            value = data.get(name)
            if not isinstance(value, str):
                raise ConfigError(f"{where}: field {name!r} missing or not a string")
            values[name] = value
        for name in numbers:
            value = data.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}: field {name!r} missing or not a number")
            values[name] = float(value)
        for name in optional_strings:
            value = data.get(name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{where}: field {name!r} is not a string")
            values[name] = value
        framed = data.get("framed", False)
        if not isinstance(framed, bool):
            raise ConfigError(f"{where}: field 'framed' is not a boolean")
        values["framed"] = framed
        if not values["access_token"]:
            raise ConfigError(f"{where}: no access token")
        return cls(**values)


def default_config_dir() -> Path:
    """The platform's configuration directory for ``posts-client``."""
    return Path(platformdirs.user_config_dir("posts-client", appauthor=False))


def token_file(config_dir: Path) -> Path:
    """The token file inside ``config_dir``."""
    return config_dir / TOKEN_FILE_NAME


def secure_config_dir(directory: Path) -> bool:
    """Check the configuration directory on POSIX; True if its mode was tightened to 0700.

    A directory that does not exist yet passes (:func:`save_login` makes it
    0700). Raises :class:`ConfigError` when ``directory`` is not a directory,
    belongs to another user, or when it or one of its parents may be replaced
    by another user: a parent writable by group or others without the sticky
    bit (``/tmp``, mode 1777, is fine), or owned by another user than root.
    """
    if os.name != "posix":
        return False
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot use it: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{directory}: not a directory")
    uid = os.getuid()
    if info.st_uid != uid:
        raise ConfigError(f"{directory}: belongs to another user; refusing to use it")
    real = Path(os.path.realpath(directory))
    for parent in real.parents:
        try:
            above = os.stat(parent)
        except OSError as exc:
            raise ConfigError(f"{parent}: cannot check it: {exc.strerror or exc}") from exc
        replaceable = above.st_mode & 0o022 and not above.st_mode & stat.S_ISVTX
        if above.st_uid not in (0, uid) or replaceable:
            raise ConfigError(
                f"{directory}: its parent {parent} lets other users replace it "
                f"(owner uid {above.st_uid}, mode {stat.S_IMODE(above.st_mode):04o}); "
                "refusing to use it"
            )
    if stat.S_IMODE(info.st_mode) & 0o077:
        try:
            os.chmod(directory, 0o700)
        except OSError as exc:
            raise ConfigError(f"{directory}: cannot restrict it to 0700: "
                              f"{exc.strerror or exc}") from exc
        return True
    return False


def save_login(path: Path, login: SavedLogin) -> None:
    """Write ``login`` to ``path`` atomically with mode 0600.

    Creates the parent directory with mode 0700 if needed, and checks it
    (:func:`secure_config_dir`). Raises ``OSError``, :class:`ConfigError`.
    """
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    secure_config_dir(directory)
    # mkstemp creates the file with O_EXCL and mode 0600 from the start, so
    # the tokens are never readable by others, not even for a moment.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(login.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(directory)


def load_login(path: Path) -> SavedLogin | None:
    """The saved login, or ``None`` when there is none.

    Raises :class:`ConfigError` when the file is malformed or, on POSIX, when
    it is a symbolic link, belongs to another user, or is readable or
    writable by group or others, or when its directory is unsafe
    (:func:`secure_config_dir`, which also tightens it).
    """
    secure_config_dir(path.parent)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if os.name == "posix":
            if info.st_uid != os.getuid():
                raise ConfigError(f"{path}: belongs to another user; refusing to use it")
            if info.st_mode & 0o077:
                raise ConfigError(
                    f"{path}: permissions {stat.S_IMODE(info.st_mode):04o} are too open "
                    "(must be 0600); refusing to use it"
                )
        raw = handle.read(_MAX_FILE_BYTES + 1)
    if len(raw) > _MAX_FILE_BYTES:
        raise ConfigError(f"{path}: too large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8") from exc
    return SavedLogin.from_json(text, where=path)


def delete_login(path: Path) -> bool:
    """Remove the token file; True if there was one. Raises ``OSError``."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
