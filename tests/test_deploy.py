"""
The deployment files: ``Dockerfile``, ``docker-compose.yml``,
``deploy/kubernetes/*.yaml``, ``etc/octoplex.service`` and
``etc/logrotate.d/octoplex``.

CI has no container runtime, Kubernetes or systemd, so none of these files is
built or run there.  These tests tie them to what CI does run instead:

- the image installs and starts Octoplex with the README's quick-start
  commands, which a developer runs by hand, with only the differences a
  container needs (the virtualenv's path; every interface rather than
  127.0.0.1, with the daemon's default listen backlog; no ``--allow-egress
  127.0.0.0/8``), so a change to either one alone fails here;
- the systemd unit runs the same ``twistd ... octoplex`` command;
- every command line they give parses with twistd's and Octoplex's own
  option parsers, the ones the suite tests;
- the YAML parses, and the Kubernetes probes, ports and autoscaler point
  where they should;
- the grace periods, ports, user, log paths and WireMock version agree from
  file to file and with the test suite;
- compose's Prometheus, Grafana and example traffic use the files CI checks
  (deploy/prometheus, deploy/grafana, deploy/traffic.py; see also
  tests/test_dashboard.py) and reach Octoplex where it listens.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import ipaddress
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.python.usage import UsageError
from twisted.scripts.twistd import ServerOptions

from octoplex.tap import CLOSE_GRACE, DEFAULT_LISTEN, Options

from .test_wiremock import ROOT_DIR as WIREMOCK_ROOT_DIR
from .test_wiremock import WIREMOCK_VERSION

try:
    import yaml
except ImportError:  # pragma: no cover - setup.py's test extra installs it
    yaml = None

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
SYSTEMD_UNIT = ROOT / "etc" / "octoplex.service"
LOGROTATE = ROOT / "etc" / "logrotate.d" / "octoplex"
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
TRAFFIC = ROOT / "deploy" / "traffic.py"

#: Where the image and the systemd unit install Octoplex; the quick start's is
#: ``venv`` in the current directory.
VENV = "/opt/octoplex/venv"

#: The quick start's listener and egress option that the image leaves out: a
#: container must listen on all of its interfaces, and the image refuses
#: loopback and private upstreams by default.
LOOPBACK_INTERFACE = "interface=127.0.0.1"
LOOPBACK_EGRESS = ["--allow-egress", "127.0.0.0/8"]

#: Options whose values are files on the machine the daemon runs on: to parse
#: a command here, they are moved into a scratch directory.
FILE_OPTIONS = frozenset({"log-file", "access-log"})


# -- reading the files -------------------------------------------------------


def quick_start() -> list[list[str]]:
    """
    The commands of the README's first ``sh`` block after "## Quick start",
    split at ``&&``: create the virtualenv, install, start the daemon.
    """
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Quick start\n", 1)
    assert len(section) == 2, "README.md has no '## Quick start' section"
    block = re.search(r"^```sh\n(.*?)^```", section[1], re.S | re.M)
    assert block is not None, "README.md's quick start has no ```sh block"
    commands: list[list[str]] = [[]]
    for token in shlex.split(block.group(1)):
        if token == "&&":
            commands.append([])
        else:
            commands[-1].append(token)
    assert len(commands) == 3, f"expected venv && install && start, got {commands}"
    return commands


def relocated(command: list[str]) -> list[str]:
    """
    ``command`` with the quick start's ``venv`` directory moved to
    :data:`VENV` (``python3 -m venv`` keeps its module name).
    """
    moved = []
    for index, token in enumerate(command):
        directory = token == "venv" and command[index - 1 : index] != ["-m"]
        if directory or token.startswith("venv/"):
            token = VENV + token[len("venv") :]
        moved.append(token)
    return moved


def dockerfile() -> list[list[tuple[str, str]]]:
    """
    The Dockerfile's build stages, each a list of ``(INSTRUCTION, arguments)``,
    read as Docker reads them: comment lines dropped (inside a continuation
    too) and continuation lines joined.
    """
    stages: list[list[tuple[str, str]]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append([])
        assert stages, f"Dockerfile: {keyword} before the first FROM"
        stages[-1].append((keyword.upper(), arguments.strip()))
    assert not pending, "Dockerfile ends in a continuation line"
    return stages


def instructions(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [arguments for name, arguments in stage if name == keyword]


def the_one(items: list[Any], what: str) -> Any:
    assert len(items) == 1, f"expected exactly one {what}, found {len(items)}: {items}"
    return items[0]


def image_command() -> list[str]:
    """
    The final stage's ``CMD``, in exec (JSON) form.
    """
    arguments = the_one(instructions(dockerfile()[-1], "CMD"), "CMD in the final stage")
    command = json.loads(arguments)
    assert isinstance(command, list), "the image's CMD must be in exec (JSON) form"
    return command


def systemd_unit() -> dict[str, list[tuple[str, str]]]:
    """
    The unit's sections, each a list of ``(key, value)``: keys may repeat.
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in SYSTEMD_UNIT.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        assert not stripped.endswith("\\"), "keep each setting on one line"
        if stripped.startswith("["):
            current = sections.setdefault(stripped.strip("[]"), [])
            continue
        key, equals, value = stripped.partition("=")
        assert equals and current is not None, f"not a setting: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_setting(key: str) -> str:
    return the_one([value for name, value in systemd_unit()["Service"] if name == key], key)


def unit_command() -> list[str]:
    return shlex.split(unit_setting("ExecStart"))


def option_value(command: list[str], option: str) -> str:
    """
    The value of the one ``option`` in ``command`` (``--x V`` or ``--x=V``).
    """
    values = [
        command[index + 1] if token == option else token.split("=", 1)[1]
        for index, token in enumerate(command)
        if token == option or token.startswith(option + "=")
    ]
    return the_one(values, f"{option} in {command}")


def load_yaml(path: Path) -> list[Any]:
    if yaml is None:
        pytest.fail(
            "PyYAML is not installed: it belongs in setup.py's test extra (pyyaml)",
            pytrace=False,
        )
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def compose() -> dict[str, Any]:
    return the_one(load_yaml(COMPOSE), "document in docker-compose.yml")


def kubernetes() -> dict[str, dict[str, Any]]:
    """
    The Kubernetes objects of ``deploy/kubernetes``, by kind.
    """
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in load_yaml(path):
            assert document["kind"] not in objects, f"two {document['kind']}s"
            objects[document["kind"]] = document
    return objects


def the_container() -> dict[str, Any]:
    spec = kubernetes()["Deployment"]["spec"]["template"]["spec"]
    return the_one(spec["containers"], "container in the Deployment")


def container_port(port: int | str) -> int:
    """
    A probe's or Service's port, a number or the name of a container port.
    """
    if isinstance(port, int):
        return port
    ports = [entry["containerPort"] for entry in the_container()["ports"] if entry["name"] == port]
    return int(the_one(ports, f"container port named {port!r}"))


def endpoint_port(command: list[str]) -> int:
    """
    The port of the one ``--listen tcp:PORT...`` in ``command``.
    """
    kind, port, *_ = option_value(command, "--listen").split(":")
    assert kind == "tcp", command
    return int(port)


# -- (a) the image runs the README's quick start -----------------------------


def test_image_installs_like_the_quick_start() -> None:
    """
    The image's install step is the quick start's, with the virtualenv at
    /opt/octoplex/venv, in one RUN of the same shape.
    """
    create, install, _ = quick_start()
    expected = [*relocated(create), "&&", *relocated(install)]
    runs = [arguments for stage in dockerfile() for arguments in instructions(stage, "RUN")]
    step = the_one([run for run in runs if "pip install" in run], "RUN that installs Octoplex")
    assert shlex.split(step) == expected


def test_image_starts_like_the_quick_start() -> None:
    """
    The image's CMD is the quick start's start command but for the virtualenv,
    with interface=127.0.0.1 dropped from the listener (the daemon's default
    listen backlog added when the README gives none) and with no
    --allow-egress 127.0.0.0/8.
    """
    *_, start = quick_start()
    expected = relocated(start)
    at = [i for i in range(len(expected) - 1) if expected[i : i + 2] == LOOPBACK_EGRESS]
    assert len(at) == 1, f"the quick start should pass {' '.join(LOOPBACK_EGRESS)} once"
    del expected[at[0] : at[0] + 2]
    listen = expected.index("--listen") + 1
    parts = expected[listen].split(":")
    assert LOOPBACK_INTERFACE in parts, f"the quick start should listen on {LOOPBACK_INTERFACE}"
    parts.remove(LOOPBACK_INTERFACE)
    if not any(part.startswith("backlog=") for part in parts):
        parts += [part for part in DEFAULT_LISTEN.split(":") if part.startswith("backlog=")]
    expected[listen] = ":".join(parts)
    assert image_command() == expected


def test_image_writes_the_plugin_cache_as_root() -> None:
    """
    The twisted plugin cache is written, by the virtualenv's Python, after the
    install and before any USER, and the final stage gets that virtualenv.
    """
    stages = dockerfile()
    found = [
        (index, stage)
        for index, stage in enumerate(stages)
        if any("getPlugins(IPlugin)" in run for run in instructions(stage, "RUN"))
    ]
    index, stage = the_one(found, "stage that writes the plugin cache")
    names = [name for name, _ in stage]
    [run_at] = [
        at for at, (name, arguments) in enumerate(stage) if "getPlugins(IPlugin)" in arguments
    ]
    install_at = the_one(
        [at for at, (name, arguments) in enumerate(stage) if "pip install" in arguments],
        "install in that stage",
    )
    assert install_at < run_at
    assert "USER" not in names[:run_at], "the plugin cache must be written as root"
    python, flag, code = shlex.split(stage[run_at][1])
    assert (python, flag) == (f"{VENV}/bin/python", "-c")
    compile(code, "<plugin cache>", "exec")
    if index != len(stages) - 1:
        copies = [shlex.split(copy) for copy in instructions(stages[-1], "COPY")]
        assert any(copy[-2:] == [VENV, VENV] for copy in copies if copy[0].startswith("--from="))


def test_image_runs_as_a_non_root_user_on_python_slim() -> None:
    """Every stage starts from python:3.11-slim; the final one runs as a numeric non-root user."""
    stages = dockerfile()
    for stage in stages:
        assert stage[0][1].split()[0] == "python:3.11-slim"
    final = stages[-1]
    users = [at for at, (name, _) in enumerate(final) if name == "USER"]
    assert users, "the final stage has no USER"
    user = final[users[-1]][1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: a numeric uid other than 0"
    assert "RUN" not in [name for name, _ in final[users[-1] :]]


# -- (d) the image's health check --------------------------------------------


def test_image_healthcheck_asks_healthz_with_python() -> None:
    """HEALTHCHECK runs the virtualenv's Python (the slim image has no curl) against /healthz."""
    final = dockerfile()[-1]
    healthcheck = the_one(instructions(final, "HEALTHCHECK"), "HEALTHCHECK")
    _, _, arguments = healthcheck.partition("CMD ")
    python, flag, code = json.loads(arguments)
    assert (python, flag) == (f"{VENV}/bin/python", "-c")
    compile(code, "<healthcheck>", "exec")
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/[^'\"]*)", code)
    assert url is not None, code
    assert url.group(2) == "/healthz"
    exposed = the_one(instructions(final, "EXPOSE"), "EXPOSE")
    assert int(url.group(1)) == int(exposed) == endpoint_port(image_command())


# -- (b) the systemd unit and logrotate --------------------------------------


def test_systemd_unit_runs_the_quick_start_command() -> None:
    """
    ExecStart is the quick start's twistd command in /opt/octoplex/venv: the
    same twistd options and the octoplex subcommand, its options following.
    """
    *_, start = quick_start()
    expected = relocated(start)
    prefix = expected[: expected.index("octoplex") + 1]
    command = unit_command()
    assert command[: len(prefix)] == prefix
    assert endpoint_port(command) == endpoint_port(image_command())


def test_systemd_unit_install_matches_the_image() -> None:
    """The install the unit's comment gives is the image's, plugin cache included."""
    text = SYSTEMD_UNIT.read_text(encoding="utf-8")
    runs = [arguments for stage in dockerfile() for arguments in instructions(stage, "RUN")]
    for step in (run for run in runs if "pip install" in run or "getPlugins" in run):
        assert step in text, f"etc/octoplex.service should say how to: {step}"


def test_logrotate_rotates_the_units_logs() -> None:
    """logrotate rotates the files the unit logs to, and signals the unit's main process."""
    text = LOGROTATE.read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if not line.strip().startswith("#")]
    start = the_one([i for i, line in enumerate(lines) if line.endswith("{")], "log file block")
    # The block's paths may run over several lines before its "{".
    first = max(i for i in range(start) if not lines[i]) + 1 if "" in lines[:start] else 0
    paths = " ".join(lines[first : start + 1])[:-1].split()
    command = unit_command()
    logs = {option_value(command, "--log-file"), option_value(command, "--access-log")}
    # The master's files, and each worker's (the path suffixed .worker-I):
    # every worker number of up to three digits, and never a rotated file.
    assert logs <= set(paths)
    for worker in ("0", "7", "15", "127"):
        for log in logs:
            assert any(fnmatch.fnmatchcase(f"{log}.worker-{worker}", p) for p in paths), worker
    for rotated in (".worker-0-20261207", ".worker-0.1", ".worker-12.gz", ".1", "-20261207"):
        for log in logs:
            assert not any(fnmatch.fnmatchcase(log + rotated, p) for p in paths), rotated
    assert "copytruncate" not in lines
    script = text[text.index("postrotate") : text.index("endscript")]
    assert "kill -USR1" in script
    assert SYSTEMD_UNIT.name in script


# -- (c) YAML: compose and Kubernetes ----------------------------------------


def yaml_files() -> Iterator[Path]:
    for pattern in ("*.yml", "*.yaml"):
        for path in ROOT.rglob(pattern):
            parts = path.relative_to(ROOT).parts
            if not any(part.startswith(".") or part in ("build", "dist") for part in parts):
                yield path


def test_every_yaml_file_parses() -> None:
    """Every YAML file of the repository parses; the deployment ones are among them."""
    paths = sorted(yaml_files())
    names = {path.relative_to(ROOT).as_posix() for path in paths}
    assert {"docker-compose.yml", "deploy/kubernetes/deployment.yaml"} <= names
    for path in paths:
        assert load_yaml(path), f"{path} is empty"


def compose_metrics_port() -> int:
    """
    The port of compose's ``--metrics-listen tcp:PORT`` (on every interface
    of the container: Prometheus reaches it over the compose network).
    """
    command = compose()["services"]["octoplex"]["command"]
    kind, port = option_value(command, "--metrics-listen").split(":")
    assert kind == "tcp", command
    return int(port)


def test_compose_runs_the_image_with_wiremock() -> None:
    """
    Compose runs the image's command plus --allow-egress for exactly its own
    network and --metrics-listen for Prometheus, next to the WireMock version
    and stubs the test suite uses.
    """
    services = compose()["services"]
    octoplex, wiremock = services["octoplex"], services["wiremock"]
    [subnet] = [entry["subnet"] for entry in compose()["networks"]["octoplex"]["ipam"]["config"]]
    assert ipaddress.ip_network(subnet).is_private
    metrics = f"tcp:{compose_metrics_port()}"
    assert octoplex["command"] == [
        *image_command(),
        "--allow-egress",
        subnet,
        "--metrics-listen",
        metrics,
    ]
    # The master of several workers keeps their statistics sockets in /tmp,
    # on a read-only root filesystem.
    assert octoplex["read_only"] is True
    assert "/tmp" in octoplex["tmpfs"]
    assert octoplex["ports"] == [f"127.0.0.1:8080:{endpoint_port(image_command())}"]
    assert wiremock["image"] == f"wiremock/wiremock:{WIREMOCK_VERSION}"
    mount = f"./{WIREMOCK_ROOT_DIR.relative_to(ROOT).as_posix()}:/home/wiremock:ro"
    assert wiremock["volumes"] == [mount]
    assert (WIREMOCK_ROOT_DIR / "mappings").is_dir()


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """
    A compose service's bind mounts of this repository: container path to
    the path here (each must exist).
    """
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        assert source.startswith("./"), f"{volume}: a path of this repository"
        path = ROOT / source
        assert path.exists(), f"{volume}: {path} does not exist"
        found[target] = path
    return found


def in_container(service: dict[str, Any], path: str) -> Path:
    """The file of this repository that ``service`` sees at ``path``."""
    for target, source in mounts(service).items():
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source / Path(path).relative_to(target)
    raise AssertionError(f"{path} is not mounted from this repository: {service}")


def test_compose_prometheus_scrapes_octoplex_with_the_rules() -> None:
    """
    Prometheus reads deploy/prometheus/prometheus.yml, which scrapes the
    octoplex service's --metrics-listen port and loads deploy/prometheus/alerts.yml.
    """
    services = compose()["services"]
    prometheus = services["prometheus"]
    config_path = option_value(prometheus["command"], "--config.file")
    config_file = in_container(prometheus, config_path)
    assert config_file == PROMETHEUS / "prometheus.yml"
    config = the_one(load_yaml(config_file), "document in prometheus.yml")
    rules = [config_file.parent / name for name in config["rule_files"]]
    assert rules == [PROMETHEUS / "alerts.yml"]
    [job] = config["scrape_configs"]
    [static] = job["static_configs"]
    assert static["targets"] == [f"octoplex:{compose_metrics_port()}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_compose_grafana_loads_the_dashboard_from_prometheus() -> None:
    """
    Grafana's provisioning (mounted from deploy/grafana/provisioning) points
    its one data source at the prometheus service, and its dashboard provider
    at the directory where deploy/grafana/octoplex.json is mounted.
    """
    services = compose()["services"]
    grafana = services["grafana"]
    provisioning = in_container(grafana, "/etc/grafana/provisioning")
    assert provisioning == GRAFANA / "provisioning"
    [datasources] = load_yaml(provisioning / "datasources" / "prometheus.yml")
    [source] = datasources["datasources"]
    assert (source["type"], source["url"]) == ("prometheus", "http://prometheus:9090")
    assert "prometheus" in services
    config = the_one(load_yaml(PROMETHEUS / "prometheus.yml"), "document in prometheus.yml")
    assert source["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]
    [dashboards] = load_yaml(provisioning / "dashboards" / "octoplex.yml")
    [provider] = dashboards["providers"]
    folder = provider["options"]["path"]
    assert in_container(grafana, f"{folder}/octoplex.json") == GRAFANA / "octoplex.json"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert in_container(grafana, home) == GRAFANA / "octoplex.json"


def test_compose_traffic_calls_octoplex_and_wiremock() -> None:
    """
    The traffic service runs deploy/traffic.py, bounded in time, against the
    octoplex service's listener and WireMock; its command line parses.
    """
    services = compose()["services"]
    traffic = services["traffic"]
    assert traffic["image"] == services["octoplex"]["image"]
    python, script, *arguments = traffic["command"]
    assert python == "python", "the image's Python (its virtualenv is first on the PATH)"
    assert in_container(traffic, script) == TRAFFIC
    spec = importlib.util.spec_from_file_location("traffic", TRAFFIC)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    options = module.arguments().parse_args(arguments)
    port = endpoint_port(services["octoplex"]["command"])
    assert options.octoplex == f"http://octoplex:{port}"
    assert options.upstream == "http://wiremock:8080"
    assert 0 < options.duration <= 24 * 3600
    assert traffic["restart"] == "no"


def test_kubernetes_probes_and_ports() -> None:
    """Readiness asks /readyz and liveness /healthz, on the port the image listens on."""
    container = the_container()
    port = endpoint_port(image_command())
    assert [entry["containerPort"] for entry in container["ports"]] == [port]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        check = container[probe]["httpGet"]
        assert check["path"] == path, probe
        assert container_port(check["port"]) == port, probe
    service = kubernetes()["Service"]
    template = kubernetes()["Deployment"]["spec"]["template"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    [service_port] = service["spec"]["ports"]
    assert container_port(service_port["targetPort"]) == port


def test_kubernetes_autoscaler_targets_the_deployment() -> None:
    """The HorizontalPodAutoscaler scales the Deployment on CPU."""
    objects = kubernetes()
    autoscaler = objects["HorizontalPodAutoscaler"]
    target = autoscaler["spec"]["scaleTargetRef"]
    deployment = objects["Deployment"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    [metric] = autoscaler["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    resources = the_container()["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= resources[kind].keys(), kind


def test_kubernetes_runs_the_image_user_read_only() -> None:
    """Non-root (the image's uid) on a read-only root filesystem, without privilege escalation."""
    pod = kubernetes()["Deployment"]["spec"]["template"]["spec"]
    container = the_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    user = the_one(instructions(dockerfile()[-1], "USER"), "USER")
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_grace_periods_outlast_the_drain(tmp_path: Path) -> None:
    """
    systemd, Kubernetes and compose wait the same time between SIGTERM and
    SIGKILL, longer than each one's drain (--drain-delay, --drain-timeout,
    the flush of the last answers, and Kubernetes' preStop pause).
    """
    pod = kubernetes()["Deployment"]["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert unit_setting("TimeoutStopSec") == str(grace)
    assert unit_setting("KillSignal") == "SIGTERM"
    assert compose()["services"]["octoplex"]["stop_grace_period"] == f"{grace}s"
    pre_stop = the_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    for where, command in commands():
        options = parse_command(command, tmp_path).subOptions
        drain = options["drain-delay"] + options["drain-timeout"] + CLOSE_GRACE
        if where in ("Dockerfile CMD", "deploy/kubernetes"):
            drain += int(pre_stop[1])
        assert grace > drain, f"{where}: {grace} s to drain for up to {drain} s"


# -- (e) every option given to octoplex exists --------------------------------


def known_options() -> set[str]:
    return {option.rstrip("=") for option in Options().longOpt}


def commands() -> Iterator[tuple[str, list[str]]]:
    """
    Every ``twistd ... octoplex ...`` command line the deployment files give.
    """
    yield "Dockerfile CMD", image_command()
    yield "docker-compose.yml", compose()["services"]["octoplex"]["command"]
    yield "etc/octoplex.service ExecStart", unit_command()
    container = the_container()
    if "command" in container or "args" in container:
        yield "deploy/kubernetes", [*container.get("command", []), *container.get("args", [])]


def test_option_checks_find_the_commands() -> None:
    """The option check below sees all the command lines, the octoplex subcommand in each."""
    found = dict(commands())
    assert {
        "Dockerfile CMD",
        "docker-compose.yml",
        "etc/octoplex.service ExecStart",
    } <= found.keys()
    for where, command in found.items():
        assert "octoplex" in command, where


def parse_command(command: list[str], scratch: Path) -> ServerOptions:
    """
    Parse ``command`` as twistd does, and return twistd's options (Octoplex's
    are its ``subOptions``).  The files of :data:`FILE_OPTIONS` are opened
    in ``scratch`` instead, and closed again.
    """
    known = known_options()
    arguments = command[1:]
    subcommand = arguments.index("octoplex")
    kept = arguments[: subcommand + 1]
    rest = iter(arguments[subcommand + 1 :])
    for token in rest:
        assert token.startswith("--"), f"{token!r} is not an option"
        name, equals, value = token[2:].partition("=")
        takes_value = f"{name}=" in Options().longOpt
        if takes_value and not equals:
            value = next(rest)
        assert name in known, f"octoplex has no option --{name}"
        if name in FILE_OPTIONS:
            value = str(scratch / Path(value).name)
        kept += [f"--{name}", value] if takes_value else [token]
    config = ServerOptions()
    config.parseOptions(kept)
    logs = config.subOptions.get("logs")
    if logs is not None:
        logs.close()
    return config


def test_options_exist_and_parse(tmp_path: Path) -> None:
    """
    Every option the deployment files give octoplex is one of
    octoplex.tap.Options', and
    each whole command line parses as twistd parses it: the README's
    twistd options, then the octoplex subcommand.
    """
    for where, command in commands():
        assert command[0] == f"{VENV}/bin/twistd", where
        try:
            config = parse_command(command, tmp_path)
        except (AssertionError, UsageError) as e:
            pytest.fail(f"{where}: {e}", pytrace=False)
        assert config.subCommand == "octoplex", where
        assert config["nodaemon"], where
        assert config["pidfile"] == "", where


def test_logrotate_alone_rotates_the_units_logs(tmp_path: Path) -> None:
    """The unit tells the daemon not to rotate the files that logrotate rotates."""
    options = parse_command(unit_command(), tmp_path).subOptions
    assert options["log-max-bytes"] == 0
