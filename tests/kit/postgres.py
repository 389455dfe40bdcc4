"""A throwaway PostgreSQL server for tests that must prove the state store works on Postgres by URL.

:func:`temporary_postgres` runs ``initdb`` into a fresh directory and starts ``postgres`` on a free
127.0.0.1 port with trust authentication, yields its SQLAlchemy URL
(``postgresql+psycopg://ats@127.0.0.1:PORT/postgres``) and stops it (``pg_ctl stop -m immediate``)
afterwards. The server binaries are found on ``PATH`` or under ``/usr/lib/postgresql/*/bin``
(Debian's ``postgresql`` package, which ``.ci/run`` installs); ``initdb`` refuses to run as root,
so as root the server runs as the ``postgres`` system user (created by that package).

``ATS_TEST_POSTGRES_URL`` in the environment names an existing server instead (nothing is
started). :data:`POSTGRES_UNAVAILABLE` says why no server can be had (None when one can), for
``pytest.mark.skipif``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

ENV_URL = "ATS_TEST_POSTGRES_URL"


def _bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


def _unavailable() -> str | None:
    if os.environ.get(ENV_URL):
        return None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[dev]')"
    if _bin_dir() is None:
        return "no PostgreSQL server binaries (apt-get install postgresql) and no $" + ENV_URL
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: initdb cannot run"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no 'postgres' system user to run the server as"
    return None


POSTGRES_UNAVAILABLE: str | None = _unavailable()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(args: list[str], *, as_postgres: bool) -> None:
    cmd = ["runuser", "-u", "postgres", "--", *args] if as_postgres else args
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr[-2000:]}")


@contextlib.contextmanager
def temporary_postgres() -> Iterator[str]:
    """Yield the SQLAlchemy URL of a PostgreSQL server that lives for the ``with`` block.

    Raises
    ------
    RuntimeError
        No server can be had (:data:`POSTGRES_UNAVAILABLE`), or ``initdb`` / ``pg_ctl`` failed
        (their stderr is in the message).
    """
    if os.environ.get(ENV_URL):
        yield os.environ[ENV_URL]
        return
    if POSTGRES_UNAVAILABLE is not None:
        raise RuntimeError(POSTGRES_UNAVAILABLE)
    bin_dir = _bin_dir()
    assert bin_dir is not None
    as_postgres = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="ats-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if as_postgres:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    port = _free_port()
    try:
        _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "ats", "--auth=trust", "-E", "UTF8", "--no-sync"],
             as_postgres=as_postgres)
        opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "server.log"), "-w", "start"],
             as_postgres=as_postgres)
        try:
            yield f"postgresql+psycopg://ats@127.0.0.1:{port}/postgres"
        finally:
            _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], as_postgres=as_postgres)
    finally:
        shutil.rmtree(root, ignore_errors=True)
