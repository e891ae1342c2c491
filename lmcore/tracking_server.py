"""A team's tracking server on one machine: PostgreSQL and ``mlflow server``, as real processes.

``lmcore tracking-server`` (:func:`serve`) starts, in ``tracking.server.data``:

1. PostgreSQL (unless ``backend_store_uri`` names an existing database): the binaries of the
   PyPI package ``pgserver`` (``pip install 'lmcore[server]'``), else the system's (Debian's
   ``postgresql``). ``initdb`` once, then ``pg_ctl start`` listening on 127.0.0.1 only, with a
   database ``mlflow`` owned by the role ``lmcore`` (trust authentication: only local processes
   reach it). PostgreSQL refuses to run as root; under root it runs as the user ``nobody``.
2. ``mlflow server`` on ``host:port`` with that database as its backend store and the artifacts
   proxied through it to ``artifacts_destination`` (clients upload over HTTP and need no access to
   the store themselves).

It returns when the MLflow server exits or on SIGTERM/SIGINT (one signal), and stops both
servers. A second start reuses the database: the runs survive restarts.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from lmcore.config import TrackingServerConfig
from lmcore.core.errors import StageError

ROLE = "lmcore"
DATABASE = "mlflow"
UNPRIVILEGED = "nobody"


def postgres_bin() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``: pgserver's bundled PostgreSQL, else one on
    PATH, else Debian's ``/usr/lib/postgresql/<version>/bin`` (the newest)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "pginstall" / "bin"
        if (bundled / "pg_ctl").exists():
            return bundled
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name)
                    if p.parent.parent.name.isdigit() else 0)
    if debian:
        return debian[-1].parent
    raise StageError("no PostgreSQL found: pip install 'lmcore[server]' (the pgserver package ships it), or "
                     "apt-get install postgresql, or set tracking.server.backend_store_uri to an existing database")


def port_is_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound on ``host``; a host that is not an IPv4 address or name of
    this machine is a :class:`StageError` (not reported as a busy port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except socket.gaierror as e:
            raise StageError(f"host {host!r} (tracking.server.host): not an IPv4 address or a name this machine "
                             f"resolves ({e.strerror})") from None
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise StageError(f"host {host!r} (tracking.server.host): not an address of this machine") from None
            return False
    return True


def _traversable_by(path: Path, user: pwd.struct_passwd) -> Path | None:
    """The first folder above ``path`` that ``user`` cannot enter, or None."""
    for p in [*reversed(path.parents)]:
        st = p.stat()
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == user.pw_gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return p
    return None


class Postgres:
    """One PostgreSQL cluster in ``folder/postgres``, logging to ``folder/postgres.log``."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.pgdata = folder / "postgres"
        self.log = folder / "postgres.log"
        self.bin = postgres_bin()
        self.user = pwd.getpwnam(UNPRIVILEGED) if os.geteuid() == 0 else None
        copied = folder / "pgcopy" / self.bin.parent.parent.name / self.bin.parent.name / "bin"
        if self.user and (copied / "pg_ctl").exists():  # made by an earlier start (see _prepare_folder)
            self.bin = copied

    @property
    def uri(self) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []} if self.user else {}
        return subprocess.run([str(self.bin / args[0]), *args[1:]], capture_output=True, text=True, check=check,
                              timeout=timeout, cwd=self.folder, **kwargs)

    def _prepare_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        self.log.touch()
        if self.user:
            blocked = _traversable_by(self.pgdata, self.user)
            if blocked is not None:
                raise StageError(f"PostgreSQL does not run as root, so it runs as '{UNPRIVILEGED}', who cannot enter "
                                 f"{blocked} (mode {stat.filemode(blocked.stat().st_mode)}): put "
                                 f"tracking.server.data in a folder others may traverse, or run as another user")
            for p in (self.pgdata, self.log):
                os.chown(p, self.user.pw_uid, self.user.pw_gid)
            if _traversable_by(self.bin / "initdb", self.user) is not None:
                # the binaries sit where 'nobody' cannot go (a venv in a private folder): a copy
                # of the installation (bin, lib, share; ~34 MB) beside the data, made once
                install = self.bin.parent  # .../pgserver/pginstall; its rpath names ../../../pgserver.libs
                copy = self.folder / "pgcopy"
                local = copy / install.parent.name / install.name
                if not (local / "bin" / "pg_ctl").exists():
                    shutil.copytree(install, local, ignore=shutil.ignore_patterns("include"), dirs_exist_ok=True)
                    libs = install.parent.parent / f"{install.parent.name}.libs"
                    if libs.is_dir():
                        shutil.copytree(libs, copy / libs.name, dirs_exist_ok=True)
                self.bin = local / "bin"

    def running(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists() and self._run("pg_ctl", "-D", str(self.pgdata), "status",
                                                                   check=False).returncode == 0

    def start(self) -> None:
        try:
            self._start()
        except OSError as e:
            raise StageError(f"PostgreSQL could not start in {self.folder}: {e}") from e

    def _start(self) -> None:
        self._prepare_folder()
        if not (self.pgdata / "PG_VERSION").exists():
            out = self._run("initdb", "-D", str(self.pgdata), "-U", ROLE, "--auth=trust", "-E", "UTF8",
                            "--no-instructions", check=False)
            if out.returncode != 0:
                raise StageError(f"initdb failed in {self.pgdata}: {out.stderr.strip()[-500:]}")
        if self.running():  # left by a start that did not stop it (killed): use it
            self._ensure_database()
            return
        if not port_is_free("127.0.0.1", self.port):
            raise StageError(f"port {self.port} on 127.0.0.1 is in use (tracking.server.postgres_port): choose another")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories=''"
        out = self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(self.log), "-w", "-t", "60", "-o", options,
                        "start", check=False)
        if out.returncode != 0:
            raise StageError(f"PostgreSQL did not start (log: {self.log}): {self.log.read_text()[-800:].strip()}")
        try:
            self._ensure_database()
        except BaseException:  # the server this call started does not outlive it
            self.stop()
            raise

    def _ensure_database(self) -> None:
        try:
            import psycopg2  # lazy: an optional dependency (lmcore[server]), needed by this command only
        except ImportError:
            raise StageError("the tracking server's PostgreSQL needs psycopg2: pip install 'lmcore[server]'") from None

        try:
            conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=ROLE, dbname="postgres")
        except psycopg2.Error as e:
            raise StageError(f"PostgreSQL at 127.0.0.1:{self.port} refused the connection "
                             f"({' '.join(str(e).split())[:300]}; log: {self.log})") from None
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
        finally:
            conn.close()

    def stop(self) -> None:
        if self.running():
            self._run("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "stop", check=False)


def ui_origins(cfg: TrackingServerConfig) -> list[str]:
    """The pages beyond localhost a team's browsers load the MLflow UI from: the machine's own
    addresses where the server listens on them, and each of ``allowed_hosts`` (directly, or
    behind a proxy on 80 or 443). MLflow refuses the UI's state-changing requests (its run
    search is a POST) from any other origin than localhost unless ``--cors-allowed-origins``
    names it, so a colleague at http://10.0.0.5:5000 saw no runs. No wildcard: a pattern like
    ``http://10.*`` also matches a site named 10.evil.example."""
    families = {"0.0.0.0": (socket.AF_INET,), "::": (socket.AF_INET, socket.AF_INET6)}.get(cfg.host)
    if families:
        addresses = sorted({a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
                            if a.family in families and not a.address.startswith(("127.", "::1", "fe80:"))})
    else:
        addresses = [] if cfg.host in ("127.0.0.1", "localhost", "::1") else [cfg.host]
    # an IPv6 address is written in brackets in a URL (the browser's Origin: http://[fd00::2]:5000)
    origins = [f"http://{f'[{a}]' if ':' in a else a}:{cfg.port}" for a in addresses]
    for name in cfg.allowed_hosts:
        origins += [f"http://{name}:{cfg.port}", f"http://{name}", f"https://{name}"]
    return list(dict.fromkeys(origins))


def mlflow_command(cfg: TrackingServerConfig, backend_uri: str, artifacts: str) -> list[str]:
    hosts = []
    if cfg.allowed_hosts:  # MLflow's list replaces its defaults (localhost, private IPs): keep them
        from mlflow.server.security_utils import get_default_allowed_hosts  # lazy: this command only

        names = [h for name in cfg.allowed_hosts for h in (name, f"{name}:*")]
        hosts = ["--allowed-hosts", ",".join([*get_default_allowed_hosts(), *names])]
    origins = ui_origins(cfg)
    if origins:
        hosts += ["--cors-allowed-origins", ",".join(origins)]
    return [sys.executable, "-m", "mlflow", "server", "--host", cfg.host, "--port", str(cfg.port),
            "--workers", str(cfg.workers), "--backend-store-uri", backend_uri,
            "--serve-artifacts", "--artifacts-destination", artifacts, *hosts]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path,
                 stop: threading.Event | None = None) -> bool:
    """Wait until the server at ``url`` answers its health check (True), or ``stop`` is set
    (False: a SIGTERM or Ctrl-C during the start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        if proc.poll() is not None:
            raise StageError(f"mlflow server exited with status {proc.returncode} (log: {log}): "
                             f"{log.read_text()[-800:].strip()}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        time.sleep(0.3)
    if stop is not None and stop.is_set():
        return False
    raise StageError(f"mlflow server did not answer at {url}/health within {timeout:.0f} s (log: {log})")


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _terminate(proc: subprocess.Popen, grace: float = 15) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def serve(cfg: TrackingServerConfig, root: Path, say: Callable[[str], None] = print) -> int:
    """Start PostgreSQL (unless ``cfg.backend_store_uri``) and ``mlflow server``; block until the
    MLflow server exits or a SIGTERM/SIGINT arrives; stop both. Returns the exit status (0 after
    a signal)."""
    folder = (root / cfg.data).resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where the folder should be, no permission
        raise StageError(f"tracking.server.data = {cfg.data!r}: {folder} cannot be the server's folder "
                         f"({e.strerror or e})") from None
    reach = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{f'[{reach}]' if ':' in reach else reach}:{cfg.port}"  # an IPv6 address in brackets
    if not port_is_free(cfg.host, cfg.port):
        raise StageError(f"port {cfg.port} on {cfg.host} is in use (tracking.server.port): another server runs "
                         f"there, or choose another port")
    artifacts = cfg.artifacts_destination or str(folder / "artifacts")
    if "://" not in artifacts:  # a folder: relative to the project folder, as tracking.server.data
        artifacts = str((root / artifacts).resolve())
    log = folder / "mlflow.log"
    with _stop_on_signals() as stop:
        postgres = None
        if cfg.backend_store_uri:
            backend = cfg.backend_store_uri
        else:
            postgres = Postgres(folder, cfg.postgres_port)
            postgres.start()
            backend = postgres.uri
            say(f"PostgreSQL at 127.0.0.1:{cfg.postgres_port} (data {postgres.pgdata}, log {postgres.log})")
        proc = None
        try:
            if stop.is_set():  # a signal while PostgreSQL started
                return 0
            env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
            with open(log, "ab") as out:
                proc = subprocess.Popen(mlflow_command(cfg, backend, artifacts), stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            if not wait_healthy(url, proc, 120, log, stop):  # stopped while it started
                return 0
            say(f"MLflow tracking server at {url} (backend {backend}, artifacts {artifacts}, log {log})")
            say(f"log to it with tracking.tracking_uri: {url}; one SIGTERM or Ctrl-C stops both servers")
            while not stop.is_set() and proc.poll() is None:
                stop.wait(0.5)
            if proc.poll() is not None and not stop.is_set():
                say(f"mlflow server exited with status {proc.returncode} (log: {log})")
                return 1
            return 0
        finally:
            if proc is not None:
                _terminate(proc)
            if postgres is not None:
                postgres.stop()
            say("tracking server stopped")
