"""Issue 8's compose stack, checked without a Docker engine: Debian's `docker-compose` (1.29) validates
docker-compose.yml against the compose schema and interpolates .env.example into it (`config`), and the resolved
file is checked for what the stack promises: nothing starts before the servers it needs are healthy, every port is
published on loopback unless BIND_ADDRESS says otherwise, no password is written in the file, the Ray workers
reserve GPUs and can be scaled, MLflow and Optuna have separate databases, and Tune's storage is one volume at one
path on every Ray node. Whether the images build and the services really start cannot be checked here.

Without `docker-compose` these tests skip (fail under CI); `make tools` installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
INIT_SCRIPT = ROOT / "docker" / "postgres-init" / "10-databases.sh"
VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe:
        return exe
    message = "docker-compose is not installed (`make tools` installs Debian's)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _env_example_names() -> list[str]:
    return [m.group(1) for m in re.finditer(r"^([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M)]


def compose(*args: str, env_file: Path = ENV_EXAMPLE, compose_file: Path = COMPOSE_FILE,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`docker-compose -f FILE --env-file ENV ARGS` in the repository root. The caller's own environment would
    take precedence over the env file in compose's interpolation, so every variable the stack reads is removed
    from it (a developer's exported POSTGRES_PASSWORD must not make the missing-password check pass)."""
    names = set(_env_example_names()) | set(VAR_REF.findall(COMPOSE_FILE.read_text()))
    clean = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("COMPOSE_")}
    clean.update(env or {})
    return subprocess.run([_docker_compose(), "-f", str(compose_file), "--env-file", str(env_file), *args],
                          cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The compose file as `docker-compose config` resolves it with .env.example (anchors merged, variables
    interpolated, depends_on in its long form)."""
    out = compose("config")
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)["services"]


def _host_ips(service: dict) -> list[str]:
    """The host address of each published port, from either form `config` may print: 1.29's
    "127.0.0.1:5000:5000/tcp" or the compose specification's long form with host_ip."""
    ips = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ips.append(port.get("host_ip", ""))
        else:
            parts = str(port).split(":")
            ips.append(parts[0] if len(parts) == 3 else "")  # "5000:5000" or "5000" publish on every address
    return ips


def _db_of(url: str) -> str:
    """The database name at the end of a postgresql URL."""
    m = re.fullmatch(r"postgresql(\+psycopg2)?://[^/]+/([^/?\s]+)", url)
    assert m, f"not a postgresql URL naming a database: {url!r}"
    return m.group(2)


# ------------------------------------------------------------------------------------------------ the validator

def test_config_validates_with_the_example_env():
    out = compose("config", "-q")
    assert out.returncode == 0, out.stderr


def test_missing_postgres_password_is_refused_by_name(tmp_path):
    env = tmp_path / "no-password.env"
    env.write_text("".join(line for line in ENV_EXAMPLE.read_text().splitlines(keepends=True)
                           if not line.startswith("POSTGRES_PASSWORD=")))
    out = compose("config", "-q", env_file=env)
    assert out.returncode != 0
    assert "POSTGRES_PASSWORD" in out.stderr


def test_the_validator_rejects_a_wrong_condition(tmp_path):
    """`config -q` is a real schema check: the same file with a misspelt depends_on condition fails, so the passing
    check above means something."""
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE_FILE.read_text()
    assert "condition: service_healthy" in text
    broken.write_text(text.replace("condition: service_healthy", "condition: service_healty", 1))
    out = compose("config", "-q", compose_file=broken)
    assert out.returncode != 0
    assert "service_healty" in out.stderr


# ------------------------------------------------------------------------------------------------ the topology

def test_services(raw, resolved):
    assert "version" not in raw
    assert set(resolved) == {"postgres", "mlflow", "ray-head", "ray-worker", "optuna-dashboard", "dashboard",
                             "sweep"}
    assert resolved["sweep"].get("profiles") == ["tools"]  # a one-shot: `docker compose run`, not `up`
    for name in ("mlflow", "ray-head", "ray-worker", "dashboard", "sweep"):
        assert resolved[name]["image"] == "dynastudy:latest" and "build" in resolved[name], name


def test_every_dependency_waits_for_a_healthy_server(resolved):
    checked = 0
    for name, service in resolved.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert spec.get("condition") == "service_healthy", f"{name} -> {dep}: {spec}"
            test = (resolved[dep].get("healthcheck") or {}).get("test")
            assert test and test != ["NONE"], f"{name} waits for {dep}, which has no healthcheck"
            checked += 1
    # mlflow, ray-worker, optuna-dashboard, dashboard depend on one server each; the sweep on three.
    assert checked == 7
    assert "pg_isready" in " ".join(resolved["postgres"]["healthcheck"]["test"])
    assert "/health" in " ".join(resolved["mlflow"]["healthcheck"]["test"])
    assert resolved["ray-head"]["healthcheck"]["test"][-2:] == ["ray", "status"]


def test_ports_are_published_on_loopback_by_default(raw, resolved):
    published = {name: _host_ips(s) for name, s in resolved.items() if s.get("ports")}
    assert set(published) == {"mlflow", "ray-head", "optuna-dashboard", "dashboard"}
    assert all(ip == "127.0.0.1" for ips in published.values() for ip in ips), published
    # Each one goes through BIND_ADDRESS, so exposing them is one deliberate setting ...
    for name, service in raw["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
    # ... which really reaches every port.
    out = compose("config", env={"BIND_ADDRESS": "0.0.0.0"})
    assert out.returncode == 0, out.stderr
    exposed = yaml.safe_load(out.stdout)["services"]
    assert {ip for name in published for ip in _host_ips(exposed[name])} == {"0.0.0.0"}


def test_no_password_is_written_in_the_file(raw):
    # No URL with user:password@ (variable references set aside: `${POSTGRES_USER:-dynastudy}@` is a user name).
    text = re.sub(r"\$\{[^}]*\}", "VAR", COMPOSE_FILE.read_text())
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), "a URL with user:password@"
    secret = re.compile(r"PASSWORD|SECRET|TOKEN")
    seen = []
    for block in [*(s.get("environment") or {} for s in raw["services"].values()),
                  *(v for k, v in raw.items() if k.startswith("x-") and isinstance(v, dict))]:
        assert isinstance(block, dict), "environment as a mapping, so its values can be checked"
        for key, value in block.items():
            if key != "<<" and secret.search(key):
                seen.append(key)
                # Only a reference to the environment: required (:?) or optional with an empty default (:-).
                assert re.fullmatch(r"\$\{[A-Z_]+(:\?[^}]*|:-)\}", str(value)), f"{key}: {value!r}"
    assert {"POSTGRES_PASSWORD", "PGPASSWORD", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD"} <= set(seen)
    assert raw["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_ray_workers_reserve_gpus_and_scale(raw, resolved):
    worker = resolved["ray-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert str(devices[0]["count"]) == "1"
    assert raw["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] \
        == "${GPUS_PER_WORKER:-1}"
    # `--scale ray-worker=N` needs containers without a fixed name or host port.
    assert "container_name" not in worker and not worker.get("ports")
    assert "ray start --address=ray-head:6379 --block" in worker["command"]
    assert "ray start --head --block --port=6379" in resolved["ray-head"]["command"]


def test_mlflow_and_optuna_use_distinct_databases(resolved):
    env = resolved["postgres"]["environment"]
    assert env["MLFLOW_DB"] != env["OPTUNA_DB"]
    backend = re.search(r"--backend-store-uri (\S+)", resolved["mlflow"]["command"]).group(1)
    assert _db_of(backend) == env["MLFLOW_DB"]
    assert _db_of(resolved["sweep"]["environment"]["DYNASTUDY_STORAGE"]) == env["OPTUNA_DB"]
    assert _db_of(resolved["optuna-dashboard"]["command"][0]) == env["OPTUNA_DB"]
    script = INIT_SCRIPT.read_text()
    assert '"$MLFLOW_DB" "$OPTUNA_DB"' in script and "CREATE DATABASE" in script
    assert os.access(INIT_SCRIPT, os.X_OK)


def test_mlflow_server_settings(resolved):
    mlflow = resolved["mlflow"]
    cmd = mlflow["command"]
    for flag in ("--serve-artifacts", "--artifacts-destination /mlartifacts", "--host 0.0.0.0", "--port 5000",
                 "--workers 2"):
        assert flag in cmd
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert any(v.endswith(":/mlartifacts:rw") or v.endswith(":/mlartifacts") for v in mlflow["volumes"])
    # The other containers reach it as http://mlflow:5000: MLflow must accept that Host header.
    assert "mlflow:*" in mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")


def test_tune_storage_is_one_volume_at_one_path_on_every_ray_node(resolved):
    """The runner puts Tune's storage_path at <results-dir>/ray: on a cluster, every node must see it."""
    for name in ("ray-head", "ray-worker", "sweep"):
        service = resolved[name]
        assert service["environment"]["DYNASTUDY_HOME"] == "/results", name
        assert any(v.split(":")[:2] == ["results", "/results"] for v in service["volumes"]), name
    sweep = resolved["sweep"]
    assert any(v.endswith(":/data:ro") for v in sweep["volumes"])
    assert sweep["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    assert sweep["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_env_example_documents_every_variable():
    lines = ENV_EXAMPLE.read_text().splitlines()
    names = _env_example_names()
    used = set(VAR_REF.findall(COMPOSE_FILE.read_text()))
    assert used <= set(names), f"not in .env.example: {sorted(used - set(names))}"
    assert set(names) <= used, f"read by no service: {sorted(set(names) - used)}"
    assert len(names) == len(set(names))
    for i, line in enumerate(lines):
        if re.match(r"^[A-Z_][A-Z0-9_]*=", line):
            assert lines[i - 1].startswith("# "), f"{line.split('=')[0]} has no comment above it"


def test_dockerfile_provides_what_the_services_use(resolved):
    """The image cannot be built here: check at least that what it copies exists and is not excluded from the
    build context, and that the paths the services name are where it puts them."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copies = re.findall(r"^COPY\s+(\S+)\s+(\S+)", dockerfile, re.M)
    for src, _ in copies:
        assert (ROOT / src).exists(), src
        assert src.split("/")[0] not in ignored, f"{src} is excluded by .dockerignore"
    dests = {dest for _, dest in copies}
    assert resolved["sweep"]["entrypoint"][-1] in dests
    assert resolved["mlflow"]["environment"]["MLFLOW_AUTH_CONFIG_PATH"] in dests
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)  # not root
    # Dependencies are installed from pyproject.toml alone, before the code is copied (a code change must not
    # reinstall torch).
    assert dockerfile.index("COPY pyproject.toml") < dockerfile.index("pip install -r") \
        < dockerfile.index("COPY study")
    for package in ("psycopg2-binary", "boto3", '"mlflow[auth]"'):  # the last for basic auth (Flask-WTF)
        assert package in dockerfile


def test_shell_scripts_parse():
    for script in ("docker/sweep.sh", "docker/postgres-init/10-databases.sh", "scripts/install-test-tools.sh"):
        out = subprocess.run(["sh", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert out.returncode == 0, f"{script}: {out.stderr}"
