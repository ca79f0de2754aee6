"""The Posts data directory: refused when another user owns it or others may write it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from auth_rpc.serving.private_files import UnsafeFile
from auth_rpc.verify.verifiers import LocalVerifier
from posts_rpc.server import DB_FILE_NAME, PostsServer

NOBODY = 65534


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_a_data_dir_others_may_write_is_refused(
    tmp_path: Path, verifier: LocalVerifier, mode: int
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(mode)
    with pytest.raises(UnsafeFile, match=rf"data directory {data_dir} is writable by group"):
        PostsServer(data_dir=data_dir, verifier=verifier)
    assert not (data_dir / DB_FILE_NAME).exists()


def test_a_store_others_may_write_is_refused(tmp_path: Path, verifier: LocalVerifier) -> None:
    data_dir = tmp_path / "data"
    PostsServer(data_dir=data_dir, verifier=verifier).stop()
    (data_dir / DB_FILE_NAME).chmod(0o666)
    with pytest.raises(UnsafeFile, match=r"posts\.db is writable by group or others"):
        PostsServer(data_dir=data_dir, verifier=verifier)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("target", ["data dir", "store"])
def test_paths_owned_by_another_user_are_refused(
    tmp_path: Path, verifier: LocalVerifier, target: str
) -> None:
    data_dir = tmp_path / "data"
    PostsServer(data_dir=data_dir, verifier=verifier).stop()
    path = data_dir if target == "data dir" else data_dir / DB_FILE_NAME
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(UnsafeFile, match=rf"{path} is owned by uid {NOBODY}"):
        PostsServer(data_dir=data_dir, verifier=verifier)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_posts_rpc_serve_refuses_it_in_one_line(
    tmp_path: Path, hs256_secret: bytes, workers: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(hs256_secret)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o777)
    done = subprocess.run(
        [
            sys.executable, "-m", "posts_rpc.cli", "serve", "--data-dir", str(data_dir),
            "--port", "0", "--verify", "local", "--hs256-secret-file", str(secret),
            "--issuer", "https://auth.test", "--workers", workers,
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 1 and "ready" not in done.stdout
    assert done.stderr.strip().splitlines() == [
        f"posts-rpc: error: data directory {data_dir} is writable by group or others "
        "(mode 0777): refused; chmod go-w it (another user could have replaced its contents)"
    ]
