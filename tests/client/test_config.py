"""The token file: mode 0600, atomic replace, strict parsing; and token pair checks."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from auth_rpc.idl import auth_thrift
from client import ProtocolError, Tokens
from client.config import (
    ConfigError,
    SavedLogin,
    default_config_dir,
    delete_login,
    load_login,
    save_login,
    secure_config_dir,
    token_file,
)

LOGIN = SavedLogin(
    auth="127.0.0.1:9090",
    posts="127.0.0.1:9091",
    subject="alice",
    access_token="header.payload.signature",
    refresh_token="opaque-refresh-token",
    expires_at=1_800_000_000.0,
    lifetime_s=900.0,
    scope="posts:read posts:write",
)


def test_round_trip_with_private_modes(tmp_path: Path) -> None:
    path = token_file(tmp_path / "posts-client")
    save_login(path, LOGIN)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_login(path) == LOGIN
    assert os.listdir(path.parent) == ["tokens.json"]  # no temporary file left


def test_replace_is_atomic_and_keeps_the_mode(tmp_path: Path) -> None:
    path = token_file(tmp_path)
    save_login(path, LOGIN)
    inode = path.stat().st_ino
    rotated = SavedLogin(**{**LOGIN.__dict__, "refresh_token": "rotated"})
    save_login(path, rotated)
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_login(path)
    assert loaded is not None and loaded.refresh_token == "rotated"


def test_missing_file_is_no_login(tmp_path: Path) -> None:
    assert load_login(token_file(tmp_path)) is None
    assert delete_login(token_file(tmp_path)) is False


def test_repr_hides_tokens() -> None:
    assert LOGIN.access_token not in repr(LOGIN)
    assert LOGIN.refresh_token not in repr(LOGIN)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ("[]", "unknown format"),
        (json.dumps({"version": 2}), "unknown format"),
        (json.dumps({**json.loads(LOGIN.to_json()), "access_token": 5}), "access_token"),
        (json.dumps({**json.loads(LOGIN.to_json()), "access_token": ""}), "no access token"),
        (json.dumps({**json.loads(LOGIN.to_json()), "expires_at": "soon"}), "expires_at"),
        (json.dumps({**json.loads(LOGIN.to_json()), "expires_at": True}), "expires_at"),
        (json.dumps({**json.loads(LOGIN.to_json()), "framed": "yes"}), "framed"),
        (json.dumps({**json.loads(LOGIN.to_json()), "tls_ca": 1}), "tls_ca"),
    ],
)
def test_malformed_files_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = token_file(tmp_path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    with pytest.raises(ConfigError, match=message):
        load_login(path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = token_file(tmp_path)
    save_login(path, LOGIN)
    os.chmod(path, mode)
    with pytest.raises(ConfigError, match="too open"):
        load_login(path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX symlinks and O_NOFOLLOW")
def test_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.json"
    save_login(real, LOGIN)
    link = token_file(tmp_path / "config")
    link.parent.mkdir()
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="cannot open"):
        load_login(link)


def test_default_directory_follows_the_platform() -> None:
    assert default_config_dir().name == "posts-client"


def _pair(**fields: object) -> object:
    values: dict[str, object] = {
        "access_token": "a.b.c",
        "refresh_token": "r",
        "token_type": "Bearer",
        "expires_in": 900,
        "scope": "posts:read",
    }
    values.update(fields)
    return auth_thrift.TokenPair(**values)


def test_token_pair_is_checked() -> None:
    tokens = Tokens.from_pair(_pair(token_type="bearer"), now=1000.0)
    assert tokens.expires_at == 1900.0 and tokens.lifetime_s == 900.0
    for bad in (
        _pair(access_token=""),
        _pair(access_token=None),
        _pair(expires_in=0),
        _pair(expires_in=-5),
        _pair(token_type="MAC"),
    ):
        with pytest.raises(ProtocolError):
            Tokens.from_pair(bad, now=1000.0)


@pytest.mark.parametrize(
    ("now", "due"),
    [(1000.0, False), (1839.0, False), (1840.0, True), (1900.0, True), (2000.0, True)],
)
def test_refresh_is_due_a_margin_before_expiry(now: float, due: bool) -> None:
    tokens = Tokens.from_pair(_pair(), now=1000.0)  # expires at 1900
    assert tokens.refresh_due(now, margin_s=60.0) is due


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_an_open_config_directory_of_ones_own_is_tightened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: an existing 0777 directory was used as it was, without a word."""
    from client.cli import main

    directory = tmp_path / "posts-client"
    directory.mkdir()
    os.chmod(directory, 0o777)
    assert secure_config_dir(directory) is True
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert secure_config_dir(directory) is False  # nothing left to do
    os.chmod(directory, 0o755)
    save_login(token_file(directory), LOGIN)  # the library checks too
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    os.chmod(directory, 0o777)
    assert load_login(token_file(directory)) == LOGIN
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    # The command says so, once, and goes on (not logged in: exit 3).
    os.chmod(directory, 0o777)
    delete_login(token_file(directory))
    code = main(["whoami"], env={"POSTS_CLIENT_CONFIG_DIR": str(directory)})
    err = capsys.readouterr().err
    assert code == 3, err
    assert f"restricted {directory} to its owner (mode 0700)" in err
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def _foreign_directory(tmp_path: Path) -> Path:
    if os.getuid() == 0:
        directory = tmp_path / "theirs"
        directory.mkdir(mode=0o777)
        os.chmod(directory, 0o777)
        os.chown(directory, 65534, 65534)
        return directory
    return Path("/usr")  # root's, not ours


@pytest.mark.skipif(os.name != "posix", reason="POSIX ownership")
def test_a_config_directory_of_another_user_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from client.cli import main

    directory = _foreign_directory(tmp_path)
    before = stat.S_IMODE(directory.stat().st_mode)
    with pytest.raises(ConfigError, match="belongs to another user"):
        secure_config_dir(directory)
    with pytest.raises(ConfigError, match="belongs to another user"):
        load_login(token_file(directory))
    code = main(["whoami"], env={"POSTS_CLIENT_CONFIG_DIR": str(directory)})
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("posts-client: error: ")
    assert "belongs to another user" in err[0]
    assert stat.S_IMODE(directory.stat().st_mode) == before  # not touched


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_config_directory_others_can_replace_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from client.cli import main

    shared = tmp_path / "shared"
    shared.mkdir()
    directory = shared / "posts-client"
    directory.mkdir(mode=0o700)
    for mode in (0o777, 0o775):
        os.chmod(shared, mode)  # anyone (of the group) may rename ours and put theirs
        with pytest.raises(ConfigError, match=f"parent {shared} lets other users replace it"):
            secure_config_dir(directory)
        with pytest.raises(ConfigError, match="lets other users replace it"):
            save_login(token_file(directory), LOGIN)
        assert not token_file(directory).exists()
        code = main(["whoami"], env={"POSTS_CLIENT_CONFIG_DIR": str(directory)})
        err = capsys.readouterr().err.splitlines()
        assert code == 1 and len(err) == 1 and "lets other users replace it" in err[0], err
    # With the sticky bit (as /tmp), only the owner may rename its entries.
    os.chmod(shared, 0o1777)
    assert secure_config_dir(directory) is False
    save_login(token_file(directory), LOGIN)
    assert load_login(token_file(directory)) == LOGIN
