"""The Thrift IDL, loaded once.

The ``.thrift`` files live in ``idl/`` at the top of a checkout; a wheel carries
them as ``auth_rpc/idl/``. Both the Auth and the Posts service (and every
client) use the modules loaded here, so that exception classes are shared:
thriftpy2 only sends a declared exception if it is an instance of the very
class named in the IDL.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import thriftpy2

__all__ = ["IDL_DIR", "auth_thrift", "common_thrift", "posts_thrift"]


def _find_idl_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "idl", here.parent / "idl"):
        if (candidate / "auth.thrift").is_file():
            return candidate
    raise RuntimeError(f"cannot find the Thrift IDL next to {here}")  # pragma: no cover


IDL_DIR: Path = _find_idl_dir()


def _load(name: str) -> ModuleType:
    module: ModuleType = thriftpy2.load(
        str(IDL_DIR / f"{name}.thrift"),
        module_name=f"{name}_thrift",
        include_dirs=[str(IDL_DIR)],
    )
    return module


common_thrift = _load("common")
auth_thrift = _load("auth")
posts_thrift = _load("posts")
