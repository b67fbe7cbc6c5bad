"""Private Redis and PostgreSQL instances for fault tests.

Fault tests stop, kill and restart servers. They must do it to instances of their own, never to
the shared servers every other test uses: each instance here listens on a free port chosen by the
kernel and keeps its state in a temporary directory, and every stop acts on that instance's own
process or data directory, never on a port or a name.

PostgreSQL refuses to run as root, so when the tests run as root its commands run as the
`postgres` user (which then owns the data directory).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path))


def find_binary(name: str) -> str:
    """A server binary: on PATH, else in Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        # Not resolved: Debian's redis-server is a symlink whose name selects the program.
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=_version_key)
    if candidates:
        return candidates[-1]
    raise RuntimeError(f"{name} not found; `scripts/services.sh up` installs it")


@functools.cache
def postgres_bindir() -> Path:
    """The directory holding initdb and pg_ctl of one PostgreSQL version."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version_key)
    pg_ctl = candidates[-1] if candidates else os.path.realpath(find_binary("pg_ctl"))
    return Path(pg_ctl).parent


def _port_answers(port: int, probe: bytes | None = None, expect: bytes = b"") -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            if probe is None:
                return True
            s.sendall(probe)
            return s.recv(64).startswith(expect)
    except OSError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Started:
    """A test server as a context manager: started on entry, closed (and cleaned up) on exit."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PrivateRedis(Started):
    """A redis-server child process on a free port.

    `stop()` shuts it down cleanly, `kill()` with SIGKILL; `start()` brings it back on the same
    port: empty by default, with every acknowledged write when `persistent` (an append-only
    file synced at each write, as a production Redis that must not lose a turn would run).
    """

    def __init__(self, port: int | None = None, *, persistent: bool = False) -> None:
        self.port = port if port is not None else free_port()
        self.persistent = persistent
        self.dir = Path(tempfile.mkdtemp(prefix="private-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        log = self.dir / "redis.log"
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",
            "appendonly": "yes" if self.persistent else "no",
            "appendfsync": "always",
            "daemonize": "no",
            "dir": str(self.dir),
            "logfile": str(log),
        }
        argv = [find_binary("redis-server")]
        for name, value in options.items():
            argv += [f"--{name}", value]
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if _port_answers(self.port, b"PING\r\n", b"+PONG"):
                if self._proc.poll() is None:
                    return
                break  # someone else answered on our port, and our server died
            if self._proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{_tail(log)}")

    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """A clean shutdown (SIGTERM)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """A crash (SIGKILL)."""
        self._end(signal.SIGKILL)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _as_postgres(argv: list[str]) -> list[str]:
    """argv run as the postgres user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return argv
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--", *argv]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(map(_quote, argv))]


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def _run_pg(argv: list[str], timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _as_postgres(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd="/",  # the postgres user may not be allowed into the current directory
        check=False,
    )


def _owned_by_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def _private_tempdir(prefix: str) -> Path:
    """A fresh directory the postgres user can reach (the default temp dir may be private)."""
    for base in (tempfile.gettempdir(), "/tmp", "/var/tmp"):
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        _owned_by_postgres(path)
        if os.geteuid() != 0 or _run_pg(["test", "-w", str(path)]).returncode == 0:
            return path
        shutil.rmtree(path, ignore_errors=True)
    raise RuntimeError("no temporary directory is writable by the postgres user")


@functools.cache
def _template_cluster() -> Path:
    """A cluster initialised once per test process; each instance starts from a copy."""
    root = _private_tempdir("private-pg-template-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    data = root / "data"
    done = _run_pg(
        [
            str(postgres_bindir() / "initdb"),
            f"--pgdata={data}",
            "--username=postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        ],
    )
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
    return data


class PrivatePostgres(Started):
    """A PostgreSQL cluster of its own, on a free port, with trust authentication.

    `stop()` is a fast (clean) shutdown, `kill()` an immediate one (as after a crash: recovery
    runs at the next start); `start()` brings it back on the same port with the same data.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self.dir = _private_tempdir("private-pg-")
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "run"
        self.log = self.dir / "postgres.log"
        self._initialised = False

    @property
    def url(self) -> str:
        """The URL in SQLAlchemy's form, as CONSOLIDATOR_DATABASE_URL takes it."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def dsn(self) -> str:
        """The URL in libpq's form, for asyncpg.connect and psql."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run_pg([str(postgres_bindir() / "pg_ctl"), "-D", str(self.data), *args])

    def _initialise(self) -> None:
        copied = _run_pg(["cp", "-a", str(_template_cluster()), str(self.data)])
        if copied.returncode != 0:
            raise RuntimeError(f"copying the template cluster failed: {copied.stderr}")
        _run_pg(["mkdir", "-p", str(self.socket_dir)])
        settings = (
            f"\nport = {self.port}\n"
            "listen_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{self.socket_dir}'\n"
            "fsync = off\n"
            "full_page_writes = off\n"
        )
        # Appending keeps the file's owner (postgres) even when we are root.
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(settings)
        self._initialised = True

    @property
    def running(self) -> bool:
        return self._initialised and self._pg_ctl("status").returncode == 0

    def start(self) -> None:
        if not self._initialised:
            self._initialise()
        if self.running:
            return
        started = self._pg_ctl("-l", str(self.log), "-w", "-t", str(int(START_TIMEOUT_S)), "start")
        if started.returncode != 0 or not _port_answers(self.port):
            raise RuntimeError(
                f"PostgreSQL on port {self.port} did not start:\n{started.stderr}\n"
                f"{self._read_log()}"
            )

    def _read_log(self) -> str:
        # The log belongs to postgres and is private to it.
        shown = _run_pg(["tail", "-n", "20", str(self.log)])
        return shown.stdout or _tail(self.log)

    def _stop(self, mode: str) -> None:
        if not self.running:
            return
        stopped = self._pg_ctl("-m", mode, "-w", "-t", str(int(STOP_TIMEOUT_S)), "stop")
        if stopped.returncode != 0:
            raise RuntimeError(f"PostgreSQL on port {self.port} did not stop: {stopped.stderr}")

    def stop(self) -> None:
        """A clean shutdown (fast mode: open sessions are disconnected)."""
        self._stop("fast")

    def kill(self) -> None:
        """A crash: immediate shutdown, the next start runs recovery."""
        self._stop("immediate")

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
