"""The IDL's ``namespace`` lines: generated code lands in named packages, the wire is unchanged.

- every ``.thrift`` file names its package in each language, by one scheme
  (docs/contract.md, "Generated code");
- Apache Thrift's Python generator puts the code under ``thrift_token_auth``,
  not in top-level ``common``, ``auth`` and ``posts`` packages (the other
  interop tests call our servers with that code, so the bytes are unchanged);
- the Java generated from the three files compiles with ``javac`` against
  Apache Thrift's Java library, together with a class in another package that
  imports it, and that class's binary encodings decode with thriftpy2.

The Java test needs the ``thrift`` compiler, a JDK and Apache Thrift's Java
library (``make tools`` installs all three on Debian as root: thrift-compiler,
default-jdk-headless, libthrift-java); it is skipped, saying what is missing,
elsewhere.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.utils import deserialize

from auth_rpc.idl import IDL_DIR, auth_thrift, common_thrift, posts_thrift

IDL_FILES = ("common", "auth", "posts")

#: The package of ``<file>.thrift`` in each language; ``{}`` is the file's name,
#: ``{Cap}`` the same capitalised.
SCHEME = {
    "java": "io.thrifttokenauth.{}",
    "cpp": "thrift_token_auth.{}",
    "go": "thrifttokenauth.{}",
    "netstd": "ThriftTokenAuth.{Cap}",
    "js": "ThriftTokenAuth.{Cap}",
    "py": "thrift_token_auth.{}",
    "rb": "ThriftTokenAuth.{Cap}",
    "php": "ThriftTokenAuth.{Cap}",
}

#: Where Debian's libthrift-java puts Apache Thrift's Java library.
JAVA_THRIFT_JAR = Path("/usr/share/java/thrift.jar")
#: Its dependencies for compiling generated code (its manifest names them too).
JAVA_EXTRA_JARS = ("slf4j-api.jar", "geronimo-annotation-1.3-spec.jar")

CHECK_JAVA = """\
package io.example;

import io.thrifttokenauth.auth.Auth;
import io.thrifttokenauth.auth.TokenPair;
import io.thrifttokenauth.common.RateLimited;
import io.thrifttokenauth.common.Unauthenticated;
import io.thrifttokenauth.common.Unavailable;
import io.thrifttokenauth.posts.Post;
import io.thrifttokenauth.posts.Posts;
import org.apache.thrift.TException;
import org.apache.thrift.TSerializer;
import org.apache.thrift.protocol.TBinaryProtocol;

/** Code outside the generated packages using them; prints binary encodings as hex. */
public final class Check {
  private Check() {}

  /** javac refuses to catch a checked exception the call cannot throw. */
  static String whoIs(Auth.Iface auth, String token) throws TException {
    try {
      return auth.validate(token).getSubject();
    } catch (Unauthenticated | Unavailable e) {
      return "refused: " + e.getMessage();
    }
  }

  static Class<?>[] clients() {
    return new Class<?>[] {Auth.Client.class, Posts.Client.class, Posts.AsyncClient.class};
  }

  public static void main(String[] args) throws Exception {
    TSerializer binary = new TSerializer(new TBinaryProtocol.Factory());
    TokenPair pair = new TokenPair().setAccess_token("a.b.c").setRefresh_token("r")
        .setToken_type("Bearer").setExpires_in(900L).setScope("posts:read");
    RateLimited limited = new RateLimited().setMessage("slow down").setRetry_after_ms(1500L);
    Post post = new Post().setId(7L).setAuthor("gina").setTitle("Title").setBody("Body")
        .setCreated_at(1L).setUpdated_at(2L);
    for (byte[] encoded : new byte[][] {
        binary.serialize(pair), binary.serialize(limited), binary.serialize(post)}) {
      StringBuilder hex = new StringBuilder();
      for (byte b : encoded) {
        hex.append(String.format("%02x", b));
      }
      System.out.println(hex);
    }
  }
}
"""


def _expected(name: str) -> dict[str, str]:
    return {lang: f.format(name, Cap=name.capitalize()) for lang, f in SCHEME.items()}


@pytest.mark.parametrize("name", IDL_FILES)
def test_every_idl_file_names_its_package_by_the_scheme(name: str) -> None:
    text = (IDL_DIR / f"{name}.thrift").read_text(encoding="utf-8")
    declared = dict(re.findall(r"^namespace\s+(\w+)\s+(\S+)\s*$", text, re.MULTILINE))
    assert declared == _expected(name)


def test_thriftpy2_loads_the_idl_as_before() -> None:
    # thriftpy2 ignores namespaces: the modules keep their names and contents.
    assert auth_thrift.__name__ == "auth_thrift" and posts_thrift.__name__ == "posts_thrift"
    assert auth_thrift.Auth.validate_result.thrift_spec[1][2] is common_thrift.Unauthenticated


def test_python_code_lands_in_the_namespace_package(apache_generated: Path) -> None:
    top = {p.name for p in apache_generated.iterdir()} - {"__init__.py"}
    assert top == {"thrift_token_auth"}, "no top-level common/auth/posts packages"
    for name in IDL_FILES:
        assert (apache_generated / "thrift_token_auth" / name / "ttypes.py").is_file()
    auth = importlib.import_module("thrift_token_auth.auth.Auth")
    common = importlib.import_module("thrift_token_auth.common.ttypes")
    # The generated service refers to the common package by its namespaced name.
    assert auth.validate_result.thrift_spec[1][3][0] is common.Unauthenticated


def _java_tools() -> tuple[str, str, str, list[str]]:
    """The thrift compiler, javac, java and the library classpath; skips naming what is missing."""
    missing = []
    thrift = shutil.which("thrift")
    javac = shutil.which("javac")
    java = shutil.which("java")
    if thrift is None:
        missing.append("the thrift compiler (thrift-compiler)")
    if javac is None or java is None:
        missing.append("a JDK with javac (default-jdk-headless)")
    if not JAVA_THRIFT_JAR.is_file():
        missing.append(f"Apache Thrift's Java library {JAVA_THRIFT_JAR} (libthrift-java)")
    if missing:
        pytest.skip("not installed (make tools): " + "; ".join(missing))
    assert thrift is not None and javac is not None and java is not None
    extra = [JAVA_THRIFT_JAR.parent / jar for jar in JAVA_EXTRA_JARS]
    return thrift, javac, java, [str(JAVA_THRIFT_JAR), *(str(j) for j in extra if j.is_file())]


def _library_version(jar: Path) -> str:
    with zipfile.ZipFile(jar) as archive:
        manifest = archive.read("META-INF/MANIFEST.MF").decode("utf-8", "replace")
    for key in ("Bundle-Version", "Implementation-Version"):
        match = re.search(rf"^{key}:\s*(\S+)", manifest, re.MULTILINE)
        if match:
            return match[1]
    return jar.resolve().name


def _run(args: list[str], what: str, versions: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        pytest.fail(f"{what} failed ({versions}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


@pytest.mark.slow
def test_generated_java_compiles_in_named_packages(tmp_path: Path) -> None:
    thrift, javac, java, classpath = _java_tools()
    compiler_version = subprocess.run(
        [thrift, "-version"], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    library_version = _library_version(JAVA_THRIFT_JAR)
    # Debian 12 ships compiler 0.17.0 and Java library 0.16.0: both are named
    # in every failure message, so a mismatch that breaks the build is plain.
    versions = f"thrift compiler {compiler_version}, Java library {library_version}"

    gen = tmp_path / "gen"
    gen.mkdir()
    for name in IDL_FILES:
        _run(
            [thrift, "--gen", "java", "-out", str(gen), "-I", str(IDL_DIR),
             str(IDL_DIR / f"{name}.thrift")],
            f"thrift --gen java {name}.thrift", versions,
        )
    generated = sorted(gen.rglob("*.java"))
    packages = {p.parent.relative_to(gen).as_posix() for p in generated}
    assert packages == {f"io/thrifttokenauth/{name}" for name in IDL_FILES}
    stamp = re.search(r"Autogenerated by Thrift Compiler \(([^)]+)\)", generated[0].read_text())
    assert stamp is not None and stamp[1] == compiler_version

    check = tmp_path / "src" / "io" / "example" / "Check.java"
    check.parent.mkdir(parents=True)
    check.write_text(CHECK_JAVA, encoding="utf-8")
    classes = tmp_path / "classes"
    _run(
        [javac, "-nowarn", "-encoding", "UTF-8", "-d", str(classes), "-cp", ":".join(classpath),
         *(str(p) for p in generated), str(check)],
        "javac", versions,
    )
    assert (classes / "io" / "thrifttokenauth" / "auth" / "Auth$Client.class").is_file()
    assert (classes / "io" / "example" / "Check.class").is_file()

    # The classes run against the library, and their bytes are our structs' bytes.
    out = _run(
        [java, "-cp", ":".join([str(classes), *classpath]), "io.example.Check"],
        "java io.example.Check", versions,
    )
    pair_hex, limited_hex, post_hex = out.split()
    binary = TBinaryProtocolFactory()
    pair = deserialize(auth_thrift.TokenPair(), bytes.fromhex(pair_hex), binary)
    assert (pair.access_token, pair.token_type, pair.expires_in) == ("a.b.c", "Bearer", 900)
    limited = deserialize(common_thrift.RateLimited(), bytes.fromhex(limited_hex), binary)
    assert (limited.message, limited.retry_after_ms) == ("slow down", 1500)
    post = deserialize(posts_thrift.Post(), bytes.fromhex(post_hex), binary)
    assert (post.id, post.author, post.created_at, post.updated_at) == (7, "gina", 1, 2)
