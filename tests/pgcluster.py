"""Throwaway PostgreSQL clusters for the test suite (stdlib only).

Usage::

    cluster = PgCluster()
    cluster.start()                       # initdb (first time) + pg_ctl start -w
    url = cluster.create_database("t1")   # postgresql+asyncpg://postgres@127.0.0.1:PORT/t1
    ...
    cluster.cleanup()                     # stop + remove the data dir

The server binaries refuse to run as root, so when the current process is root
``initdb``/``pg_ctl`` are run as the ``postgres`` OS user via
``runuser -u postgres -- ...`` (falling back to ``su postgres -s /bin/sh -c ...``),
and the cluster directory is chowned to that user. As a non-root user the
binaries are run directly.

Environment overrides:

* ``BUDGETGATE_PG_BINDIR`` -- directory with ``initdb``/``pg_ctl``/``postgres``.
* ``BUDGETGATE_PG_USER``   -- OS user to run the server as when root (default ``postgres``).
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PgCluster", "find_pg_bindir", "free_port"]

_SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
_DB_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,62}$")


def _has_server_binaries(bindir: str) -> bool:
    return all(os.access(os.path.join(bindir, b), os.X_OK) for b in _SERVER_BINARIES)


def _version_key(path: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin -> (15,) / (9, 6)
    version = Path(path).parent.name
    parts = re.findall(r"\d+", version)
    return tuple(int(p) for p in parts) if parts else (-1,)


def find_pg_bindir() -> str | None:
    """Directory holding the PostgreSQL *server* binaries, or None.

    Order: ``$BUDGETGATE_PG_BINDIR``; the highest ``/usr/lib/postgresql/*/bin``
    (Debian/Ubuntu); the directory of an ``initdb`` on PATH (Fedora, Homebrew, ...).
    """
    env = os.environ.get("BUDGETGATE_PG_BINDIR")
    if env:
        return env if _has_server_binaries(env) else None
    candidates = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if _has_server_binaries(d)]
    if candidates:
        return max(candidates, key=_version_key)
    for name in ("initdb", "pg_ctl"):
        found = shutil.which(name)
        if found:
            d = os.path.dirname(os.path.realpath(found))
            if _has_server_binaries(d):
                return d
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (racy by nature; start() retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """The current environment without libpq/PG* variables that could redirect us."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env.pop("LANGUAGE", None)
    return env


def _tail(path: Path, lines: int = 40, offset: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"<no server log at {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# Clusters not cleaned up by interpreter exit are stopped (immediate) and removed.
_LIVE: set[PgCluster] = set()


@atexit.register
def _cleanup_all() -> None:
    for cluster in list(_LIVE):
        try:
            cluster.cleanup(mode="immediate")
        except Exception:  # best effort at exit
            pass


class PgCluster:
    """A private PostgreSQL cluster on 127.0.0.1:<free port> with trust auth."""

    SUPERUSER = "postgres"
    HOST = "127.0.0.1"

    def __init__(self, base_dir: str | None = None, port: int | None = None) -> None:
        bindir = find_pg_bindir()
        if bindir is None:
            raise RuntimeError(
                "PostgreSQL server binaries not found (looked in $BUDGETGATE_PG_BINDIR, "
                "/usr/lib/postgresql/*/bin and PATH); install the 'postgresql' package"
            )
        self.bindir = bindir
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(self.HOST)

        self._is_root = os.geteuid() == 0
        self.os_user = os.environ.get("BUDGETGATE_PG_USER", "postgres")
        self._uid = self._gid = -1
        if self._is_root:
            import pwd

            try:
                pw = pwd.getpwnam(self.os_user)
            except KeyError as exc:
                raise RuntimeError(
                    f"running as root but OS user {self.os_user!r} does not exist; "
                    "PostgreSQL refuses to run as root (install the 'postgresql' package, "
                    "which creates the user, or set BUDGETGATE_PG_USER)"
                ) from exc
            self._uid, self._gid = pw.pw_uid, pw.pw_gid

        if base_dir is None:
            self._owns_base = True
            self.base_dir = Path(self._make_tempdir())
        else:
            p = Path(base_dir).absolute()
            self._owns_base = not p.exists()
            p.mkdir(parents=True, exist_ok=True)
            self.base_dir = p
        if self._is_root:
            os.chown(self.base_dir, self._uid, self._gid)
            os.chmod(self.base_dir, 0o700)
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir  # short path: unix socket paths max ~107 bytes
        self.log_file = self.base_dir / "server.log"
        self._initialized = (self.data_dir / "PG_VERSION").exists()
        self._removed = False
        self._ever_started = False
        self._server_major: int | None = None
        _LIVE.add(self)

    # ------------------------------------------------------------------ helpers

    def _make_tempdir(self) -> str:
        """mkdtemp in a directory the postgres user can traverse."""
        roots = [tempfile.gettempdir(), "/tmp", "/var/tmp"]
        seen: list[str] = []
        for root in roots:
            if root in seen or not os.path.isdir(root):
                continue
            seen.append(root)
            d = tempfile.mkdtemp(prefix="bg-pg-", dir=root)
            if not self._is_root or self._user_can_traverse(os.path.dirname(d)):
                return d
            os.rmdir(d)
        raise RuntimeError(
            f"no temp directory traversable by OS user {self.os_user!r} (tried {seen})"
        )

    def _user_can_traverse(self, path: str) -> bool:
        """Whether self.os_user can reach ``path`` (every ancestor needs o+x / g+x)."""
        p = Path(path).absolute()
        for d in [p, *p.parents]:
            try:
                st = d.stat()
            except OSError:
                return False
            if st.st_uid == self._uid:
                ok = st.st_mode & 0o100
            elif st.st_gid == self._gid:
                ok = st.st_mode & 0o010
            else:
                ok = st.st_mode & 0o001
            if not ok:
                return False
        return True

    def _as_server_user(self, argv: list[str]) -> list[str]:
        if not self._is_root:
            return argv
        runuser = shutil.which("runuser") or (
            "/usr/sbin/runuser" if os.path.exists("/usr/sbin/runuser") else None
        )
        if runuser:
            return [runuser, "-u", self.os_user, "--", *argv]
        su = shutil.which("su") or "/bin/su"
        return [su, self.os_user, "-s", "/bin/sh", "-c", shlex.join(argv)]

    def _run_server_tool(
        self, tool: str, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = self._as_server_user([os.path.join(self.bindir, tool), *args])
        proc = subprocess.run(
            argv,
            cwd=self.base_dir,  # the server user may not be able to access our cwd
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{tool} failed (exit {proc.returncode}): {shlex.join(argv)}\n"
                f"stdout:\n{proc.stdout.strip()}\nstderr:\n{proc.stderr.strip()}\n"
                f"server log tail ({self.log_file}):\n{_tail(self.log_file)}"
            )
        return proc

    def _psql_path(self) -> str:
        for cand in (os.path.join(self.bindir, "psql"), shutil.which("psql")):
            if cand and os.access(cand, os.X_OK):
                return cand
        raise RuntimeError("psql not found (in the server bindir or on PATH)")

    def psql(self, sql: str, dbname: str = "postgres", timeout: float = 60) -> str:
        """Run ``sql`` through psql over TCP (trust auth, so any OS user works)."""
        argv = [
            self._psql_path(),
            "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", self.HOST, "-p", str(self.port), "-U", self.SUPERUSER, "-d", dbname,
            "-c", sql,
        ]  # fmt: skip
        proc = subprocess.run(
            argv,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"psql failed (exit {proc.returncode}) running {sql!r} on {dbname!r}:\n"
                f"{proc.stderr.strip()}"
            )
        return proc.stdout

    @staticmethod
    def _check_name(name: str) -> str:
        if not _DB_NAME_RE.match(name):
            raise ValueError(f"unsupported database name {name!r}")
        return '"' + name + '"'

    def _accepts_tcp(self) -> bool:
        try:
            with socket.create_connection((self.HOST, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    @property
    def server_major(self) -> int:
        if self._server_major is None:
            try:
                text = (self.data_dir / "PG_VERSION").read_text().strip()
            except OSError:
                text = Path(self.bindir).parent.name
            m = re.match(r"\d+", text)
            self._server_major = int(m.group()) if m else 0
        return self._server_major

    # ------------------------------------------------------------------ lifecycle

    def _initdb(self) -> None:
        if self._initialized:
            return
        t0 = time.monotonic()
        self._run_server_tool(
            "initdb",
            "-D", str(self.data_dir),
            "-U", self.SUPERUSER,
            "-A", "trust",
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",
        )  # fmt: skip
        settings = {
            "listen_addresses": f"'{self.HOST}'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "'128MB'",
            "wal_level": "minimal",
            "max_wal_senders": "0",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "log_line_prefix": "'%m [%p] %d '",
            "timezone": "'UTC'",
        }
        # Appended to postgresql.conf (later entries win) so restarts keep them;
        # the port is passed on the command line because it may change on retry.
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.write("\n# --- budgetgate test cluster ---\n")
            for k, v in settings.items():
                f.write(f"{k} = {v}\n")
        self._initialized = True
        self.initdb_seconds = time.monotonic() - t0

    def is_running(self) -> bool:
        if not self._initialized or self._removed:
            return False
        proc = self._run_server_tool("pg_ctl", "status", "-D", str(self.data_dir), check=False)
        return proc.returncode == 0

    def start(self, timeout: float = 60) -> None:
        """initdb (first call only) and start the server; wait until it accepts connections."""
        if self._removed:
            raise RuntimeError("cluster was cleaned up")
        self._initdb()
        if self.is_running():
            return
        # A busy random port is retried with another one, but only before any URL
        # was handed out (i.e. not on restart).
        attempts = 1 if (self._fixed_port or self._ever_started) else 3
        for attempt in range(attempts):
            t0 = time.monotonic()
            log_offset = _size(self.log_file)
            proc = self._run_server_tool(
                "pg_ctl",
                "start", "-w",
                "-t", str(int(timeout)),
                "-D", str(self.data_dir),
                "-l", str(self.log_file),
                "-o", f"-p {self.port}",
                check=False,
                timeout=timeout + 30,
            )  # fmt: skip
            if proc.returncode == 0:
                deadline = time.monotonic() + timeout
                while not self._accepts_tcp():
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
                else:
                    self.start_seconds = time.monotonic() - t0
                    self._ever_started = True
                    return
            log = _tail(self.log_file, offset=log_offset)
            port_clash = "could not bind" in log or "Address already in use" in log
            if port_clash and attempt + 1 < attempts:
                self._run_server_tool(
                    "pg_ctl", "stop", "-m", "immediate", "-w", "-D", str(self.data_dir),
                    check=False,
                )  # fmt: skip
                self.port = free_port(self.HOST)
                continue
            raise RuntimeError(
                f"PostgreSQL failed to start on {self.HOST}:{self.port} "
                f"(pg_ctl exit {proc.returncode}, bindir {self.bindir}, data {self.data_dir})\n"
                f"pg_ctl stdout:\n{proc.stdout.strip()}\npg_ctl stderr:\n{proc.stderr.strip()}\n"
                f"server log tail ({self.log_file}):\n{log}"
            )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` or ``immediate``; ``smart`` allowed). Idempotent."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"bad stop mode {mode!r}")
        if not self._initialized or self._removed:
            return
        if not (self.data_dir / "postmaster.pid").exists():
            return
        proc = self._run_server_tool(
            "pg_ctl", "stop", "-m", mode, "-w", "-t", "60", "-D", str(self.data_dir),
            check=False,
        )  # fmt: skip
        if proc.returncode != 0 and self.is_running():
            raise RuntimeError(
                f"pg_ctl stop -m {mode} failed (exit {proc.returncode}):\n"
                f"{proc.stdout.strip()}\n{proc.stderr.strip()}\n"
                f"server log tail:\n{_tail(self.log_file)}"
            )

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def cleanup(self, mode: str = "fast") -> None:
        """Stop the server and remove its files. Idempotent."""
        if self._removed:
            return
        try:
            self.stop(mode)
        except RuntimeError:
            self.stop("immediate")
        if self._owns_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        else:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            for leftover in (self.log_file, *self.base_dir.glob(".s.PGSQL.*")):
                try:
                    leftover.unlink()
                except OSError:
                    pass
        self._removed = True
        _LIVE.discard(self)

    def __enter__(self) -> PgCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # ------------------------------------------------------------------ databases

    def url(self, name: str, driver: str = "asyncpg") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.SUPERUSER}@{self.HOST}:{self.port}/{name}"

    def dsn(self, name: str) -> str:
        """Plain libpq/asyncpg DSN (``postgresql://...``)."""
        return self.url(name, driver="")

    def create_database(self, name: str) -> str:
        self.psql(f"CREATE DATABASE {self._check_name(name)} TEMPLATE template0")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        quoted = self._check_name(name)
        if self.server_major >= 13:
            self.psql(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
        else:
            literal = "'" + name + "'"
            self.psql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = {literal} AND pid <> pg_backend_pid()"
            )
            self.psql(f"DROP DATABASE IF EXISTS {quoted}")

    def __repr__(self) -> str:
        return f"PgCluster(port={self.port}, data_dir={str(self.data_dir)!r})"
