"""The container stack checked by reading it: docker-compose.yml, the Dockerfile, .dockerignore
and the Prometheus and Grafana files it mounts. No Docker engine is needed, and no fixtures."""

import fnmatch
import json
import re
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS_FILE = ROOT / "ops" / "prometheus.yml"
GRAFANA_DATASOURCES = ROOT / "ops" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
JAEGER_DATASOURCE = GRAFANA_DATASOURCES.with_name("jaeger.yml")
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "llmq.json"
GRAFANA_DASHBOARD_PROVIDERS = ROOT / "ops" / "grafana" / "provisioning" / "dashboards"
PROMETHEUS_CONFIG_DIR = "/etc/prometheus"  # where relative rule_files resolve in the container
WORKER_METRICS_PORT = 9100

REQUIRED_SERVICES = {
    "postgres",
    "redis",
    "migrate",
    "api",
    "worker",
    "worker-gpu",
    "flower",
    "prometheus",
    "grafana",
}
HEALTHCHECKED_SERVICES = ("postgres", "redis", "api", "flower")
# Services that run the llmq image and so need the shared LLMQ_ settings.
APP_SERVICES = ("migrate", "api", "worker", "worker-gpu", "flower")
# The only service published on every host interface; the rest bind to loopback or stay internal.
PUBLIC_SERVICE = "api"
SCRAPE_TARGETS = {"api": 8000, "worker": 9100, "flower": 5555}
TORCH_PIN = "torch==2.13.0"
# Files and folders the image runs from; .dockerignore must let them into the build context.
IMAGE_NEEDS = (
    "pyproject.toml",
    "alembic.ini",
    "models.yaml",
    "celeryconfig.py",
    "migrations",
    "api",
    "db",
    "llmq",
    "workers",
)
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(value: str) -> str:
    """Fill `${VAR:-default}` with its default, as compose does when VAR is unset."""
    return INTERPOLATION.sub(lambda match: match.group(2) or "", value)


@cache
def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """depends_on as {target: condition}, whichever of the two syntaxes the service uses."""
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return {name: "service_started" for name in depends}
    return {
        name: (spec or {}).get("condition", "service_started") for name, spec in depends.items()
    }


def _volume_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) for each volume entry, short or long syntax; anonymous ones left out."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            if entry.get("source"):
                mounts.append((entry["source"], entry["target"]))
            continue
        parts = entry.split(":")
        if len(parts) >= 2:
            mounts.append((parts[0], parts[1]))
    return mounts


def _is_path(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def _published_ports(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host_ip, published port) for each `ports` entry; host_ip is "" when not pinned."""
    published = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            published.append((entry.get("host_ip", ""), str(entry.get("published", ""))))
            continue
        parts = _interpolate(str(entry)).split(":")
        # "[host_ip:]published:target"; a bare "target" publishes on a random host port.
        host_ip = parts[0] if len(parts) == 3 else ""
        published.append((host_ip, parts[-2] if len(parts) >= 2 else ""))
    return published


def _command_text(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def _environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: _interpolate(str(value)) for key, value in environment.items()}


@cache
def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\")
        if stripped.endswith("\\"):
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def _prometheus_targets() -> dict[str, set[int]]:
    """{host: ports} over static and DNS discovery configs."""
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    targets: dict[str, set[int]] = {}
    for job in config.get("scrape_configs") or []:
        for static in job.get("static_configs") or []:
            for target in static.get("targets") or []:
                host, _, port = target.rpartition(":")
                targets.setdefault(host, set()).add(int(port))
        for dns in job.get("dns_sd_configs") or []:
            for name in dns.get("names") or []:
                targets.setdefault(name, set()).add(int(dns["port"]))
    return targets


def test_compose_services_present_when_parsed():
    missing = REQUIRED_SERVICES - set(_services())
    assert not missing, f"docker-compose.yml lacks services: {sorted(missing)}"


def test_depends_on_targets_exist_for_every_service():
    services = _services()
    dangling = {
        f"{name} -> {target}"
        for name, service in services.items()
        for target in _depends_on(service)
        if target not in services
    }
    assert not dangling, f"depends_on names services that do not exist: {sorted(dangling)}"


def test_healthchecks_defined_for_stateful_and_http_services():
    services = _services()
    for name in HEALTHCHECKED_SERVICES:
        healthcheck = services[name].get("healthcheck") or {}
        assert healthcheck.get("test"), f"service {name} has no healthcheck test"
        assert not healthcheck.get("disable"), f"service {name} disables its healthcheck"


def test_healthchecks_probe_readiness_endpoints_for_api_and_flower():
    services = _services()
    api_test = " ".join(services["api"]["healthcheck"]["test"])
    flower_test = " ".join(services["flower"]["healthcheck"]["test"])
    assert "/readyz" in api_test, f"api healthcheck should call /readyz, runs: {api_test}"
    assert "curl" not in api_test, "api healthcheck uses curl, which python:3.11-slim lacks"
    assert "/healthcheck" in flower_test, (
        f"flower healthcheck should call /healthcheck: {flower_test}"
    )


def test_named_volumes_declared_when_used():
    declared = set(_compose().get("volumes") or {})
    used = {
        f"{source} (in {name})"
        for name, service in _services().items()
        for source, _ in _volume_mounts(service)
        if not _is_path(source) and source not in declared
    }
    assert not used, f"named volumes used but not declared under top-level volumes: {sorted(used)}"


def test_redis_command_enables_aof_and_noeviction():
    command = _command_text(_services()["redis"])
    assert re.search(r"--appendonly\s+yes", command), f"redis runs without AOF: {command!r}"
    assert re.search(r"--maxmemory-policy\s+noeviction", command), (
        f"redis may evict keys (and so lose Celery messages): {command!r}"
    )


def test_flower_port_bound_to_loopback_only():
    ports = _published_ports(_services()["flower"])
    assert ports, "flower publishes no port"
    exposed = [f"{ip or '0.0.0.0'}:{port}" for ip, port in ports if ip != "127.0.0.1"]
    assert not exposed, f"flower is reachable beyond the host's loopback: {exposed}"


def test_published_ports_bound_to_loopback_except_api():
    exposed = {
        f"{name} on {ip or '0.0.0.0'}:{port}"
        for name, service in _services().items()
        if name != PUBLIC_SERVICE
        for ip, port in _published_ports(service)
        if ip != "127.0.0.1"
    }
    assert not exposed, f"only {PUBLIC_SERVICE} may listen on every interface: {sorted(exposed)}"


def test_api_depends_on_migrate_completed_successfully():
    depends = _depends_on(_services()["api"])
    assert depends.get("migrate") == "service_completed_successfully", (
        f"api must start after migrations finish; its migrate condition is {depends.get('migrate')}"
    )
    assert depends.get("redis") == "service_healthy", (
        f"api must wait for a healthy redis; its redis condition is {depends.get('redis')}"
    )


def test_migrate_depends_on_postgres_healthy_and_runs_once():
    migrate = _services()["migrate"]
    assert _depends_on(migrate).get("postgres") == "service_healthy", (
        "migrate must wait for postgres to be healthy"
    )
    assert "alembic upgrade head" in _command_text(migrate), (
        f"migrate should run `alembic upgrade head`, runs: {_command_text(migrate)!r}"
    )
    assert migrate.get("restart", "no") == "no", (
        f"migrate is one-shot but has restart: {migrate.get('restart')}"
    )


def test_workers_depend_on_migrate_and_redis_when_started():
    for name in ("worker", "worker-gpu"):
        depends = _depends_on(_services()[name])
        assert depends.get("migrate") == "service_completed_successfully", (
            f"{name} must start after migrations finish, has {depends.get('migrate')}"
        )
        assert depends.get("redis") == "service_healthy", (
            f"{name} must wait for a healthy redis, has {depends.get('redis')}"
        )


def test_workers_share_data_volume_with_api():
    services = _services()
    data_volumes = {
        name: {source for source, target in _volume_mounts(services[name]) if target == "/data"}
        for name in ("api", "worker", "worker-gpu")
    }
    assert all(data_volumes.values()), f"some services do not mount /data: {data_volumes}"
    assert len(set.union(*data_volumes.values())) == 1, (
        f"api and workers mount different volumes on /data: {data_volumes}"
    )


def test_gpu_worker_in_gpu_profile_with_nvidia_reservation():
    worker = _services()["worker-gpu"]
    assert "gpu" in (worker.get("profiles") or []), (
        f"worker-gpu must be in the gpu profile, has profiles {worker.get('profiles')}"
    )
    devices = worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert devices, "worker-gpu reserves no device under deploy.resources.reservations.devices"
    nvidia = [device for device in devices if device.get("driver") == "nvidia"]
    assert nvidia, f"worker-gpu reserves no nvidia device: {devices}"
    assert "gpu" in nvidia[0].get("capabilities", []), (
        f"the nvidia reservation lacks the gpu capability: {nvidia[0]}"
    )
    assert _environment(worker).get("LLMQ_WORKER_DEVICE") == "cuda", (
        "worker-gpu must set LLMQ_WORKER_DEVICE=cuda"
    )


def test_cpu_worker_outside_profiles_on_cpu():
    worker = _services()["worker"]
    assert not worker.get("profiles"), f"worker should start by default, has {worker['profiles']}"
    assert _environment(worker).get("LLMQ_WORKER_DEVICE") == "cpu", (
        "worker must set LLMQ_WORKER_DEVICE=cpu"
    )


def test_app_services_point_at_compose_postgres_and_redis():
    services = _services()
    postgres_env = _environment(services["postgres"])
    for name in APP_SERVICES:
        environment = _environment(services[name])
        database = urlsplit(environment.get("LLMQ_DATABASE_URL", ""))
        broker = urlsplit(environment.get("LLMQ_REDIS_URL", ""))
        assert database.hostname == "postgres", f"{name}: LLMQ_DATABASE_URL host is not postgres"
        assert database.username == postgres_env["POSTGRES_USER"], (
            f"{name}: LLMQ_DATABASE_URL user {database.username} is not POSTGRES_USER"
        )
        assert database.password == postgres_env["POSTGRES_PASSWORD"], (
            f"{name}: LLMQ_DATABASE_URL password differs from POSTGRES_PASSWORD's default"
        )
        assert database.path.lstrip("/") == postgres_env["POSTGRES_DB"], (
            f"{name}: LLMQ_DATABASE_URL names database {database.path}, not POSTGRES_DB"
        )
        assert broker.hostname == "redis", f"{name}: LLMQ_REDIS_URL host is not redis"


def test_bind_mount_sources_exist_in_repo():
    missing = {
        f"{source} (in {name})"
        for name, service in _services().items()
        for source, _ in _volume_mounts(service)
        if source.startswith(".") and not (ROOT / source).exists()
    }
    assert not missing, f"bind mounts name paths missing from the repository: {sorted(missing)}"


def test_build_context_and_dockerfile_exist_in_repo():
    for name, service in _services().items():
        build = service.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = ROOT / build.get("context", ".")
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert context.is_dir(), f"{name}: build context {context} is not a directory"
        assert dockerfile.is_file(), f"{name}: Dockerfile {dockerfile} does not exist"


def test_dockerfile_installs_pinned_cpu_torch():
    installs = [args for keyword, args in _dockerfile_instructions() if keyword == "RUN"]
    torch_runs = [args for args in installs if TORCH_PIN in args]
    assert torch_runs, f"no RUN in the Dockerfile installs {TORCH_PIN}"
    assert "download.pytorch.org/whl/" in torch_runs[0], (
        "torch should come from the PyTorch wheel index, not PyPI's CUDA build"
    )
    defaults = dict(
        args.partition("=")[::2] for keyword, args in _dockerfile_instructions() if keyword == "ARG"
    )
    assert defaults.get("TORCH_VARIANT") == "cpu", (
        f"the default torch build should be cpu, TORCH_VARIANT is {defaults.get('TORCH_VARIANT')}"
    )


def test_dockerfile_runs_api_as_non_root_on_slim_python():
    instructions = _dockerfile_instructions()
    bases = [args for keyword, args in instructions if keyword == "FROM"]
    users = [args for keyword, args in instructions if keyword == "USER"]
    cmd = [args for keyword, args in instructions if keyword == "CMD"]
    exposed = [args for keyword, args in instructions if keyword == "EXPOSE"]
    assert bases and bases[-1].startswith("python:3.11-slim"), f"base image is {bases}"
    assert users and users[-1] not in {"root", "0"}, f"the image runs as root: USER {users}"
    assert any("8000" in args for args in exposed), f"the image does not EXPOSE 8000: {exposed}"
    assert cmd and "api.main:app" in cmd[-1], f"the default CMD does not run the API: {cmd}"


def test_dockerignore_admits_runtime_files_and_excludes_secrets():
    patterns = [
        line.strip().lstrip("/").removeprefix("**/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "!"))
    ]
    excluded = {
        name for name in IMAGE_NEEDS if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)
    }
    assert not excluded, f".dockerignore keeps files the image needs out: {sorted(excluded)}"
    assert any(fnmatch.fnmatch(".env", pattern) for pattern in patterns), (
        ".dockerignore must keep .env (secrets) out of the build context"
    )


def test_prometheus_scrapes_api_worker_and_flower():
    targets = _prometheus_targets()
    for host, port in SCRAPE_TARGETS.items():
        assert port in targets.get(host, set()), (
            f"ops/prometheus.yml does not scrape {host}:{port}; it scrapes {targets}"
        )
    unknown = set(targets) - set(_services())
    assert not unknown, f"ops/prometheus.yml scrapes hosts that are not services: {unknown}"


def test_prometheus_config_mounted_at_default_path():
    mounts = dict(_volume_mounts(_services()["prometheus"]))
    assert mounts.get("./ops/prometheus.yml") == "/etc/prometheus/prometheus.yml", (
        f"prometheus does not mount ops/prometheus.yml as its config: {mounts}"
    )


def test_grafana_datasource_points_at_prometheus_service():
    config = yaml.safe_load(GRAFANA_DATASOURCES.read_text())
    urls = [source.get("url") for source in config.get("datasources") or []]
    assert "http://prometheus:9090" in urls, f"no Grafana data source for prometheus: {urls}"


def test_prometheus_rule_files_mounted_from_the_repository():
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    rule_files = config.get("rule_files") or []
    assert rule_files, "ops/prometheus.yml loads no alert rules (rule_files)"
    mounted = {target: source for source, target in _volume_mounts(_services()["prometheus"])}
    for rule_file in rule_files:
        target = rule_file if rule_file.startswith("/") else f"{PROMETHEUS_CONFIG_DIR}/{rule_file}"
        assert target in mounted, f"prometheus does not mount {target}: mounts {mounted}"
        assert (ROOT / mounted[target]).is_file(), f"{mounted[target]} is missing"


def test_grafana_mounts_its_dashboards_where_the_provider_reads_them():
    providers = [
        provider
        for path in sorted(GRAFANA_DASHBOARD_PROVIDERS.glob("*.yml"))
        for provider in yaml.safe_load(path.read_text()).get("providers") or []
    ]
    assert providers, "no Grafana dashboard provider under ops/grafana/provisioning/dashboards"
    mounted = {target: source for source, target in _volume_mounts(_services()["grafana"])}
    for provider in providers:
        path = provider["options"]["path"]
        assert path in mounted, f"grafana does not mount the dashboards at {path}: {mounted}"
        dashboards = list((ROOT / mounted[path]).glob("*.json"))
        assert dashboards, f"{mounted[path]} holds no dashboard JSON"
    home = _environment(_services()["grafana"]).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        folder, _, name = home.rpartition("/")
        assert folder in mounted and (ROOT / mounted[folder] / name).is_file(), home


def test_workers_serve_metrics_on_the_port_prometheus_scrapes():
    targets = _prometheus_targets()
    for name in ("worker", "worker-gpu"):
        service = _services()[name]
        environment = _environment(service)
        assert environment.get("LLMQ_WORKER_METRICS_PORT") == str(WORKER_METRICS_PORT), name
        assert environment.get("LLMQ_WORKER_METRICS_HOST") == "0.0.0.0", (
            f"{name} must serve metrics beyond its own loopback for Prometheus to reach them"
        )
        assert str(WORKER_METRICS_PORT) in [str(port) for port in service.get("expose") or []]
        assert WORKER_METRICS_PORT in targets.get(name, set()), f"prometheus skips {name}"


def test_flower_runs_behind_basic_auth_from_settings():
    flower = _services()["flower"]
    command = _command_text(flower)
    environment = _environment(flower)
    assert command.startswith("llmq flower"), f"flower should run `llmq flower`, runs {command!r}"
    assert environment.get("LLMQ_FLOWER_USER") and environment.get("LLMQ_FLOWER_PASSWORD"), (
        "flower needs LLMQ_FLOWER_USER and LLMQ_FLOWER_PASSWORD, or `llmq flower` refuses to start"
    )
    assert environment["LLMQ_FLOWER_PASSWORD"] not in command, "the password shows in `ps`"


def test_api_and_workers_export_traces_to_the_provisioned_trace_backend():
    services = _services()
    assert "jaeger" in services, "no trace backend in the stack"
    for name in ("api", "worker", "worker-gpu"):
        endpoint = urlsplit(_environment(services[name]).get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
        assert (endpoint.hostname, endpoint.port) == ("jaeger", 4318), name
    sources = yaml.safe_load(JAEGER_DATASOURCE.read_text())["datasources"]
    assert [(s["type"], s["url"]) for s in sources] == [("jaeger", "http://jaeger:16686")]
    dashboard = json.loads(DASHBOARD.read_text())
    links = [link["url"] for link in dashboard.get("links", [])]
    assert any("jaeger" in url and "llmq.job" in url for url in links), links
