"""A dynastudy cluster on one machine: PostgreSQL, an MLflow tracking server, a Ray head and Ray worker nodes, each
Ray node on a loopback address of its own, all started under one folder and stopped by PID. Linux only.

It runs the topology of a real cluster without Docker (`scripts/local-cluster.py`, tests/test_cluster.py): the
head offers no CPU, so trials run on the worker nodes; they log to the MLflow server over HTTP (PostgreSQL
behind it, artifacts served by it), and Optuna keeps its study in PostgreSQL.

Processes. Every service starts in a session of its own (`setsid`); a Ray node is one `ray start --block`, whose
GCS, raylet, agents and reaper, and the raylet's worker processes, all live in that session. A service's processes
are therefore its session plus any descendant that opened a session of its own, read from /proc just before each
signal. Each PID is kept with its start time, so a PID the kernel has given to another process is never
signalled, and only processes this object started are touched (`ray stop`, which kills by name, is never used).

Folder layout:
  cluster.json   addresses, URLs and each service's leader PID (`stop_recorded` stops a cluster left running)
  ray-token      Ray's authentication token: token mode stays on, and nothing is written to ~/.ray
  logs/          one log per service
  pg/data        PostgreSQL's data; owned by the `postgres` user when run as root (initdb refuses root)
  mlartifacts/   the artifacts the MLflow server serves
  ray/<node>/    each Ray node's temp dir (session, sockets, logs)

PostgreSQL trusts every connection from 127.0.0.1 (user `postgres`, no password) and listens nowhere else, and
MLflow listens on 127.0.0.1 only: a throwaway local cluster, not a deployment. Ray's gRPC servers listen on every
address whatever the node address (Ray has no setting for it): the cluster keeps Ray's token authentication on.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable, NamedTuple

HEAD_IP = "127.0.0.2"
PG_USER = "postgres"
DATABASES = ("mlflow", "optuna")
# A Ray node's Unix sockets lie at <temp dir>/session_<date>_<pid>/sockets/plasma_store (about 65 characters
# below the temp dir) and a socket path may have at most 107 bytes.
MAX_RAY_TEMP_DIR = 40
RECORD = "cluster.json"


class ClusterError(RuntimeError):
    """A service did not start (the message ends with the last lines of its log)."""


# ------------------------------------------------------------------------------------------------ processes

class ProcStat(NamedTuple):
    ppid: int
    session: int
    start: int  # clock ticks after boot: with the PID, identifies one process for good
    state: str


def process_table() -> dict[int, ProcStat]:
    """Every process of this machine, from /proc/<pid>/stat."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:  # it exited meanwhile
            continue
        # Fields after the command name (which may hold spaces and parentheses): state, ppid, pgrp, session, ...,
        # starttime (22nd field of the line, 20th after the name).
        fields = text[text.rindex(")") + 2:].split()
        table[int(entry)] = ProcStat(int(fields[1]), int(fields[3]), int(fields[19]), fields[0])
    return table


def running(processes: dict[int, int], table: dict[int, ProcStat] | None = None) -> list[int]:
    """Which of {pid: start time} still run (zombies, dead but not yet reaped, do not count)."""
    table = process_table() if table is None else table
    return sorted(p for p, s in processes.items() if p in table and table[p].start == s and table[p].state != "Z")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@dataclasses.dataclass
class Service:
    """One started service: the leader of its session, and every process of it seen so far."""

    name: str
    pid: int
    start: int
    stop_signal: str = "SIGTERM"
    leader_only: bool = False  # the stop signal goes to the leader only, which stops the rest itself
    seen: dict[int, int] = dataclasses.field(default_factory=dict)  # pid -> start time
    popen: subprocess.Popen | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.seen.setdefault(self.pid, self.start)

    def processes(self, table: dict[int, ProcStat]) -> list[int]:
        """The service's running processes now: its session and the descendants of any of them. Records them."""
        ours = {p: s for p, s in self.seen.items() if p in table and table[p].start == s}
        # A session id cannot be given to a new process while any process of that session lives: one known
        # member still running makes every process with this session id ours.
        if any(table[p].session == self.pid for p in ours):
            ours.update({p: st.start for p, st in table.items() if st.session == self.pid})
        children = collections.defaultdict(list)
        for p, st in table.items():
            children[st.ppid].append(p)
        stack = list(ours)
        while stack:
            for child in children[stack.pop()]:
                if child not in ours:
                    ours[child] = table[child].start
                    stack.append(child)
        self.seen.update(ours)
        return running(ours, table)

    def kill(self) -> list[int]:
        """SIGKILL every process of the service at once; returns their PIDs."""
        pids = self.processes(process_table())
        for p in pids:
            _signal(p, signal.SIGKILL)
        if not _wait_gone([self], 10.0):
            raise ClusterError(f"{self.name}: processes {self.processes(process_table())} survived SIGKILL")
        return pids

    def send_stop(self) -> None:
        """The service's own stop signal: to its leader only (which then stops the rest), or to every process."""
        pids = self.processes(process_table())
        for p in ([self.pid] if self.leader_only and self.pid in pids else pids):
            _signal(p, getattr(signal, self.stop_signal))

    def record(self) -> dict:
        return {"name": self.name, "pid": self.pid, "start": self.start, "stop_signal": self.stop_signal,
                "leader_only": self.leader_only}


def stop_services(services: list[Service], grace_s: float) -> None:
    """Stop signals to all at once, `grace_s` for all to exit, then SIGKILL whatever is left."""
    for service in services:
        service.send_stop()
    if _wait_gone(services, grace_s):
        return
    for service in services:
        for p in service.processes(process_table()):
            _signal(p, signal.SIGKILL)
    if not _wait_gone(services, 10.0):
        table = process_table()
        left = {s.name: s.processes(table) for s in services}
        raise ClusterError(f"processes survived SIGKILL: {left}")


def _wait_gone(services: list[Service], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        for s in services:
            if s.popen is not None:
                s.popen.poll()  # reap the leader once it exits
        table = process_table()
        if not any(s.processes(table) for s in services):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _start(name: str, cmd: list[str], log: Path, env: dict[str, str], cwd: Path, *, stop_signal: str = "SIGTERM",
           leader_only: bool = False, user: str | None = None) -> Service:
    """`cmd` in a new session, stdout and stderr to `log`."""
    ids = _as_user(user)
    with open(log, "ab") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 cwd=cwd, start_new_session=True, **ids)
    for _ in range(100):  # /proc/<pid> appears with the fork; the start time is what makes the PID safe to signal
        stat = process_table().get(popen.pid)
        if stat is not None:
            return Service(name, popen.pid, stat.start, stop_signal, leader_only, popen=popen)
        time.sleep(0.01)
    raise ClusterError(f"{name}: process {popen.pid} vanished at once; see {log}")


def _as_user(user: str | None) -> dict:
    """Popen's arguments that run a program as `user` (without root's supplementary groups)."""
    if user is None:
        return {}
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(service: Service, log: Path, ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if service.popen is not None and service.popen.poll() is not None:
            raise ClusterError(f"{what} exited with code {service.popen.returncode}; last lines of {log}:\n"
                               f"{_tail(log)}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{what} was not ready within {timeout:.0f} s; last lines of {log}:\n{_tail(log)}")
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------------ network

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _tcp_listeners() -> dict[str, str]:
    """inode -> "address:port" of every listening TCP socket (IPv4 and IPv6) in this network namespace."""
    out = {}
    for name, family in (("tcp", 4), ("tcp6", 6)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(raw) if family == 4 else ipaddress.IPv6Address(raw)
            out[f[9]] = f"{addr}:{int(hexport, 16)}" if family == 4 else f"[{addr}]:{int(hexport, 16)}"
    return out


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    ip = ipaddress.ip_address(host)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


# ------------------------------------------------------------------------------------------------ PostgreSQL

def inherited_env() -> dict[str, str]:
    """This process's environment as the cluster's processes (services, and a sweep driving them) should get it: a
    driver's MLFLOW_TRACKING_URI or RAY_ADDRESS must not leak into them, nor the single-node setting a local sweep
    sets in its process (with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 `ray start` refuses to join a cluster)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}


def find_postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (initdb, postgres): `pg_config --bindir`, else the newest
    /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH). None when there is none."""
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            candidates.append(Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                                  timeout=10).stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                      if p.parent.name.isdigit() else 0, reverse=True)
    candidates += versions
    return next((c for c in candidates if (c / "initdb").is_file() and (c / "postgres").is_file()), None)


def _reachable_by(path: Path, user: str) -> bool:
    """Whether `user` can walk down to `path` (every folder above it searchable to them)."""
    pw = pwd.getpwnam(user)
    for folder in [path, *path.parents]:
        st = folder.stat()
        if st.st_uid == pw.pw_uid:
            bit = 0o100
        elif st.st_gid == pw.pw_gid:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return False
    return True


# ------------------------------------------------------------------------------------------------ the cluster

class LocalCluster:
    """PostgreSQL, an MLflow server, a Ray head (no CPUs) and `workers` Ray nodes of one CPU each, on loopback.

        with LocalCluster(Path("/tmp/dsc"), workers=2, pg_bin=find_postgres_bin()) as cluster:
            ... dynastudy sweep --ray-address cluster.ray_address --tracking-uri cluster.tracking_uri
                --storage cluster.storage_url  (with cluster.client_env in its environment)

    Args:
        folder: absolute; everything the cluster writes goes here. Keep it short (Ray's socket paths; the check
            says how short) and, when run as root, searchable by the `postgres` user (mode 711 on /tmp/<name>).
        workers: Ray worker nodes, on 127.0.0.3, 127.0.0.4, ...
        pg_bin: absolute folder of PostgreSQL's `initdb` and `postgres` (`find_postgres_bin()`).
        python: the interpreter with ray, mlflow and psycopg2 installed; Ray nodes run their workers with it.
        env: added to every service's environment (PYTHONPATH, so that Ray workers import the project).
        object_store_bytes: each Ray node's object store (the sweep's dataset lives there once).
        grace_s: how long a stopped service may take to exit before it is killed.
        start_timeout_s: how long each service may take to be ready.
    """

    def __init__(self, folder: Path, workers: int = 2, *, pg_bin: Path, python: str,
                 env: dict[str, str] | None = None, object_store_bytes: int = 256 * 2**20, grace_s: float = 10.0,
                 start_timeout_s: float = 120.0) -> None:
        if not Path("/proc/self/stat").exists():
            raise ClusterError("LocalCluster finds its processes in /proc: Linux only")
        for what, path in (("folder", folder), ("pg_bin", pg_bin), ("python", Path(python))):
            if not Path(path).is_absolute():
                raise ValueError(f"{what} must be an absolute path, got {path}")
        if not 1 <= workers <= 250:
            raise ValueError(f"workers={workers}: 1 to 250 (one loopback address each)")
        self.folder = Path(folder)
        self.pg_bin = Path(pg_bin)
        self.python = python
        self.extra_env = dict(env or {})
        self.object_store_bytes = object_store_bytes
        self.grace_s = grace_s
        self.start_timeout_s = start_timeout_s
        self.head_ip = HEAD_IP
        self.worker_ips = [f"127.0.0.{3 + i}" for i in range(workers)]
        self.services: dict[str, Service] = {}
        self.ended: list[Service] = []  # stopped or killed services, kept for `processes()`
        self.pg_port = self.mlflow_port = self.gcs_port = 0
        longest = self._ray_dir(f"w{workers}")
        if len(str(longest)) > MAX_RAY_TEMP_DIR:
            raise ValueError(f"folder {folder} is too long for Ray's Unix sockets ({longest} has "
                             f"{len(str(longest))} characters, at most {MAX_RAY_TEMP_DIR}): use a short one, "
                             "e.g. `mktemp -d /tmp/dsc-XXXX`")

    # -------------------------------------------------------------- what clients need
    @property
    def ray_address(self) -> str:
        return f"{self.head_ip}:{self.gcs_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def storage_url(self) -> str:
        """Optuna's storage (SQLAlchemy URL)."""
        return self._db_url("optuna")

    @property
    def backend_store_uri(self) -> str:
        """The MLflow server's own database."""
        return self._db_url("mlflow")

    @property
    def node_ips(self) -> list[str]:
        """Every Ray node: the head, then the workers (`worker_ips[i]` is `kill_worker(i)`'s)."""
        return [self.head_ip, *self.worker_ips]

    @property
    def token_file(self) -> Path:
        return self.folder / "ray-token"

    @property
    def client_env(self) -> dict[str, str]:
        """What a Ray driver (`dynastudy sweep --ray-address ...`) needs in its environment: the token."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}

    def _db_url(self, db: str) -> str:
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.pg_port}/{db}"

    def _ray_dir(self, node: str) -> Path:
        return self.folder / "ray" / node

    def _log(self, name: str) -> Path:
        return self.folder / "logs" / f"{name}.log"

    # -------------------------------------------------------------- start and stop
    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Everything, in parallel where it can: the Ray head starts while PostgreSQL initialises, the workers join
        while the MLflow server migrates its database."""
        for sub in ("logs", "mlartifacts", "ray"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        self.pg_port, self.mlflow_port, self.gcs_port = free_port(), free_port(), free_port(self.head_ip)
        self._start_ray_node("head")
        self._start_postgres()
        self._start_mlflow()
        self._wait_gcs()  # workers may join as soon as the head's GCS answers, before the rest of the head is up
        for i in range(len(self.worker_ips)):
            self._start_ray_node(f"w{i}")
        self._wait_mlflow()
        for node in ["head", *(f"w{i}" for i in range(len(self.worker_ips)))]:
            self._wait_ray_node(node)
        self._write_record()

    def stop(self) -> None:
        """Stop every service this object started, all at once (none needs another to shut down: PostgreSQL's
        fast shutdown ends the MLflow server's connections); even after errors."""
        services = list(self.services.values())
        if not services:
            return
        self.services.clear()
        self.ended.extend(services)
        try:
            stop_services(services, self.grace_s)
        finally:
            _remove_address_files(self.folder / "ray", self.ray_address)

    def detach(self) -> None:
        """Leave the services running past `__exit__` (`stop_recorded(folder)` stops them later)."""
        self._write_record()
        self.ended.extend(self.services.values())
        self.services.clear()

    def processes(self) -> dict[str, dict[int, int]]:
        """Every process seen of every service, running or not: service name -> {pid: start time}."""
        table = process_table()
        for s in self.services.values():
            s.processes(table)  # picks up processes started since the last look
        out: dict[str, dict[int, int]] = collections.defaultdict(dict)
        for s in [*self.ended, *self.services.values()]:
            out[s.name].update(s.seen)
        return dict(out)

    def listening(self) -> dict[str, set[str]]:
        """Service name -> the TCP addresses its processes listen on now."""
        listeners = _tcp_listeners()
        table = process_table()
        return {name: {listeners[i] for p in s.processes(table) for i in _socket_inodes(p) if i in listeners}
                for name, s in self.services.items()}

    # -------------------------------------------------------------- crash helpers
    def kill_worker(self, i: int) -> list[int]:
        """SIGKILL Ray worker node i (`worker_ips[i]`): its raylet, agents, reaper, `ray start` process and the
        trial processes running there, all at once, like a machine that dies. Returns the killed PIDs."""
        name = f"ray-w{i}"
        if name not in self.services:
            raise KeyError(f"no running worker node {i} (running: {sorted(self.services)})")
        service = self.services.pop(name)
        self.ended.append(service)
        return service.kill()

    def stop_tracking(self) -> None:
        """Stop the MLflow server (as `stop` would)."""
        service = self.services.pop("mlflow")
        self.ended.append(service)
        stop_services([service], self.grace_s)

    def start_tracking(self) -> None:
        """Start the MLflow server again: same port, same database, same artifacts."""
        if "mlflow" in self.services:
            raise ClusterError("the MLflow server is running already")
        self._start_mlflow()
        self._wait_mlflow()
        self._write_record()

    # -------------------------------------------------------------- the services
    def _env(self, **extra: str) -> dict[str, str]:
        env = inherited_env()
        env.update(self.extra_env)
        env.update(PYTHONUNBUFFERED="1", **extra)
        return env

    def _start_postgres(self) -> None:
        pg = self.folder / "pg"
        data = pg / "data"
        # initdb and postgres refuse to run as root: then they run as the `postgres` user, in a folder of theirs.
        user = PG_USER if os.geteuid() == 0 else None
        pg.mkdir(exist_ok=True)
        if user is not None:
            pw = pwd.getpwnam(user)
            os.chown(pg, pw.pw_uid, pw.pw_gid)
            os.chmod(pg, 0o700)
            if not _reachable_by(pg, user):
                raise ClusterError(f"user {user} cannot reach {pg} (PostgreSQL does not run as root): make the "
                                   f"folders above it searchable (chmod o+x), e.g. use a folder made by "
                                   "`mktemp -d /tmp/dsc-XXXX && chmod 711` it")
        log = self._log("postgres")
        env = self._env(HOME=str(pg), LC_ALL="C")
        if not (data / "PG_VERSION").exists():
            init = subprocess.run([str(self.pg_bin / "initdb"), "-D", str(data), "-A", "trust", "-U", PG_USER,
                                   "-E", "UTF8", "--locale=C", "--no-sync"], cwd=pg, env=env, capture_output=True,
                                  text=True, timeout=self.start_timeout_s,
                                  **_as_user(user))
            if init.returncode != 0:
                raise ClusterError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        # Unix sockets off (-k ''): TCP on 127.0.0.1 only.
        self.services["postgres"] = _start(
            "postgres", [str(self.pg_bin / "postgres"), "-D", str(data), "-p", str(self.pg_port), "-k", "",
                         "-c", "listen_addresses=127.0.0.1", "-c", "synchronous_commit=off"],
            log, env, pg, stop_signal="SIGINT", leader_only=True, user=user)  # SIGINT: PostgreSQL's fast shutdown

        import psycopg2

        def connect():
            return psycopg2.connect(host="127.0.0.1", port=self.pg_port, user=PG_USER, dbname="postgres",
                                    connect_timeout=2)

        def ready() -> bool:
            try:
                connect().close()
                return True
            except psycopg2.OperationalError:
                return False

        _wait(self.services["postgres"], log, ready, self.start_timeout_s, "PostgreSQL")
        conn = connect()
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute("select datname from pg_database")
                have = {r[0] for r in cur.fetchall()}
                for db in DATABASES:
                    if db not in have:
                        cur.execute(f"create database {db}")
        finally:
            conn.close()

    def _start_mlflow(self) -> None:
        # Job execution off and one worker: 2 processes and about 0.5 GB instead of about 15 and 3.3 GB.
        self.services["mlflow"] = _start(
            "mlflow", [self.python, "-m", "mlflow", "server", "--backend-store-uri", self.backend_store_uri,
                       "--serve-artifacts", "--artifacts-destination", str(self.folder / "mlartifacts"),
                       "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1"],
            self._log("mlflow"), self._env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), self.folder)

    def _wait_mlflow(self) -> None:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(self.tracking_uri + "/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        _wait(self.services["mlflow"], self._log("mlflow"), ready, self.start_timeout_s, "the MLflow server")

    def _start_ray_node(self, node: str) -> None:
        temp = self._ray_dir(node)
        temp.mkdir(parents=True, exist_ok=True)
        # No log monitor: it only streams worker output to drivers, and dynastudy's driver does not want it.
        common = ["--block", f"--temp-dir={temp}", "--disable-usage-stats", "--num-gpus=0",
                  "--include-log-monitor=false",
                  f"--object-store-memory={self.object_store_bytes}",
                  f"--dashboard-agent-listen-port={free_port()}"]  # the fixed default would clash between nodes
        if node == "head":
            args = ["--head", f"--node-ip-address={self.head_ip}", f"--port={self.gcs_port}", "--num-cpus=0",
                    "--include-dashboard=false"]
        else:
            ip = self.worker_ips[int(node[1:])]
            args = [f"--address={self.ray_address}", f"--node-ip-address={ip}", "--num-cpus=1"]
        self.services[f"ray-{node}"] = _start(
            f"ray-{node}", [self.python, "-m", "ray.scripts.scripts", "start", *args, *common],
            self._log(f"ray-{node}"), self._env(RAY_USAGE_STATS_ENABLED="0", **self.client_env), self.folder,
            leader_only=True)  # `ray start --block` stops its node in 1-3 s; its GCS alone ignores SIGTERM for 10 s

    def _wait_gcs(self) -> None:
        def ready() -> bool:
            try:
                socket.create_connection((self.head_ip, self.gcs_port), timeout=1).close()
                return True
            except OSError:
                return False

        _wait(self.services["ray-head"], self._log("ray-head"), ready, self.start_timeout_s, "the Ray head's GCS")

    def _wait_ray_node(self, node: str) -> None:
        log = self._log(f"ray-{node}")
        _wait(self.services[f"ray-{node}"], log, lambda: "Ray runtime started" in log.read_text(errors="replace"),
              self.start_timeout_s, f"Ray node {node}")

    def _write_record(self) -> None:
        record = {"ray_address": self.ray_address, "tracking_uri": self.tracking_uri,
                  "storage_url": self.storage_url, "backend_store_uri": self.backend_store_uri,
                  "node_ips": self.node_ips, "client_env": self.client_env,
                  "services": [s.record() for s in self.services.values()]}
        (self.folder / RECORD).write_text(json.dumps(record, indent=1))


def _remove_address_files(ray_root: Path, address: str | None) -> None:
    """`ray start` leaves <temp dir>/ray_current_cluster behind, and a later `ray.init()` there would try to join
    the dead cluster. Ours go, and the default one too when it names this cluster's address."""
    for f in ray_root.glob("*/ray_current_cluster"):
        f.unlink(missing_ok=True)
    default = Path("/tmp/ray/ray_current_cluster")
    try:
        if address and default.read_text().strip() == address:
            default.unlink()
    except OSError:
        pass


def stop_recorded(folder: Path, grace_s: float = 10.0) -> list[str]:
    """Stop a cluster that `scripts/local-cluster.py --keep` left running, from its cluster.json: only the
    processes it started (PID and start time must both match). Returns the names of the services stopped."""
    record = json.loads((folder / RECORD).read_text())
    services = [Service(**s) for s in record["services"]]
    table = process_table()
    services = [s for s in services if s.processes(table)]
    stop_services(services, grace_s)
    _remove_address_files(folder / "ray", record["ray_address"])
    return [s.name for s in services]
