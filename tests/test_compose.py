"""The deployment files: docker-compose.yml as a real compose parser reads it, the Dockerfile, .env.example.

Nothing here starts a container (no Docker engine runs in CI); the point is that the compose file parses,
wires the services as documented, and stays in step with the code: every `DARKROOM_*` it sets is a
setting, and every `darkroom ...` command it runs parses with the real CLI.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.main import parser
from shared.settings import Settings
from tests.support import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
SERVICES = {"redis", "postgres", "minio", "minio-init", "migrate", "api", "worker"}
SECRETS = {"DARKROOM_SECRET_KEY", "POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def docker_compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.fail("docker-compose is not installed; run `make services`, which installs it")
    # Only PATH and HOME from this process: a DARKROOM_* or secret in the caller's shell would otherwise
    # take precedence over the env file and hide a missing entry in it.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [executable, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    """The compose file as docker-compose resolves it with the values of .env.example."""
    result = docker_compose_config(ENV_EXAMPLE)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)["services"]


def read_env_file(path: Path, commented: bool = False) -> dict[str, str]:
    """NAME=value lines; with `commented`, also the `# NAME=value` lines that show a default."""
    pattern = r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$"
    matches = (re.match(pattern, line.strip()) for line in path.read_text().splitlines())
    return {m[2]: m[3] for m in matches if m and (commented or not m[1])}


def argv(service: dict[str, Any]) -> list[str]:
    """The command line a service runs (entrypoint, then command), as a list of arguments."""
    parts: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        parts += shlex.split(value) if isinstance(value, str) else [str(v) for v in value]
    return parts


def assert_darkroom_command(args: list[str], where: str) -> None:
    assert args and args[0] == "darkroom", f"{where} runs {args}, not darkroom"
    try:
        parser().parse_args(args[1:])
    except SystemExit as exc:
        pytest.fail(f"{where}: `{shlex.join(args)}` is not a valid darkroom command (exit {exc.code})")


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Named volumes of a service by mount point (short syntax from compose 1.x, long from v2)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            named = not source.startswith((".", "/", "~"))
        else:
            source, target, named = volume.get("source", ""), volume["target"], volume.get("type") == "volume"
        if named and source:
            mounts[target] = source
    return mounts


def test_every_service_is_defined(services: dict[str, dict[str, Any]]) -> None:
    missing = SERVICES - set(services)
    assert not missing, f"docker-compose.yml lacks the services {sorted(missing)}"


def test_worker_reserves_an_nvidia_gpu(services: dict[str, dict[str, Any]]) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices


def test_worker_caches_models_and_compiled_kernels_on_volumes(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    mounts = volume_mounts(worker)
    for variable in ("HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "DARKROOM_MODEL_CACHE_DIR"):
        path = worker["environment"].get(variable)
        assert path, f"worker does not set {variable}"
        assert any(Path(path).is_relative_to(target) for target in mounts), (
            f"worker's {variable}={path} is on no named volume ({mounts}); a restart would start cold"
        )


def test_redis_keeps_an_append_only_file(services: dict[str, dict[str, Any]]) -> None:
    args = argv(services["redis"])
    assert "--appendonly" in args and args[args.index("--appendonly") + 1] == "yes", args
    assert volume_mounts(services["redis"]), "redis keeps its append-only file on no volume"


def test_api_and_worker_reach_the_compose_services(services: dict[str, dict[str, Any]]) -> None:
    for name in ("api", "worker"):
        env = services[name]["environment"]
        for variable in ("DARKROOM_DATABASE_URL", "DARKROOM_REDIS_URL", "DARKROOM_STORAGE_URL"):
            assert env.get(variable), f"{name} does not set {variable}"
        assert env["DARKROOM_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["DARKROOM_DATABASE_URL"]
        assert env["DARKROOM_REDIS_URL"].startswith("redis://redis:6379/")
        assert env["DARKROOM_STORAGE_URL"].startswith("s3://")
        assert env.get("DARKROOM_S3_ENDPOINT_URL") == "http://minio:9000"
        assert env.get("DARKROOM_ENV") == "production"


def test_api_and_worker_agree_on_every_shared_setting(services: dict[str, dict[str, Any]]) -> None:
    # Both read the model registry and the queue names from these; a difference strands jobs.
    api, worker = services["api"]["environment"], services["worker"]["environment"]
    for variable, value in api.items():
        assert worker.get(variable) == value, f"api sets {variable}={value!r}, worker {worker.get(variable)!r}"


def test_every_darkroom_variable_is_a_setting(services: dict[str, dict[str, Any]]) -> None:
    fields = set(Settings.model_fields)
    sources = {f"service {name}": list(service.get("environment", {})) for name, service in services.items()}
    sources[".env.example"] = list(read_env_file(ENV_EXAMPLE, commented=True))
    sources["Dockerfile"] = re.findall(r"\b(DARKROOM_\w+)=", DOCKERFILE.read_text())
    for where, names in sources.items():
        for name in names:
            if name.startswith("DARKROOM_"):
                field = name.removeprefix("DARKROOM_").lower()
                assert field in fields, f"{where} sets {name}, but Settings has no field {field!r}"


def use_environment(monkeypatch: pytest.MonkeyPatch, environment: dict[str, Any]) -> None:
    for key in [k for k in os.environ if k.startswith("DARKROOM_")]:
        monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, str(value))


def test_api_and_worker_environments_are_valid_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("api", "worker"):
        use_environment(monkeypatch, {**services[name]["environment"], "DARKROOM_SECRET_KEY": "a-real-secret"})
        settings = Settings(_env_file=None)
        assert settings.env == "production"
        assert settings.storage_url == services[name]["environment"]["DARKROOM_STORAGE_URL"]


def test_the_example_secret_key_is_refused_in_production(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Someone who copies .env.example and forgets the key gets a service that will not start.
    use_environment(monkeypatch, services["api"]["environment"])
    with pytest.raises(ValueError, match="DARKROOM_SECRET_KEY"):
        Settings(_env_file=None)


def test_env_example_as_a_local_env_keeps_the_embedded_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # darkroom reads `.env` from its working directory, so a `.env` made for compose in a checkout also
    # reaches `make run` and the tests: it must not point them at containers' hosts, paths or a GPU.
    use_environment(monkeypatch, {})
    settings = Settings(_env_file=ENV_EXAMPLE)
    defaults = Settings(_env_file=None)
    assert settings.public_url == read_env_file(ENV_EXAMPLE)["DARKROOM_PUBLIC_URL"]  # the file was read
    assert settings.env == "development"
    for field in ("database_url", "redis_url", "storage_url", "models_file", "default_model", "device"):
        assert getattr(settings, field) == getattr(defaults, field), field


def test_compose_refuses_to_start_without_the_secrets(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = docker_compose_config(empty)
    assert result.returncode != 0
    assert any(secret in result.stderr for secret in SECRETS), result.stderr


def test_env_example_lists_every_variable_the_compose_file_reads() -> None:
    # `$${...}` is an escaped dollar: the container's shell expands it, not compose.
    read = set(re.findall(r"(?<!\$)\$\{(\w+)", COMPOSE_FILE.read_text()))
    listed = set(read_env_file(ENV_EXAMPLE, commented=True))
    assert read <= listed, f".env.example lacks {sorted(read - listed)}"
    assert not SECRETS - read, f"docker-compose.yml does not read {sorted(SECRETS - read)}"


def test_services_run_real_darkroom_commands(services: dict[str, dict[str, Any]]) -> None:
    for name, expected in (("migrate", "migrate"), ("api", "api"), ("worker", "worker")):
        assert argv(services[name])[:2] == ["darkroom", expected]
    for name, service in services.items():
        args = argv(service)
        if args and args[0] == "darkroom":
            assert_darkroom_command(args, f"service {name}")


def test_migrations_run_before_the_api_and_the_worker(services: dict[str, dict[str, Any]]) -> None:
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_every_awaited_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        for dependency, spec in depends_on.items() if isinstance(depends_on, dict) else ():
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}'s health"


def test_api_healthcheck_asks_readyz(services: dict[str, dict[str, Any]]) -> None:
    check = services["api"]["healthcheck"]
    test = check["test"] if isinstance(check["test"], str) else " ".join(check["test"])
    assert "/readyz" in test and ":8000" in test, test
    assert argv(services["api"])[argv(services["api"]).index("--port") + 1] == "8000"


def test_dockerfile_default_command_is_a_real_darkroom_command() -> None:
    instructions = re.findall(r"^(CMD|ENTRYPOINT)\s+(.+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert instructions, "Dockerfile has no CMD"
    found = dict(instructions)  # the last of each wins, as in Docker
    # Exec form (a JSON array), so `docker stop` signals darkroom itself rather than a shell.
    args = json.loads(found.get("ENTRYPOINT", "[]")) + json.loads(found.get("CMD", "[]"))
    assert_darkroom_command(args, "Dockerfile CMD")
    assert args[:2] == ["darkroom", "api"]


def test_prometheus_scrapes_the_api_metrics(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    config_mount = next(
        (v for v in prometheus.get("volumes", []) if "prometheus.yml" in (v if isinstance(v, str) else v["target"])),
        None,
    )
    assert config_mount is not None, "prometheus does not mount its config"
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = [
        (job.get("metrics_path", "/metrics"), target)
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert ("/metrics", "api:8000") in targets, targets
