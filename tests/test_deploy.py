"""deploy/: compose, Kubernetes manifests and Dockerfiles parse, follow their schemas and agree
with the code (ports, flags, files). Docker and kubectl are not needed."""

import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ROLES = {"gateway": 50051, "encoder": 50052, "generator": 50053, "decoder": 50054}
GPU_ROLES = ("encoder", "generator", "decoder")

# --- compose -------------------------------------------------------------------------------

# The part of the Compose Specification this project uses, written strictly: a misspelt key
# (e.g. "healtcheck", "restart_policy" at service level) fails here as `docker compose config` would.
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(us|ms|s|m|h))+$"}
_STR_LIST = {"type": "array", "items": {"type": "string"}}
_ENV = {
    "oneOf": [{"type": "object", "additionalProperties": {"type": ["string", "number", "boolean", "null"]}}, _STR_LIST]
}
COMPOSE_SCHEMA = {
    "type": "object",
    "required": ["services"],
    "additionalProperties": False,
    "patternProperties": {"^x-": {}},
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$"},
        "services": {"type": "object", "minProperties": 1, "additionalProperties": {"$ref": "#/$defs/service"}},
        "networks": {
            "type": "object",
            "additionalProperties": {
                "type": ["object", "null"],
                "additionalProperties": False,
                "properties": {"driver": {"type": "string"}, "internal": {"type": "boolean"}},
            },
        },
        "volumes": {"type": "object"},
    },
    "$defs": {
        "service": {
            "type": "object",
            "additionalProperties": False,
            "patternProperties": {"^x-": {}},
            "properties": {
                "image": {"type": "string"},
                "build": {"type": ["string", "object"]},
                "command": {"oneOf": [{"type": "string"}, _STR_LIST]},
                "entrypoint": {"oneOf": [{"type": "string"}, _STR_LIST]},
                "environment": _ENV,
                "env_file": {"oneOf": [{"type": "string"}, _STR_LIST]},
                "ports": {"type": "array", "items": {"type": ["string", "integer"]}},
                "expose": {"type": "array"},
                "volumes": {"type": "array", "items": {"type": "string"}},
                "networks": {"oneOf": [_STR_LIST, {"type": "object"}]},
                "restart": {"enum": ["no", "always", "on-failure", "unless-stopped"]},
                "stop_grace_period": _DURATION,
                "stop_signal": {"type": "string"},
                "shm_size": {"type": ["string", "integer"]},
                "ipc": {"type": "string"},
                "profiles": _STR_LIST,
                "logging": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"driver": {"type": "string"}, "options": {"type": "object"}},
                },
                "healthcheck": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["test"],
                    "properties": {
                        "test": {"oneOf": [{"type": "string"}, _STR_LIST]},
                        "interval": _DURATION,
                        "timeout": _DURATION,
                        "retries": {"type": "integer"},
                        "start_period": _DURATION,
                        "start_interval": _DURATION,
                        "disable": {"type": "boolean"},
                    },
                },
                "depends_on": {
                    "oneOf": [
                        _STR_LIST,
                        {
                            "type": "object",
                            "additionalProperties": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["condition"],
                                "properties": {
                                    "condition": {
                                        "enum": ["service_started", "service_healthy", "service_completed_successfully"]
                                    },
                                    "required": {"type": "boolean"},
                                    "restart": {"type": "boolean"},
                                },
                            },
                        },
                    ]
                },
                "deploy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "replicas": {"type": "integer"},
                        "resources": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "limits": {"type": "object"},
                                "reservations": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "cpus": {"type": ["string", "number"]},
                                        "memory": {"type": "string"},
                                        "devices": {
                                            "type": "array",
                                            "items": {
                                                "type": "object",
                                                "additionalProperties": False,
                                                "required": ["capabilities"],
                                                "properties": {
                                                    "driver": {"type": "string"},
                                                    "count": {"oneOf": [{"type": "integer"}, {"const": "all"}]},
                                                    "device_ids": _STR_LIST,
                                                    "capabilities": _STR_LIST,
                                                    "options": {"type": "object"},
                                                },
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value, env):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} substitution."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m):
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op in (":?", "?"):
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return _VAR.sub(sub, value)


@pytest.fixture(scope="module")
def compose_raw():
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def compose(compose_raw):
    env = {"AVATAR_AUTH_TOKEN": "t-public", "AVATAR_INTERNAL_TOKEN": "t-internal"}
    return interpolate(compose_raw, env)


def _flags(args):
    """--name=value / --name value pairs of a command line as a dict."""
    out, args = {}, list(args)
    for i, a in enumerate(args):
        if a.startswith("--"):
            k, eq, v = a[2:].partition("=")
            out[k] = v if eq else (args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else True)
    return out


def test_compose_follows_the_schema(compose):
    jsonschema.validate(compose, COMPOSE_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):  # the schema does catch typos
        bad = yaml.safe_load(yaml.safe_dump(compose))
        bad["services"]["gateway"]["healtcheck"] = bad["services"]["gateway"].pop("healthcheck")
        jsonschema.validate(bad, COMPOSE_SCHEMA)


def test_compose_secrets_are_required_from_the_environment(compose_raw):
    with pytest.raises(KeyError, match="AVATAR_INTERNAL_TOKEN"):
        interpolate(compose_raw, {"AVATAR_AUTH_TOKEN": "x"})
    text = (DEPLOY / "docker-compose.yml").read_text()
    for key in ("AVATAR_AUTH_TOKEN", "AVATAR_INTERNAL_TOKEN"):
        assert re.search(rf"{key}: \$\{{{key}:\?", text), f"{key} must come from the environment"


def test_compose_has_every_service_wired(compose, compose_raw):
    services = compose["services"]
    for name, svc in compose_raw["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), f"{name} mounts missing {src}"
    assert {"gateway", *GPU_ROLES, "otel-collector", "jaeger"} <= set(services)
    for name, svc in services.items():
        assert svc.get("restart") in ("always", "unless-stopped", "on-failure"), name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
    for role, port in ROLES.items():
        svc = services[role]
        cmd = svc["command"]
        assert cmd[0] == "serve"
        flags = _flags(cmd)
        assert flags["role"] == role
        assert flags["listen"] == f"0.0.0.0:{port}"
        assert svc["healthcheck"]["test"][-1] == f"127.0.0.1:{port}"
        assert "avatar.app.healthcheck" in svc["healthcheck"]["test"]
        assert flags["metrics-port"] == "9100"
        assert svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://otel-collector:4317")
        assert svc["environment"]["AVATAR_INTERNAL_TOKEN"] == "t-internal"
    gw = _flags(services["gateway"]["command"])
    for role in GPU_ROLES:
        host, port = gw[role].rsplit(":", 1)
        assert host in services and int(port) == ROLES[role]
    assert services["gateway"]["environment"]["AVATAR_AUTH_TOKEN"] == "t-public"
    # only the gateway is published; internal services stay on the mesh network
    for role in GPU_ROLES:
        assert not services[role].get("ports"), f"{role} must not be published"
    assert [p for p in services["gateway"]["ports"] if str(p).endswith(":50051")]


def test_compose_reserves_gpus_and_runs_a_torchrun_generator(compose):
    services = compose["services"]
    for role in GPU_ROLES:
        devices = services[role]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    multi = services["generator-multi"]
    assert multi["profiles"] == ["multi-gpu"]
    cmd = multi["command"]
    assert cmd[0] == "torchrun" and "--no-python" in cmd
    serve = cmd[cmd.index("avatar") + 1 :]
    assert serve[0] == "serve" and _flags(serve)["role"] == "generator"
    assert multi["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    assert "gateway" not in [d for d in services["gateway"]["depends_on"] if d.startswith("generator-")]


def test_otel_collector_config_is_consistent():
    for path in (DEPLOY / "otel-collector.yaml",):
        cfg = yaml.safe_load(path.read_text())
        _check_collector(cfg)
    k8s = [
        d for d in yaml.safe_load_all((DEPLOY / "k8s" / "otel-collector.yaml").read_text()) if d["kind"] == "ConfigMap"
    ][0]
    _check_collector(yaml.safe_load(k8s["data"]["config.yaml"]))
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(t.split(":")[0] for t in targets) == sorted(ROLES)


def _check_collector(cfg):
    assert "otlp" in cfg["receivers"]
    assert cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    for name, pipe in cfg["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for item in pipe.get(kind, []):
                assert item in cfg[kind], f"pipeline {name} uses undefined {kind[:-1]} {item}"
    assert any(
        e.startswith("otlp") and "jaeger" in cfg["exporters"][e]["endpoint"]
        for e in cfg["service"]["pipelines"]["traces"]["exporters"]
    )


# --- kubernetes ----------------------------------------------------------------------------

API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Service": "v1",
    "PersistentVolumeClaim": "v1",
    "Deployment": "apps/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
}
OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata"],
    "properties": {
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        }
    },
}
PROBE = {
    "type": "object",
    "required": ["grpc"],
    "properties": {
        "grpc": {
            "type": "object",
            "required": ["port"],
            "additionalProperties": False,
            "properties": {"port": {"type": "integer"}, "service": {"type": "string"}},
        },
        "periodSeconds": {"type": "integer", "minimum": 1},
        "failureThreshold": {"type": "integer", "minimum": 1},
        "timeoutSeconds": {"type": "integer", "minimum": 1},
        "initialDelaySeconds": {"type": "integer"},
    },
}
CONTAINER_SCHEMA = {
    "type": "object",
    "required": ["name", "image", "ports", "readinessProbe", "livenessProbe", "resources"],
    "properties": {
        "readinessProbe": PROBE,
        "livenessProbe": PROBE,
        "startupProbe": PROBE,
        "args": {"type": "array", "items": {"type": "string"}},
        "command": {"type": "array", "items": {"type": "string"}},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
    },
}


def _k8s_docs(name):
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


@pytest.fixture(scope="module")
def k8s():
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    docs = {}
    for res in kust["resources"]:
        assert (DEPLOY / "k8s" / res).is_file(), f"kustomization lists missing {res}"
        docs[res] = _k8s_docs(res)
    listed = set(kust["resources"]) | {"kustomization.yaml", "generator-multigpu.yaml"}
    assert {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} == listed, "every manifest is listed or an alternative"
    return docs


def _all(k8s, kind=None):
    return [d for docs in k8s.values() for d in docs if kind is None or d["kind"] == kind]


def test_k8s_objects_have_known_kinds_and_api_versions(k8s):
    docs = _all(k8s) + _k8s_docs("generator-multigpu.yaml")
    for d in docs:
        jsonschema.validate(d, OBJECT_SCHEMA)
        assert API_VERSIONS.get(d["kind"]) == d["apiVersion"], (d["kind"], d["apiVersion"])
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "avatar"


def _containers(dep):
    return dep["spec"]["template"]["spec"]["containers"]


def _mesh_deployments(docs):
    return {
        d["metadata"]["name"].removeprefix("avatar-"): d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("avatar-")
    }


def _check_deployment(role, dep, configmaps):
    spec = dep["spec"]
    pod = spec["template"]
    sel = spec["selector"]["matchLabels"]
    assert sel.items() <= pod["metadata"]["labels"].items(), f"{role}: selector does not match its pods"
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 45, "room for the drain grace period"
    pre_stop = pod["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and 0 < int(pre_stop[1]) < pod["spec"]["terminationGracePeriodSeconds"] - 30
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    (c,) = _containers(dep)
    jsonschema.validate(c, CONTAINER_SCHEMA)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == ROLES[role] and ports["metrics"] == 9100
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["grpc"]["port"] == ROLES[role], f"{role} {probe} must use gRPC health on its port"
    args = c.get("command", []) + c["args"]
    serve = args[args.index("serve") :]
    flags = _flags(serve)
    assert flags["role"] == role and flags["listen"] == f"0.0.0.0:{ROLES[role]}"
    for ref in c.get("envFrom", []):
        assert ref["configMapRef"]["name"] in configmaps
    env = {e["name"]: e for e in c.get("env", [])}
    secret_env = {"AVATAR_INTERNAL_TOKEN"} | ({"AVATAR_AUTH_TOKEN"} if role == "gateway" else set())
    for name in secret_env:
        assert "secretKeyRef" in env[name]["valueFrom"], f"{name} must come from a Secret"
        assert "value" not in env[name]
    defined = set(env) | {k for ref in c.get("envFrom", []) for k in configmaps[ref["configMapRef"]["name"]]}
    for a in args:  # $(VAR) references must resolve or Kubernetes passes them through verbatim
        for var in re.findall(r"\$\(([A-Z0-9_]+)\)", a):
            assert var in defined, f"{role}: $({var}) is not defined"
    limits = c["resources"].get("limits", {})
    if role in GPU_ROLES:
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["spec"]["tolerations"])
    else:
        assert "nvidia.com/gpu" not in limits
    return c, flags


def test_k8s_deployments_probe_grpc_health_and_request_gpus(k8s):
    configmaps = {d["metadata"]["name"]: d["data"] for d in _all(k8s, "ConfigMap")}
    deps = _mesh_deployments(_all(k8s))
    assert set(deps) == set(ROLES)
    for role, dep in deps.items():
        _, flags = _check_deployment(role, dep, configmaps)
        if role == "gateway":
            for r in GPU_ROLES:
                assert flags[r] == f"{r}:{ROLES[r]}"


def test_k8s_services_select_their_deployments(k8s):
    deps = {d["metadata"]["name"]: d for d in _all(k8s, "Deployment")}
    services = {s["metadata"]["name"]: s for s in _all(k8s, "Service")}
    assert set(ROLES) <= set(services)
    for name, svc in services.items():
        matches = [
            d
            for d in deps.values()
            if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"Service {name} selects {len(matches)} deployments"
        port_names = {p["name"] for c in _containers(matches[0]) for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in port_names, f"Service {name} targets unknown port {p['targetPort']}"
    assert services["gateway"]["spec"]["type"] == "LoadBalancer"
    for role in GPU_ROLES:
        assert services[role]["spec"]["type"] == "ClusterIP"
        assert services[role]["spec"]["ports"][0]["port"] == ROLES[role]


def test_k8s_multi_gpu_generator_uses_torchrun(k8s):
    configmaps = {d["metadata"]["name"]: d["data"] for d in _all(k8s, "ConfigMap")}
    docs = _k8s_docs("generator-multigpu.yaml")
    dep = _mesh_deployments(docs)["generator"]
    c, _ = _check_deployment("generator", dep, configmaps)
    assert c["command"] == ["torchrun"]
    flags = _flags(c["args"][: c["args"].index("avatar")])
    assert "no-python" in flags and "standalone" in flags
    assert int(flags["nproc-per-node"]) == int(c["resources"]["limits"]["nvidia.com/gpu"]) > 1
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/dev/shm" in mounts, "NCCL needs a large /dev/shm"
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    assert svc["metadata"]["name"] == "generator"  # drop-in for generator.yaml


def test_k8s_internal_services_only_from_gateway(k8s):
    (pol,) = _all(k8s, "NetworkPolicy")
    selected = set(pol["spec"]["podSelector"]["matchExpressions"][0]["values"])
    assert selected == {f"avatar-{r}" for r in GPU_ROLES}
    froms = [f for rule in pol["spec"]["ingress"] for f in rule.get("from", [])]
    assert froms == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "avatar-gateway"}}}]


def test_manifests_hold_no_secrets():
    pattern = re.compile(r"(token|password|secret)\s*[:=]\s*['\"]?[A-Za-z0-9+/_-]{12,}", re.I)
    for path in list(DEPLOY.rglob("*.y*ml")) + list(DEPLOY.glob("Dockerfile*")):
        for line in path.read_text().splitlines():
            if "secretKeyRef" in line or "${" in line or line.strip().startswith("#"):
                continue
            assert not pattern.search(line), f"{path.name}: looks like a literal secret: {line.strip()}"


# --- Dockerfiles ---------------------------------------------------------------------------


def _dockerfile(name):
    """(instruction, argument) pairs with line continuations joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            inst, _, arg = line.partition(" ")
            out.append((inst.upper(), arg.strip()))
    return out


@pytest.mark.parametrize("name,base", [("Dockerfile.cpu", "python:3.11"), ("Dockerfile.cuda", "nvidia/cuda")])
def test_dockerfiles_build_from_the_repo(name, base):
    ins = _dockerfile(name)
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD"}
    assert {i for i, _ in ins} <= known
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in ins if i == "ARG" and "=" in a}
    froms = [interpolate(a.replace("${", "${").split(" AS ")[0], args) for i, a in ins if i == "FROM"]
    assert len(froms) == 2 and all(f.startswith(base) for f in froms), "two stages from the right base"
    for inst, arg in ins:
        if inst == "COPY" and not arg.startswith("--from"):
            for src in arg.split()[:-1]:
                assert (ROOT / src).exists(), f"{name} copies {src}, which the repo does not have"
    env = " ".join(a for i, a in ins if i == "ENV")
    assert "MALLOC_ARENA_MAX=2" in env, "bounded malloc arenas keep RSS flat (docs/operations.md)"
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    run = " ".join(a for i, a in ins if i == "RUN")
    assert "requirements.txt" in run and "gen_protos.py" in run
    if "--no-build-isolation" in run:  # then the build backend must be installed by hand
        import tomllib

        pinned = (ROOT / "requirements.txt").read_text()
        for need in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]:
            dist = re.match(r"[A-Za-z0-9_.-]+", need).group(0)
            assert f'"{need}"' in run or re.search(rf"^{dist}==", pinned, re.M), (
                f"{name} must install {need} before building without isolation"
            )
    torch_pin = re.search(r"^torch==(\S+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert torch_pin, "torch is pinned in requirements.txt"
    assert ("whl/cu" in run) == (name == "Dockerfile.cuda")
    (entry,) = [a for i, a in ins if i == "ENTRYPOINT"]
    assert yaml.safe_load(entry)[-1] == "avatar"
    (cmd,) = [a for i, a in ins if i == "CMD"]
    cmd = yaml.safe_load(cmd)
    assert cmd[0] == "serve" and "--metrics-port" in cmd
    port = int(_flags(cmd)["listen"].rsplit(":", 1)[1])
    (health,) = [a for i, a in ins if i == "HEALTHCHECK"]
    assert f"127.0.0.1:{port}" in health and "avatar.app.healthcheck" in health
    exposed = {int(p) for i, a in ins if i == "EXPOSE" for p in a.split()}
    assert {port, 9100} <= exposed


def test_deploy_flags_exist_in_the_cli(compose):
    """Every flag the manifests pass to `avatar serve` is one the CLI accepts."""
    cli = pytest.importorskip("avatar.app.cli")
    parser = getattr(cli, "build_parser", None) or getattr(cli, "make_parser", None)
    if parser is None:
        pytest.skip("avatar.app.cli has no build_parser()")
    parser = parser()
    lines = [compose["services"][r]["command"] for r in ROLES]
    lines.append(
        compose["services"]["generator-multi"]["command"][
            compose["services"]["generator-multi"]["command"].index("avatar") + 1 :
        ]
    )
    for name in ("gateway.yaml", "encoder.yaml", "generator.yaml", "decoder.yaml", "generator-multigpu.yaml"):
        for d in _k8s_docs(name):
            if d["kind"] == "Deployment":
                args = _containers(d)[0]["args"]
                lines.append(
                    [
                        a.replace("$(AVATAR_MAX_SESSIONS)", "4").replace("$(AVATAR_MAX_QUEUE)", "8")
                        for a in args[args.index("serve") :]
                    ]
                )
    for ins in (_dockerfile("Dockerfile.cpu"), _dockerfile("Dockerfile.cuda")):
        lines.append(yaml.safe_load([a for i, a in ins if i == "CMD"][0]))
    for line in lines:
        try:
            parser.parse_args(line)
        except SystemExit:
            pytest.fail(f"`avatar {shlex.join(line)}` is refused by the CLI")


# --- KubeRay (avatar serve --ray) ----------------------------------------------------------

KUBERAY = DEPLOY / "kuberay"
KUBERAY_API = {"RayCluster": "ray.io/v1", "ConfigMap": "v1", "Service": "v1"}


@pytest.fixture(scope="module")
def kuberay():
    kust = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    assert {p.name for p in KUBERAY.glob("*.yaml")} == set(kust["resources"]) | {"kustomization.yaml"}
    docs = [d for res in kust["resources"] for d in yaml.safe_load_all((KUBERAY / res).read_text()) if d]
    for d in docs:
        jsonschema.validate(d, OBJECT_SCHEMA)
        assert KUBERAY_API.get(d["kind"]) == d["apiVersion"], (d["kind"], d["apiVersion"])
        assert d["metadata"]["namespace"] == "avatar"
    return {d["kind"]: d for d in docs}


def _head(kuberay):
    return kuberay["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _serve_line(container) -> list[str]:
    """The `avatar serve ...` words of a container's bash command, $(VAR)s resolved from its env."""
    env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
    script = container["args"][0]
    for var in re.findall(r"\$\(([A-Z0-9_]+)\)", script):
        assert var in env, f"$({var}) is not defined in the container's env"
        script = script.replace(f"$({var})", env[var])
    words = shlex.split(script.split("exec avatar", 1)[1])
    assert words[0] == "serve"
    return words


def test_kuberay_head_runs_ray_then_the_gateway_on_ray(kuberay):
    cluster = kuberay["RayCluster"]
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    pinned = re.search(r"^ray==(\S+)", (ROOT / "requirements-dev.txt").read_text(), re.M).group(1)
    assert cluster["spec"]["rayVersion"] == pinned
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    head = _head(kuberay)
    script = head["args"][0]
    # KubeRay's own `ray start` without --block, then the gateway in the foreground (exec: SIGTERM reaches it)
    assert "${KUBERAY_GEN_RAY_START_CMD/--block/} &&" in script and "exec avatar serve" in script
    flags = _flags(_serve_line(head))
    assert flags["ray"] == "auto" and flags["listen"] == "0.0.0.0:50051" and flags["metrics-port"] == "9100"
    assert not {"encoder", "generator", "decoder", "role"} & set(flags), "--ray finds replicas through Ray"
    mounts = {m["name"]: m["mountPath"] for m in head["volumeMounts"]}
    assert flags["ray-config"] == mounts["ray-mesh"] + "/ray-mesh.yaml"
    volumes = {v["name"]: v for v in cluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]}
    assert volumes["ray-mesh"]["configMap"]["name"] == kuberay["ConfigMap"]["metadata"]["name"]
    env = {e["name"]: e for e in head["env"]}
    for name in ("AVATAR_AUTH_TOKEN", "AVATAR_INTERNAL_TOKEN"):
        assert "secretKeyRef" in env[name]["valueFrom"] and "value" not in env[name]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["grpc"] == 50051 and ports["metrics"] == 9100 and ports["gcs"] == 6379
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        jsonschema.validate(head[probe], PROBE)
        assert head[probe]["grpc"]["port"] == 50051
    assert head["readinessProbe"]["grpc"]["service"] == "avatar.v1.AvatarService"
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), "the gateway needs no GPU"
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no replica on the head"


def test_kuberay_serve_line_and_mesh_config_are_accepted(kuberay):
    cli = pytest.importorskip("avatar.app.cli")
    from avatar.app.ray_mesh import RayMeshConfig

    args = cli.build_parser().parse_args(_serve_line(_head(kuberay)))
    assert args.ray == "auto"
    mesh = RayMeshConfig.from_dict(yaml.safe_load(kuberay["ConfigMap"]["data"]["ray-mesh.yaml"]), gpu=True)
    (group,) = kuberay["RayCluster"]["spec"]["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    cpus = int(group["rayStartParams"]["num-cpus"])
    for role in ("encoder", "generator", "decoder"):  # every replica fits on one worker pod
        spec = mesh.role(role)
        assert 0 < spec.num_gpus <= gpus and spec.num_cpus <= cpus, role
    # the encoder and the decoder share a pod's GPU; generators fit in what the group may grow to
    assert mesh.encoder.num_gpus + mesh.decoder.num_gpus <= gpus
    assert group["minReplicas"] * gpus >= mesh.generator.min_replicas + 1
    assert group["maxReplicas"] * gpus >= mesh.generator.max_replicas + 1
    assert "KUBERAY_GEN_RAY_START_CMD" in worker["args"][0]
    pod = group["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["securityContext"]["runAsNonRoot"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    k8s_claims = {d["metadata"]["name"] for n in ("models-pvc.yaml", "compile-cache-pvc.yaml") for d in _k8s_docs(n)}
    assert claims <= k8s_claims, "workers mount the PVCs deploy/k8s defines"


def test_kuberay_service_selects_the_head(kuberay):
    svc = kuberay["Service"]
    cluster = kuberay["RayCluster"]
    # KubeRay labels the head pod with its cluster name and node type
    assert svc["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    port_names = {p["name"] for p in _head(kuberay)["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    assert svc["spec"]["type"] == "LoadBalancer"


def test_ray_mesh_example_config_parses():
    from avatar.app.ray_mesh import RayMeshConfig

    mesh = RayMeshConfig.load(str(DEPLOY / "ray-mesh.example.yaml"), gpu=True)
    assert mesh.generator.max_replicas > mesh.generator.min_replicas >= 1
    assert mesh.encoder.num_gpus + mesh.decoder.num_gpus <= 1.5
