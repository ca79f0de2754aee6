"""The Thrift IDL, loaded once.

The ``.thrift`` files live in ``idl/`` at the top of a checkout; a wheel carries
them as ``auth_rpc/idl/``. Both the Auth and the Posts service (and every
client) use the modules loaded here, so that exception classes are shared:
thriftpy2 only sends a declared exception if it is an instance of the very
class named in the IDL.

A service of your own whose IDL does ``include "common.thrift"`` loads it with
:func:`load_idl`, wherever the file is: its ``common`` is then this package's
:data:`common_thrift`, exception classes included (see :func:`load_idl` for
why plain ``thriftpy2.load`` does not give that).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import thriftpy2

__all__ = ["IDL_DIR", "auth_thrift", "common_thrift", "load_idl", "posts_thrift"]


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


_PACKAGE_MODULES: tuple[ModuleType, ...] = (common_thrift, auth_thrift, posts_thrift)


def load_idl(
    path: str | os.PathLike[str],
    module_name: str | None = None,
    include_dirs: Iterable[str | os.PathLike[str]] = (),
) -> ModuleType:
    """Load a Thrift IDL of your own that may ``include "common.thrift"`` from this package.

    ``path`` may be anywhere. An ``include`` is looked up in the file's own
    directory, then in ``include_dirs`` in order, then in this package's
    :data:`IDL_DIR` (so ``include "common.thrift"`` finds the package's file
    unless you ship your own). ``module_name`` is as for ``thriftpy2.load``
    (it must end in ``_thrift``; given, the module is registered in
    ``sys.modules`` and its objects can be pickled).

    Whatever the loaded IDL includes of this package's files (``common.thrift``,
    and ``auth.thrift`` or ``posts.thrift`` if you reuse their structs) is
    *this package's* module: ``module.common is common_thrift``, and every
    ``<method>_result.thrift_spec`` of its services names the very exception
    classes of :data:`common_thrift`. Loading one of the package's own files
    returns the package's module.

    Why this is needed: thriftpy2 names an included module after its path
    *relative to the including file* (``../../site-packages/auth_rpc/idl/
    common_thrift``) and caches modules by that name, so plain
    ``thriftpy2.load(path, include_dirs=[IDL_DIR])`` of a file outside
    ``IDL_DIR`` parses ``common.thrift`` a second time into new classes. A
    server only sends a declared exception if it is an instance of the very
    class in the method's result struct: an ``Unauthenticated`` of one copy
    raised for a method declaring the other's becomes ``TApplicationException
    (INTERNAL_ERROR)`` for the caller, and a client catching
    ``common_thrift.Unauthenticated`` never sees the other copy's. Here the
    duplicate modules are dropped after parsing: every reference to one of
    their classes in the thrift_spec of the loaded modules' structs,
    exceptions, unions and service argument and result structs (recursively
    through container types) is replaced by the package's class of the same
    name, and so is every module attribute naming a duplicate module.

    thriftpy2 caches the parsed file (by ``module_name``, else by path): the
    module returned is that cached module, completed as above. Raises
    ``thriftpy2.parser.exc.ThriftParserError`` for a file that does not parse
    or an include that is not found.
    """
    own = _package_module_for(Path(path))
    if own is not None and module_name in (None, own.__name__):
        return own
    module: ModuleType = thriftpy2.load(
        os.fspath(path),
        module_name=module_name,
        include_dirs=[*(os.fspath(d) for d in include_dirs), str(IDL_DIR)],
    )
    _share_package_modules(module)
    return module


def _package_module_for(path: Path) -> ModuleType | None:
    """This package's module parsed from ``path`` (the same file), if any."""
    try:
        key = _file_key(path)
    except OSError:
        return None
    for module in _PACKAGE_MODULES:
        if _file_key(Path(module.__thrift_file__)) == key:
            return module
    return None


def _file_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def _share_package_modules(root: ModuleType) -> None:
    """Replace every duplicate of a package module in ``root``'s include tree by the package's."""
    replace_module: dict[int, ModuleType] = {}  # id(duplicate) -> package module
    replace_class: dict[Any, Any] = {}  # duplicate class -> package class
    own_modules: list[ModuleType] = []  # the loaded modules that are neither
    pending = [root]
    seen: set[int] = set()
    while pending:
        module = pending.pop()
        if id(module) in seen or any(module is m for m in _PACKAGE_MODULES):
            continue
        seen.add(id(module))
        thrift_file = getattr(module, "__thrift_file__", None)
        package = _package_module_for(Path(thrift_file)) if thrift_file else None
        if package is not None:
            replace_module[id(module)] = package
            for name, value in vars(module).items():
                if isinstance(value, type):
                    replace_class[value] = getattr(package, name, value)
        else:
            own_modules.append(module)
        pending.extend(_includes(module))
    if not replace_module:
        return

    def swap(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(swap(item) for item in value)
        if isinstance(value, list):
            return [swap(item) for item in value]
        if isinstance(value, type):
            return replace_class.get(value, value)
        return value

    def swap_spec(cls: Any) -> None:
        spec = getattr(cls, "thrift_spec", None)
        if isinstance(spec, dict):
            for fid, entry in spec.items():
                spec[fid] = swap(entry)

    for module in own_modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, ModuleType) and id(value) in replace_module:
                setattr(module, name, replace_module[id(value)])
            elif isinstance(value, type):
                swap_spec(value)
                for method in getattr(value, "thrift_services", ()):
                    swap_spec(getattr(value, f"{method}_args", None))
                    swap_spec(getattr(value, f"{method}_result", None))
        meta = getattr(module, "__thrift_meta__", None)
        if meta is not None and "includes" in meta:
            meta["includes"] = [replace_module.get(id(m), m) for m in meta["includes"]]


def _includes(module: ModuleType) -> list[ModuleType]:
    meta = getattr(module, "__thrift_meta__", None)
    if meta is None:
        return []
    return list(meta.get("includes", ()))
