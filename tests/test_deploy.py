"""The deployment files, checked by parsers: no Docker engine and no cluster needed.

- every YAML file under deploy/ loads;
- deploy/compose.yaml has what compose needs (each service an image or a build, commands
  the CLI accepts, dependencies on services that exist and can satisfy their condition),
  and its GOVFLOW_* variables are settings govflow knows, with values it accepts;
- each manifest under deploy/k8s/ has the fields its kind requires, and the KEDA
  ScaledObject watches the streams and group govflow really uses;
- deploy/Dockerfile parses into stages, its final stage runs as a non-root user without
  build tools, and everything it copies exists in the repository.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import msgspec
import pytest
import typer
import yaml
from typer.core import TyperGroup

from govflow.cli.app import app
from govflow.consumers.matching import matches
from govflow.runtime.worker import parse_roles
from govflow.schemas.codec import decode_workflow
from govflow.schemas.events import Change, new_event
from govflow.schemas.keys import GROUP_OF
from govflow.schemas.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"

SETTING_NAMES = frozenset(f"GOVFLOW_{name.upper()}" for name in Settings.__struct_fields__)
# Commands the deploy files may run before the CLI has them. Once a command is
# registered, its arguments are checked like the others'.
NOT_YET_BUILT = frozenset({"serve"})
BUILD_TOOLS = ("build-essential", "gcc", "g++", "clang", "make", "cmake", "python3-dev")
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def yaml_files() -> list[Path]:
    """Every YAML file under deploy/, less installed node packages."""
    return sorted(
        path
        for pattern in ("*.yaml", "*.yml")
        for path in DEPLOY.rglob(pattern)
        if "node_modules" not in path.parts
    )


def load_all(path: Path) -> list[Any]:
    """The documents of a YAML file, empty ones dropped."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# --- the command line -------------------------------------------------------------------

CLI = typer.main.get_command(app)


def check_command(argv: list[str]) -> typer.Context | None:
    """Parse ``argv`` (``govflow`` included) as the CLI would; fail on what it would refuse.

    Returns:
        The command's parsed context, or None for a command in ``NOT_YET_BUILT``.
    """
    assert argv[:1] == ["govflow"], f"{argv} does not run govflow"
    command: Any = CLI
    group_ctx = typer.Context(CLI, info_name="govflow")
    rest = argv[1:]
    path = ["govflow"]
    while isinstance(command, TyperGroup):
        assert rest, f"{' '.join(argv)}: no subcommand after {' '.join(path)}"
        name, rest = rest[0], rest[1:]
        found = command.get_command(group_ctx, name)
        if found is None:
            missing = f"no command {' '.join([*path, name])}"
            assert len(path) == 1, missing
            assert name in NOT_YET_BUILT, missing
            return None
        path.append(name)
        if isinstance(found, TyperGroup):
            group_ctx = typer.Context(found, info_name=name, parent=group_ctx)
        command = found
    try:
        ctx = command.make_context(path[-1], list(rest), parent=group_ctx)
    except typer.TyperException as e:  # typer's own click: UsageError, BadParameter...
        raise AssertionError(f"govflow refuses {' '.join(argv[1:])}: {e}") from e
    if path[1:] == ["run"]:
        parse_roles(ctx.params["role"] or ["all"])
    parsed: typer.Context = ctx
    return parsed


def roles_of(argv: list[str]) -> frozenset[str]:
    """The roles a ``govflow run`` command line runs; empty for any other command."""
    ctx = check_command(argv)
    if ctx is None or argv[1] != "run":
        return frozenset()
    return parse_roles(ctx.params["role"] or ["all"])


def check_settings(env: Mapping[str, str], where: str) -> Settings:
    """The environment's GOVFLOW_* names are settings, and govflow accepts their values."""
    unknown = sorted(k for k in env if k.startswith("GOVFLOW_") and k not in SETTING_NAMES)
    assert not unknown, f"{where}: govflow knows no setting {', '.join(unknown)}"
    return Settings.from_env(env)


# --- every YAML file --------------------------------------------------------------------


def test_deploy_holds_the_files_the_issue_asks_for() -> None:
    assert DOCKERFILE.is_file()
    assert COMPOSE.is_file()
    assert len(list(K8S.glob("*.yaml"))) >= 5
    assert (DEPLOY / "SCALING.md").is_file()


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_loads(path: Path) -> None:
    assert load_all(path), f"{path} holds no document"


# --- compose.yaml -----------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


def interpolate(value: str) -> str:
    """Resolve ``${NAME:-default}`` as compose does with NAME unset; ``$$`` is a ``$``."""
    return _VARIABLE.sub(lambda m: m.group(2) or "", value).replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_all(COMPOSE)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose.get("services")
    assert isinstance(found, dict), "compose.yaml has no services"
    assert found, "compose.yaml has no services"
    return found


def govflow_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services built from deploy/Dockerfile."""
    return {
        name: svc
        for name, svc in services.items()
        if isinstance(svc.get("build"), dict)
        and svc["build"].get("dockerfile") == "deploy/Dockerfile"
    }


def service_argv(service: dict[str, Any]) -> list[str]:
    """The process a govflow service runs: the image's ENTRYPOINT, then ``command``."""
    command = service.get("command")
    assert isinstance(command, list), "a govflow service's command is a list (no shell)"
    assert all(isinstance(a, str) for a in command), command
    entrypoint = service.get("entrypoint", json.loads(final_stage()["ENTRYPOINT"][-1]))
    return [*entrypoint, *(interpolate(a) for a in command)]


def service_env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    assert isinstance(environment, dict), "environment is a mapping"
    return {k: interpolate(str(v)) for k, v in environment.items()}


def test_compose_services_have_an_image_or_a_build(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"service {name} has neither image nor build"
        if isinstance(build := svc.get("build"), dict):
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context == ROOT, f"{name} builds from {context}, not the repository root"
            assert (context / build["dockerfile"]).is_file()


def test_compose_runs_every_role_the_migration_the_workflows_and_the_api(
    services: dict[str, dict[str, Any]],
) -> None:
    ours = govflow_services(services)
    assert len(ours) >= 6
    roles: set[str] = set()
    verbs: dict[str, str] = {}
    for name, svc in ours.items():
        argv = service_argv(svc)
        roles |= roles_of(argv)
        verbs[name] = argv[1]
    assert roles == {"triggers", "actions", "relay"}
    assert "migrate" in verbs.values()
    assert "workflows" in verbs.values()
    (api,) = [name for name, verb in verbs.items() if verb == "serve"]
    argv = service_argv(ours[api])
    port = argv[argv.index("--port") + 1]
    assert argv[argv.index("--host") + 1] == "0.0.0.0", "the API must listen beyond loopback"
    assert any(str(p).endswith(f":{port}") for p in ours[api]["ports"])
    assert "healthcheck" in ours[api]


def test_compose_dependencies_exist_and_can_be_met(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        depends = svc.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on with conditions, as a mapping"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on {target}, which is not a service"
            condition = spec["condition"]
            assert condition in DEPENDS_CONDITIONS, f"{name} -> {target}: {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is not one-shot"
    # No cycle: compose could start nothing.
    order: list[str] = []
    while len(order) < len(services):
        ready = [
            n
            for n, s in services.items()
            if n not in order and set(s.get("depends_on", {})) <= set(order)
        ]
        assert ready, f"depends_on has a cycle among {sorted(set(services) - set(order))}"
        order += ready


def test_compose_migrates_once_before_anything_uses_the_database(
    services: dict[str, dict[str, Any]],
) -> None:
    ours = govflow_services(services)
    (migrate,) = [n for n, s in ours.items() if service_argv(s)[1:] == ["migrate"]]
    assert ours[migrate]["restart"] == "no"
    for name, svc in ours.items():
        if name != migrate:
            condition = svc["depends_on"][migrate]["condition"]
            assert condition == "service_completed_successfully", name


def test_compose_applies_workflow_files_that_exist(services: dict[str, dict[str, Any]]) -> None:
    ours = govflow_services(services)
    (name,) = [n for n, s in ours.items() if service_argv(s)[1:3] == ["workflows", "apply"]]
    svc = ours[name]
    assert svc["restart"] == "no"
    mounts = {}
    for volume in svc["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = COMPOSE.parent / source
    files = service_argv(svc)[3:]
    assert files
    for file in files:
        (target,) = [t for t in mounts if file.startswith(t + "/")]
        local = mounts[target] / file.removeprefix(target + "/")
        assert local.is_file(), f"{name} applies {file}, but {local} does not exist"
    applied = {Path(file).name for file in files}
    examples = {p.name for p in (DEPLOY / "examples").glob("*.yaml")}
    assert applied == examples, f"{name} leaves out {sorted(examples - applied)}"


def test_compose_workers_are_checked_by_their_heartbeat(
    services: dict[str, dict[str, Any]],
) -> None:
    workers = {
        n: s for n, s in govflow_services(services).items() if service_argv(s)[1:2] == ["run"]
    }
    assert workers
    for name, svc in workers.items():
        assert svc.get("healthcheck", {}).get("test") == ["CMD", "govflow", "check"], name


def test_compose_settings_are_known_and_valid(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in govflow_services(services).items():
        settings = check_settings(service_env(svc), f"compose service {name}")
        for url in (settings.redis_url, settings.database_url):
            assert url is not None, f"{name} would start embedded servers"
            host = urlsplit(url).hostname
            assert host in services, f"{name} connects to {host}, which is not a service"


def test_compose_redis_keeps_what_it_acknowledged(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    command = [interpolate(str(a)) for a in redis["command"]]
    options = dict(zip(command[1::2], command[2::2], strict=False))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--maxmemory-policy"] == "noeviction"
    assert services["postgres"]["image"].startswith("postgres:16")


def test_compose_named_volumes_are_declared(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose.get("volumes", {}), f"{name} uses undeclared {source}"


def test_compose_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    """Validate against the Compose Specification's JSON Schema, vendored by check-jsonschema."""
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


# --- Kubernetes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs = [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in load_all(path)
    ]
    assert docs
    return docs


def of_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def pod_specs(manifests: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every Deployment and Job."""
    for m in manifests:
        if m["kind"] in ("Deployment", "Job"):
            yield f"{m['kind']} {m['metadata']['name']}", m["spec"]["template"]["spec"]


def container_env(container: dict[str, Any], manifests: list[dict[str, Any]]) -> dict[str, str]:
    """A container's environment, with ConfigMap and Secret values resolved."""
    configmaps = of_kind(manifests, "ConfigMap")
    secrets = of_kind(manifests, "Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]
        if "secretKeyRef" in ref:
            secret = secrets[ref["secretKeyRef"]["name"]]
            env[var["name"]] = secret["stringData"][ref["secretKeyRef"]["key"]]
        else:
            configmap = configmaps[ref["configMapKeyRef"]["name"]]
            env[var["name"]] = configmap["data"][ref["configMapKeyRef"]["key"]]
    return env


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_all(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_manifests_name_their_kind_and_namespace(manifests: list[dict[str, Any]]) -> None:
    for m in manifests:
        assert m.get("apiVersion"), m
        assert m.get("kind"), m
        assert m["metadata"]["name"], m
        if m["kind"] != "Namespace":
            assert m["metadata"].get("namespace") == "govflow", m["metadata"]["name"]
    assert set(of_kind(manifests, "Namespace")) == {"govflow"}


# The oldest Kubernetes release whose schema the manifests must pass (strict: an unknown
# field is an error). The KEDA kinds are custom resources, checked by hand below.
KUBERNETES_VERSION = "1.30.0"
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication"}


def test_manifests_match_the_kubernetes_schema(manifests: list[dict[str, Any]]) -> None:
    builtin = [m for m in manifests if m["kind"] not in CUSTOM_KINDS]
    assert {m["kind"] for m in builtin} >= {"Deployment", "Job", "Service", "ConfigMap", "Secret"}
    for m in builtin:
        try:
            kubernetes_validate.validate(m, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(map(str, e.path))
            raise AssertionError(
                f"{m['kind']} {m['metadata']['name']}: {where}: {e.message}"
            ) from e


def test_deployments_select_their_own_pods(manifests: list[dict[str, Any]]) -> None:
    deployments = of_kind(manifests, "Deployment")
    assert {"govflow-triggers", "govflow-actions", "govflow-relay", "govflow-api"} <= set(
        deployments
    )
    for name, d in deployments.items():
        selector = d["spec"]["selector"]["matchLabels"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert selector, name
        assert selector.items() <= labels.items(), name
        for other_name, other in deployments.items():
            if other_name != name:
                other_labels = other["spec"]["template"]["metadata"]["labels"]
                assert not selector.items() <= other_labels.items(), (
                    f"{name} would also select the pods of {other_name}"
                )


def test_pods_run_locked_down(manifests: list[dict[str, Any]]) -> None:
    for where, pod in pod_specs(manifests):
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] != 0, where
        for container in pod["containers"]:
            assert container["image"], where
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), where


def test_pods_run_commands_the_cli_accepts_with_known_settings(
    manifests: list[dict[str, Any]],
) -> None:
    roles: set[str] = set()
    for where, pod in pod_specs(manifests):
        for container in pod["containers"]:
            assert "command" not in container, f"{where}: keep the image's ENTRYPOINT"
            argv = [*json.loads(final_stage()["ENTRYPOINT"][-1]), *container["args"]]
            roles |= roles_of(argv)
            settings = check_settings(container_env(container, manifests), where)
            assert settings.database_url is not None, f"{where} would start embedded Postgres"
            if argv[1] in ("run", "serve"):
                assert settings.redis_url is not None, f"{where} would start embedded Redis"
    assert roles == {"triggers", "actions", "relay"}


def service_links(manifests: list[dict[str, Any]], cluster_ip: str) -> dict[str, str]:
    """What the kubelet adds to a pod's environment for the Services of its namespace.

    As ``pkg/kubelet/envvars`` does it: a Service without a cluster IP adds nothing; the
    name is upper-cased with ``-`` made ``_``; IPv6 addresses are bracketed in URLs.
    """
    host = f"[{cluster_ip}]" if ":" in cluster_ip else cluster_ip
    env: dict[str, str] = {}
    for name, service in of_kind(manifests, "Service").items():
        spec = service["spec"]
        if spec.get("clusterIP") == "None" or spec.get("type") == "ExternalName":
            continue
        svc = name.upper().replace("-", "_")
        ports = spec["ports"]
        env[f"{svc}_SERVICE_HOST"] = cluster_ip
        env[f"{svc}_SERVICE_PORT"] = str(ports[0]["port"])
        for port in ports:
            if "name" in port:
                env[f"{svc}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(
                    port["port"]
                )
        for i, port in enumerate(ports):
            protocol = port.get("protocol", "TCP")
            link = f"{protocol.lower()}://{host}:{port['port']}"
            if i == 0:
                env[f"{svc}_PORT"] = link
            each = f"{svc}_PORT_{port['port']}_{protocol.upper()}"
            env[each] = link
            env[f"{each}_PROTO"] = protocol.lower()
            env[f"{each}_PORT"] = str(port["port"])
            env[f"{each}_ADDR"] = cluster_ip
    return env


@pytest.mark.parametrize("cluster_ip", ["10.96.14.7", "fd00:10:96::e7"])
def test_pods_start_with_what_kubernetes_adds_for_services(
    manifests: list[dict[str, Any]], cluster_ip: str
) -> None:
    """Were service links on (they are off), govflow would still read its settings."""
    links = service_links(manifests, cluster_ip)
    assert "GOVFLOW_API_PORT" in links, "the check needs a Service named govflow-…"
    for where, pod in pod_specs(manifests):
        assert pod.get("enableServiceLinks") is False, f"{where}: set enableServiceLinks: false"
        for container in pod["containers"]:
            env = container_env(container, manifests)
            # A container's own env wins over the Service variables, as in the kubelet.
            assert Settings.from_env({**links, **env}) == Settings.from_env(env), where


def test_every_worker_pod_is_probed_by_govflow_check(manifests: list[dict[str, Any]]) -> None:
    """The heartbeat is the workers' only health surface: each worker pod's liveness probe."""
    probed = 0
    for where, pod in pod_specs(manifests):
        for container in pod["containers"]:
            if container["args"][0] != "run":
                continue
            probe = container["livenessProbe"]
            check_command(probe["exec"]["command"])
            assert probe["exec"]["command"] == ["govflow", "check"], where
            # Reading Redis from a new process takes a second or so: more than the default.
            assert probe["timeoutSeconds"] >= 5, where
            # Slower to fail than a heartbeat to go stale (GOVFLOW_HEARTBEAT_INTERVAL x 4).
            assert probe["periodSeconds"] * probe["failureThreshold"] >= 60, where
            probed += 1
    assert probed == 3  # triggers, actions, relay


def test_jobs_restart_as_jobs_must(manifests: list[dict[str, Any]]) -> None:
    jobs = of_kind(manifests, "Job")
    assert "govflow-migrate" in jobs
    for name, job in jobs.items():
        assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure"), name
    (container,) = jobs["govflow-migrate"]["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["migrate"]


def test_the_api_service_reaches_the_api_pods(manifests: list[dict[str, Any]]) -> None:
    service = of_kind(manifests, "Service")["govflow-api"]
    api = of_kind(manifests, "Deployment")["govflow-api"]
    assert (
        service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    )
    (container,) = api["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert port_names == {"http": int(args[args.index("--port") + 1])}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names or port["targetPort"] in port_names.values()
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_keda_scales_the_action_workers_on_their_streams(manifests: list[dict[str, Any]]) -> None:
    (scaled,) = of_kind(manifests, "ScaledObject").values()
    deployments = of_kind(manifests, "Deployment")
    target = scaled["spec"]["scaleTargetRef"]["name"]
    assert target in deployments, f"the ScaledObject scales {target}, which is no Deployment"
    assert "replicas" not in deployments[target]["spec"], "KEDA owns the replica count"
    (container,) = deployments[target]["spec"]["template"]["spec"]["containers"]
    assert roles_of(["govflow", *container["args"]]) == {"actions"}
    env = container_env(container, manifests)
    settings = Settings.from_env(env)
    keys = settings.keys()
    streams = {keys.commands(p) for p in keys.all_partitions()}

    triggers = scaled["spec"]["triggers"]
    assert triggers[0]["type"] == "redis-streams"
    assert "pendingEntriesCount" in triggers[0]["metadata"]
    auths = of_kind(manifests, "TriggerAuthentication")
    secrets = of_kind(manifests, "Secret")
    watched = set()
    for trigger in triggers:
        assert trigger["type"] == "redis-streams"
        meta = trigger["metadata"]
        assert meta["consumerGroup"] == GROUP_OF["commands"]
        watched.add(meta["stream"])
        # KEDA reads addressFromEnv from the target's container, as host:port.
        address = env[meta["addressFromEnv"]] if "addressFromEnv" in meta else meta["address"]
        assert re.fullmatch(r"[\w.\-]+:\d+", address), address
        for number in ("pendingEntriesCount", "lagCount", "activationLagCount"):
            if number in meta:
                assert isinstance(meta[number], str), f"KEDA wants {number} as a string"
                assert meta[number].isdigit(), number
        if "lagCount" in meta:
            assert "activationLagCount" in meta, "KEDA refuses lagCount without it"
        auth = auths[trigger["authenticationRef"]["name"]]
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in secrets[ref["name"]]["stringData"]
    assert watched == streams


# --- Dockerfile -------------------------------------------------------------------------


def dockerfile_stages() -> list[dict[str, Any]]:
    """Instructions grouped by stage: {"name", "base", <INSTRUCTION>: [arguments...]}."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # a comment, also inside a continued instruction, as Docker reads it
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        lines.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []
    for keyword, rest in lines:
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            stage = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append({"name": stage, "base": base})
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].setdefault(keyword, []).append(rest)
    return stages


def final_stage() -> dict[str, Any]:
    return dockerfile_stages()[-1]


def copies(stage: dict[str, Any]) -> Iterator[tuple[str | None, list[str], str]]:
    """(--from stage or None, sources, destination) of each COPY of a stage."""
    for rest in stage.get("COPY", []):
        words = shlex.split(rest)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        source_stage = next((f.partition("=")[2] for f in flags if f.startswith("--from=")), None)
        yield source_stage, paths[:-1], paths[-1]


def test_dockerfile_builds_in_a_builder_stage_with_uv() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    assert builder["name"]
    assert builder["base"] == final["base"] == "python:3.11-slim"
    runs = " ".join(builder["RUN"])
    assert re.search(r"pip install .*\buv==[\d.]+", runs), "uv, pinned, from PyPI"
    syncs = [shlex.split(r) for r in builder["RUN"] if r.startswith("uv sync")]
    assert syncs
    assert all({"--frozen", "--no-dev"} <= set(s) for s in syncs)
    env = dict(w.split("=", 1) for e in builder["ENV"] for w in shlex.split(e))
    assert env["UV_PROJECT_ENVIRONMENT"] == "/app/.venv"


def test_dockerfile_final_stage_is_the_venv_run_by_a_non_root_user() -> None:
    final = final_stage()
    builder = dockerfile_stages()[0]["name"]
    assert list(copies(final)) == [(builder, ["/app/.venv"], "/app/.venv")]
    user = final["USER"][-1].partition(":")[0]
    assert user not in ("root", "0"), "the final stage runs as root"
    if user.isdigit():
        assert int(user) >= 1000
        # The numeric user exists in the image, with a name (ps, logs and files show it).
        assert any(f"--uid {user}" in run for run in final.get("RUN", []))
    for run in final.get("RUN", []):
        assert "pip install" not in run, run
        assert "uv " not in run, run
        if re.search(r"apt-get install|apk add|dnf install|yum install", run):
            tools = [t for t in BUILD_TOOLS if re.search(rf"(^|\s){re.escape(t)}(\s|$)", run)]
            assert not tools, f"the final stage installs build tools: {tools}"
    env = dict(w.split("=", 1) for e in final["ENV"] for w in shlex.split(e))
    assert env["PATH"].startswith("/app/.venv/bin:")
    check_settings({k: v for k, v in env.items() if k.startswith("GOVFLOW_")}, "Dockerfile ENV")


def test_dockerfile_runs_govflow_with_a_default_the_cli_accepts() -> None:
    final = final_stage()
    entrypoint = json.loads(final["ENTRYPOINT"][-1])
    command = json.loads(final["CMD"][-1])
    assert entrypoint == ["govflow"]
    assert command == ["run", "--role", "all"]
    assert roles_of([*entrypoint, *command]) == {"triggers", "actions", "relay"}


def test_dockerfile_copies_files_that_exist_and_the_context_sends() -> None:
    stages = dockerfile_stages()
    names = [s["name"] for s in stages]
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied: set[str] = set()
    for i, stage in enumerate(stages):
        for source_stage, sources, _ in copies(stage):
            if source_stage is not None:
                assert source_stage in names[:i], f"COPY --from={source_stage}: no such stage"
                continue
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert source.rstrip("/") in allowed, f"{source} is not in the build context"
                copied.add(source.rstrip("/"))
    # Everything the wheel is built from: a new package left out would fail at import.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    needed = {*packages, "pyproject.toml", "uv.lock", project["project"]["readme"]}
    assert needed <= copied, f"the builder does not copy {sorted(needed - copied)}"


def test_settings_names_are_what_the_checks_above_rely_on() -> None:
    """A misspelt variable fails the checks: the check itself must refuse one."""
    with pytest.raises(AssertionError, match="GOVFLOW_MAX_ATEMPTS"):
        check_settings({"GOVFLOW_MAX_ATEMPTS": "7"}, "probe")
    with pytest.raises(AssertionError, match="no command govflow launch"):
        check_command(["govflow", "launch"])
    with pytest.raises(AssertionError, match="govflow refuses"):
        check_command(["govflow", "run", "--concurrency", "many"])
    assert msgspec.structs.asdict(check_settings({}, "empty")) == msgspec.structs.asdict(Settings())


# --- the README's first steps -----------------------------------------------------------


def readme_second_terminal() -> list[list[str]]:
    """The commands the README gives for a second terminal, each as argv."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"In a second terminal.*?```sh\n(.*?)```", readme, re.DOTALL)
    assert found, "the README gives no commands for a second terminal"
    lines = found.group(1).replace("\\\n", " ").splitlines()
    return [argv for line in lines if (argv := shlex.split(line, comments=True))]


def test_the_readme_second_terminal_needs_no_uv_and_its_first_event_runs_a_workflow() -> None:
    commands = readme_second_terminal()
    # uv is on PATH only inside make: the second terminal uses the venv make installed.
    assert commands[0] == ["source", ".venv/bin/activate"]
    assert all(argv[0] == "govflow" for argv in commands[1:]), commands
    for argv in commands[1:]:
        check_command(argv)
    publish = next(argv for argv in commands if argv[:2] == ["govflow", "publish"])
    ctx = check_command(publish)
    assert ctx is not None
    event = new_event(
        ctx.params["type"],
        ctx.params["entity_id"],
        data=json.loads(ctx.params["data"]),
        changes=msgspec.json.decode(ctx.params["changes"], type=dict[str, Change]),
    )
    examples = [decode_workflow(p.read_bytes(), str(p)) for p in DEPLOY.glob("examples/*.yaml")]
    assert [wf.name for wf in examples if matches(wf, event)] == ["high-risk-policy-approval"]


def readme_decision_loop() -> list[list[str]]:
    """The commands of the README's loop from publish to decision, each as argv."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"## Approvals and tasks.*?```sh\n(.*?)```", readme, re.DOTALL)
    assert found, "the README shows no loop from publish to decision"
    lines = found.group(1).replace("\\\n", " ").splitlines()
    return [argv for line in lines if (argv := shlex.split(line, comments=True))]


def test_the_readme_loop_from_publish_to_decision_is_five_commands_that_parse() -> None:
    commands = readme_decision_loop()
    assert [argv[1:3] for argv in commands] == [
        ["workflows", "apply"],
        ["publish", "policy.status_changed"],
        ["approvals", "list"],
        ["approvals", "approve"],
        ["executions", "show"],
    ]
    contexts = [check_command(argv) for argv in commands]
    assert None not in contexts
    # The workflow applied is one the event runs, and it waits for an approval.
    applied, publish = contexts[:2]
    assert applied is not None
    assert publish is not None
    (path,) = applied.params["files"]
    workflow = decode_workflow((ROOT / path).read_bytes(), str(path))
    event = new_event(
        publish.params["type"],
        publish.params["entity_id"],
        data=json.loads(publish.params["data"]),
        changes=msgspec.json.decode(publish.params["changes"], type=dict[str, Change]),
    )
    assert matches(workflow, event)
    assert [s.action for s in workflow.specs() if s.wait] == ["create_approval"]
