"""Test kit for the fleet's central store: a real PostgreSQL server, and a real pgbouncer before it.

initdb and postgres refuse to run as root, so both run as the `postgres` user (setpriv execs in
place: the Popen's pid is the server's own, and signals reach it). Their folder is made with
tempfile outside pytest's (which only root may enter), handed to that user, and removed at the
end. The server listens on a free port of 127.0.0.1 and on a socket in that folder; local socket
connections are trusted (the kit's superuser), TCP ones need a password (the roles under test).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from gatekit import free_port, wait_for_port

USER = "postgres"


def _bin(name: str) -> str:
    """A server program of the newest PostgreSQL installed (Debian keeps them per major version)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/%s" % name), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run tests/system-deps.sh")
    return found[-1]


def _as_postgres() -> list[str]:
    return ["setpriv", "--reuid=%s" % USER, "--regid=%s" % USER, "--init-groups", "--"]


def _owned_folder(prefix: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    account = pwd.getpwnam(USER)
    os.chown(folder, account.pw_uid, account.pw_gid)
    return folder


@dataclass
class Postgres:
    root: Path
    port: int
    process: subprocess.Popen | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.root / "postgres.log"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def dsn(self, user: str = USER, password: str | None = None, dbname: str = "icpgate", *,
            port: int | None = None) -> str:  # fmt: skip
        """A key/value DSN: TCP with a password for a role, the socket for the kit's superuser."""
        if password is None:
            return "host=%s port=%d user=%s dbname=%s" % (self.root, self.port, user, dbname)
        return "host=127.0.0.1 port=%d user=%s password=%s dbname=%s connect_timeout=5" % (
            port or self.port, user, password, dbname)  # fmt: skip

    def execute(self, sql: str, params: tuple = (), dbname: str = "icpgate") -> list[tuple]:
        """Run one statement as the superuser; the rows it returns (none for DDL)."""
        with psycopg.connect(self.dsn(dbname=dbname), autocommit=True) as connection:
            cursor = connection.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def start(self) -> None:
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [*_as_postgres(), _bin("postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=%s" % self.root,
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=60", "-c", "shared_buffers=16MB"],
            stdout=log, stderr=log,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(psycopg.OperationalError):
                psycopg.connect(self.dsn(dbname="postgres"), connect_timeout=2).close()
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("PostgreSQL did not start:\n" + self.log_path.read_text())
            time.sleep(0.1)

    def stop(self) -> None:
        """A fast shutdown (SIGINT): open sessions are cut, as when the centre goes away."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(2)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> Postgres:
    """initdb into a new folder and start the server, with an `icpgate` database."""
    root = _owned_folder("icpgate-pg-")
    server = Postgres(root, free_port())
    try:
        subprocess.run(
            [*_as_postgres(), _bin("initdb"), "-D", str(server.data), "-U", USER, "--auth-local=trust",
             "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        server.start()
        server.execute("CREATE DATABASE icpgate", dbname="postgres")
    except BaseException:
        server.close()
        raise
    return server


@dataclass
class PgBouncer:
    """pgbouncer in transaction pooling mode: each transaction may run on another server session."""

    root: Path
    port: int
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def start_pgbouncer(server: Postgres, users: dict[str, str]) -> PgBouncer:
    """pgbouncer before `server`'s icpgate database, for the roles in `users` (name: password)."""
    root = _owned_folder("icpgate-pgbouncer-")
    port = free_port()
    (root / "users.txt").write_text("".join('"%s" "%s"\n' % item for item in users.items()))
    (root / "pgbouncer.ini").write_text(
        "[databases]\nicpgate = host=127.0.0.1 port=%d dbname=icpgate\n"
        "[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = %d\nunix_socket_dir =\n"
        "auth_type = scram-sha-256\nauth_file = %s\npool_mode = transaction\n"
        "default_pool_size = 2\nserver_reset_query =\nlogfile = %s\n"
        % (server.port, port, root / "users.txt", root / "pgbouncer.log")
    )  # fmt: skip
    for path in root.iterdir():
        os.chown(path, pwd.getpwnam(USER).pw_uid, -1)
    process = subprocess.Popen([*_as_postgres(), "/usr/sbin/pgbouncer", str(root / "pgbouncer.ini")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    bouncer = PgBouncer(root, port, process)
    try:
        wait_for_port(port, timeout=15, process=process)
    except BaseException:
        bouncer.stop()
        raise
    return bouncer
