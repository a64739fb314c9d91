"""A throwaway PostgreSQL server for tests and benchmarks.

`PgServer` runs `initdb` and `pg_ctl` from the machine's PostgreSQL binaries
in a temporary directory, on a free TCP port of 127.0.0.1 (its unix socket
lives in the same directory), with trust authentication, and removes
everything on `stop()`. PostgreSQL refuses to run as root, so under root the
binaries run as the `postgres` system user (`runuser`) and the directory is
handed to that user.

    with PgServer() as server:
        url = server.url()          # postgresql://postgres@127.0.0.1:PORT/postgres
        server.restart()            # pg_ctl restart -m fast (same port, same data)
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["PgServer", "PgServerUnavailable", "find_bin_dir"]

#: Settings for a fast throwaway server: its data is worthless after the run.
FAST = {"fsync": "off", "full_page_writes": "off", "synchronous_commit": "on"}


class PgServerUnavailable(RuntimeError):
    """No PostgreSQL server can be started here (the reason says why)."""


def find_bin_dir() -> Path | None:
    """The directory holding `initdb`/`pg_ctl`: `$TIDINGS_PG_BIN`, PATH, or Debian's layout."""
    env = os.environ.get("TIDINGS_PG_BIN")
    if env:
        return Path(env)
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
    )
    return Path(found[-1]) if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One PostgreSQL cluster in a temp dir; `start()`, `url()`, `restart()`, `stop()`."""

    def __init__(
        self,
        bin_dir: Path | str | None = None,
        *,
        settings: dict[str, str] | None = None,
        max_connections: int = 300,
    ) -> None:
        found = Path(bin_dir) if bin_dir is not None else find_bin_dir()
        if found is None or not (found / "initdb").exists() or not (found / "pg_ctl").exists():
            raise PgServerUnavailable(
                "no PostgreSQL server binaries (initdb, pg_ctl) found; install the "
                "postgresql package, set TIDINGS_PG_BIN to their directory, or point "
                "TIDINGS_TEST_POSTGRES_URL at a server"
            )
        self.bin_dir = found
        self.settings = {"max_connections": str(max_connections), **(settings or {})}
        self.port = 0
        self.dir: Path | None = None
        self._user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PgServerUnavailable(
                    "running as root and there is no 'postgres' system user to run the "
                    "server as (PostgreSQL refuses root); create one or run the tests as "
                    "another user"
                ) from None
            if shutil.which("runuser") is None:
                raise PgServerUnavailable("running as root but 'runuser' is not available")
            self._user = "postgres"

    # paths ------------------------------------------------------------------------
    @property
    def data(self) -> Path:
        assert self.dir is not None, "server not started"
        return self.dir / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.dir is not None, "server not started"
        return self.dir / "sock"

    @property
    def log(self) -> Path:
        assert self.dir is not None, "server not started"
        return self.dir / "server.log"

    def url(self, database: str = "postgres") -> str:
        """A URL to `database` over TCP (trust authentication, user `postgres`)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    # running the binaries -----------------------------------------------------------
    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self._user is not None:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=self.dir, check=False)
        if proc.returncode != 0:
            tail = ""
            with contextlib.suppress(OSError, AssertionError):
                tail = self.log.read_text()[-2000:]
            raise PgServerUnavailable(
                f"{' '.join(args[:2])} failed ({proc.returncode}): "
                f"{proc.stderr.strip() or proc.stdout.strip()}\n{tail}"
            )
        return proc

    def _options(self) -> str:
        opts = [f"-p {self.port}", "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.socket_dir}"]
        opts += [f"-c {k}={v}" for k, v in self.settings.items()]
        return " ".join(opts)

    # lifecycle ------------------------------------------------------------------------
    def start(self) -> str:
        """Create the cluster and start it; returns `url()`."""
        self.dir = Path(tempfile.mkdtemp(prefix="tidings-pg-"))
        self.socket_dir.mkdir()
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            for p in (self.dir, self.socket_dir):
                os.chown(p, entry.pw_uid, entry.pw_gid)
        try:
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "--encoding=UTF8", "--no-sync", "-N")
            self._launch()
        except BaseException:
            self._remove()
            raise
        return self.url()

    def _launch(self) -> None:
        last: PgServerUnavailable | None = None
        for _ in range(5):  # a free port can be taken between choosing it and binding it
            self.port = _free_port()
            try:
                self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log),
                          "-w", "-t", "60", "-o", self._options())
                return
            except PgServerUnavailable as exc:
                last = exc
                if "could not bind" not in str(exc) and "already in use" not in str(exc):
                    raise
        assert last is not None
        raise last

    def restart(self, mode: str = "fast") -> None:
        """Restart on the same port and data (`pg_ctl restart -m fast`): connections drop."""
        self._run("pg_ctl", "restart", "-D", str(self.data), "-m", mode, "-w", "-t", "60",
                  "-l", str(self.log), "-o", self._options())

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server but keep its data (`start_server()` brings it back)."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60")

    def start_server(self) -> None:
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", "60", "-o", self._options())

    def stop(self) -> None:
        """Stop the server (immediately: its data is thrown away) and remove the directory."""
        if self.dir is None:
            return
        with contextlib.suppress(PgServerUnavailable, subprocess.TimeoutExpired):
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")
        self._remove()

    def _remove(self) -> None:
        if self.dir is not None:
            # give a dying postmaster a moment to let go of its files
            for _ in range(20):
                shutil.rmtree(self.dir, ignore_errors=True)
                if not self.dir.exists():
                    break
                time.sleep(0.1)
            self.dir = None

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
