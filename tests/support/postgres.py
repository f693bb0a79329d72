"""A real, throw-away PostgreSQL server for tests (Debian's postgresql binaries).

    with start_postgres() as pg:
        dsn = pg.create_database()      # a fresh, empty database per test
        pg.stop(); pg.start()           # simulate an outage (same port, same data)

Runs as the `postgres` OS user when the tests run as root (initdb and pg_ctl refuse root).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SUPERUSER = "warden"
DATABASE = "warden"
INSTALL_HINT = "apt-get install postgresql"
START_TIMEOUT = 30  # seconds; pg_ctl start -w waits for the server to accept connections


def find_bindir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl (or PG_BINDIR)."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    for cand in filter(None, candidates):
        bindir = Path(cand)
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    pytest.fail(
        "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin: "
        f"the PostgreSQL store tests need a real server; run `{INSTALL_HINT}` "
        "(or set PG_BINDIR)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    """One running cluster on 127.0.0.1:`port`, trust auth, superuser `warden`."""

    bindir: Path
    root: Path  # temp dir holding data/, the socket and the log
    port: int
    run_as: str | None  # OS user to run server commands as (None: the current user)
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def dsn(self) -> str:
        """The DSN of the default `warden` database."""
        return self.dsn_for(DATABASE)

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if check and proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()}\n{log}"
            )
        return proc

    def initdb(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",  # test data: skip fsync for speed
        )

    def start(self) -> None:
        """Start (or restart after stop()) the server; returns once it accepts connections."""
        # fsync=off is safe here: stop() kills processes, not the OS, so written data stays in
        # the page cache. synchronous_commit must stay on, or an immediate stop loses commits.
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200"
        )
        self._run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            str(START_TIMEOUT),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
        )

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server (default: immediate, like a crash); existing connections drop."""
        self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.data), check=False)

    @property
    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.data), check=False).returncode == 0

    def psql(self, sql: str, database: str = DATABASE) -> str:
        """Run one SQL command as the superuser over TCP; returns unaligned output."""
        proc = self._run(
            "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "-d",
            database,
            "-c",
            sql,
        )
        return proc.stdout.strip()

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (default: a new unique name) and return its DSN."""
        name = name or f"t{os.getpid()}_{next(self._names)}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)

    def cleanup(self) -> None:
        """Stop the server (immediately) and delete its directory."""
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _server_user() -> str | None:
    """initdb/pg_ctl refuse to run as root: run them as `postgres` (Debian's package user)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    pytest.fail(f"running as root and no `postgres` user exists; run `{INSTALL_HINT}`")


@contextlib.contextmanager
def start_postgres() -> Iterator[PostgresServer]:
    """Init and start a temporary cluster with a `warden` database; stop and delete it after."""
    bindir = find_bindir()
    run_as = _server_user()
    # Not pytest's tmp_path: its parents are mode 0700 root, which `postgres` cannot enter.
    root = Path(tempfile.mkdtemp(prefix="warden-pg-"))
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    os.chmod(root, 0o700)
    server = PostgresServer(bindir=bindir, root=root, port=_free_port(), run_as=run_as)
    try:
        server.initdb()
        server.start()
        server.psql(f'CREATE DATABASE "{DATABASE}"', database="postgres")
        yield server
    finally:
        server.cleanup()
