"""The deployment files, checked by parsing them (no container engine or cluster here).

Each check is a function of a repository root that returns a list of problems (empty: fine).
The tests run every check on the real files, and `test_each_check_can_fail` runs them again on
a copy in a temporary directory with one file broken, to show the check notices.

Files: Dockerfile, .dockerignore, requirements.lock, deploy/docker-compose.yml,
deploy/.env.example, deploy/litellm-config.yaml, deploy/kubernetes/*.yaml.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import ValidationError

from app.config import Settings
from app.pricing import PriceBook

ROOT = Path(__file__).resolve().parents[2]

# Read by the image's CMD and HEALTHCHECK (the port `budgetgate serve --port` gets), not by the
# gateway's settings: the one BUDGETGATE_ name that is allowed without being a Settings field.
IMAGE_VARIABLES = {"BUDGETGATE_PORT"}
SETTINGS_VARIABLES = {f"BUDGETGATE_{name.upper()}" for name in Settings.model_fields}

# Files that must not reach the build context (.dockerignore), as paths inside the context.
MUST_BE_IGNORED = [
    ".venv/bin/python",
    ".litellm-venv/bin/litellm",
    "budgetgate.db",
    "budgetgate.db-wal",
    "budgetgate.db-shm",
    "data/ledger.db",
    "tests/tmp/ledger.db-wal",
    ".git/HEAD",
    ".env",
    "deploy/.env",
    "app/__pycache__/main.cpython-311.pyc",
    ".pytest_cache/v/cache/nodeids",
    ".mypy_cache/3.11/app.json",
    ".ruff_cache/CACHEDIR.TAG",
    ".hypothesis/examples/x",
]

SECRET_SETTINGS = ("BUDGETGATE_ADMIN_KEY", "BUDGETGATE_UPSTREAM_API_KEY", "BUDGETGATE_DATABASE_URL")


def _read(root: Path, name: str) -> str:
    return (root / name).read_text()


def _yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _port_of(url: str) -> int | None:
    parts = urlsplit(url)
    return parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def _flag(argv: list[str], name: str) -> str | None:
    """The value after `name` in argv (`--port 4000` or `--port=4000`)."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _variables_in(text: str) -> set[str]:
    """Environment variables a shell word or a Python snippet reads: $X, ${X...},
    os.environ["X"], os.environ.get("X")."""
    shell = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text)
    python = re.findall(r"os\.environ(?:\.get\(|\[)\s*['\"]([A-Za-z_][A-Za-z0-9_]*)['\"]", text)
    return set(shell) | set(python)


# ------------------------------------------------------------------------------ Dockerfile


@dataclass
class Instruction:
    name: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order: comment lines dropped (also inside a continuation), lines ending
    in a backslash joined with the next."""
    out: list[Instruction] = []
    buffer = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1].rstrip() + " "
            continue
        buffer += stripped
        name, _, args = buffer.partition(" ")
        out.append(Instruction(name.upper(), args.strip(), start))
        buffer = ""
    if buffer:
        name, _, args = buffer.partition(" ")
        out.append(Instruction(name.upper(), args.strip(), start))
    return out


def _stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for ins in instructions:
        if ins.name == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _env(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.name != "ENV":
            continue
        words = shlex.split(ins.args)
        if words and "=" not in words[0]:  # legacy `ENV KEY value`
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def _command_words(args: str) -> list[str]:
    """A CMD's words: the exec form's list, or the words of `sh -c "..."` / the shell form,
    without a leading `exec`."""
    argv = json.loads(args) if args.startswith("[") else ["sh", "-c", args]
    if argv[:2] in (["sh", "-c"], ["/bin/sh", "-c"]):
        argv = shlex.split(argv[2])
    return argv


def _dockerfile(root: Path) -> tuple[list[Instruction], list[Instruction]]:
    instructions = parse_dockerfile(_read(root, "Dockerfile"))
    return instructions, _stages(instructions)[-1]


def dockerfile_problems(root: Path) -> list[str]:
    problems: list[str] = []
    instructions, final = _dockerfile(root)
    stages = _stages(instructions)
    if len(stages) < 2:
        problems.append("Dockerfile: not multi-stage")
    env = _env(final)
    by_name: dict[str, list[Instruction]] = {}
    for ins in final:
        by_name.setdefault(ins.name, []).append(ins)

    # USER: not root, and numeric so that Kubernetes can verify runAsNonRoot.
    users = by_name.get("USER", [])
    user = users[-1].args.split(":")[0] if users else "root"
    if user in ("root", "0") or not user.isdigit():
        problems.append(f"Dockerfile: final USER is {user!r}: want a numeric non-root uid")

    # CMD: budgetgate serve on 0.0.0.0, the port from a variable; exec'd if through a shell.
    cmds = by_name.get("CMD", [])
    port_variable = None
    if not cmds:
        problems.append("Dockerfile: no CMD")
    else:
        args = cmds[-1].args
        argv = json.loads(args) if args.startswith("[") else ["sh", "-c", args]
        if argv[:2] in (["sh", "-c"], ["/bin/sh", "-c"]) and not argv[2].startswith("exec "):
            problems.append("Dockerfile: CMD runs through a shell without `exec`: SIGTERM")
        words = [w for w in _command_words(args) if w != "exec"]
        if words[:2] != ["budgetgate", "serve"] or _flag(words, "--host") != "0.0.0.0":
            problems.append(f"Dockerfile: CMD is not `budgetgate serve --host 0.0.0.0`: {words}")
        port = _flag(words, "--port") or ""
        found = re.match(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", port)
        if found is None:
            problems.append(f"Dockerfile: CMD --port is {port!r}, not a variable")
        else:
            port_variable = found.group(1)
            if not env.get(port_variable, "").isdigit():
                problems.append(f"Dockerfile: {port_variable} has no numeric ENV default")

    # HEALTHCHECK: /healthz on the port variable the CMD uses, no fixed port.
    checks = by_name.get("HEALTHCHECK", [])
    if not checks:
        problems.append("Dockerfile: no HEALTHCHECK")
    else:
        check = checks[-1].args
        if " CMD " not in f" {check} ":
            problems.append("Dockerfile: HEALTHCHECK has no CMD")
        command = f" {check} ".split(" CMD ", 1)[-1]
        if "/healthz" not in command:
            problems.append("Dockerfile: HEALTHCHECK does not request /healthz")
        if re.search(r":\d+/healthz", command):
            problems.append("Dockerfile: HEALTHCHECK requests a fixed port")
        if port_variable is not None and port_variable not in _variables_in(command):
            problems.append(f"Dockerfile: HEALTHCHECK does not read {port_variable}")

    # EXPOSE agrees with the port variable's default.
    exposed = {e.split("/")[0] for ins in by_name.get("EXPOSE", []) for e in ins.args.split()}
    if port_variable and env.get(port_variable) not in exposed:
        problems.append(f"Dockerfile: EXPOSE {exposed} is not {port_variable}'s default")

    # VOLUME for the ledger, and the default database URL inside it.
    volumes: set[str] = set()
    for ins in by_name.get("VOLUME", []):
        args = ins.args
        volumes.update(json.loads(args) if args.startswith("[") else args.split())
    database_url = env.get("BUDGETGATE_DATABASE_URL", "")
    path = database_url.partition(":///")[2]
    if not database_url.startswith("sqlite") or not path.startswith("/"):
        problems.append(f"Dockerfile: BUDGETGATE_DATABASE_URL {database_url!r}: no SQLite path")
    elif not any(path.startswith(v.rstrip("/") + "/") for v in volumes):
        problems.append(f"Dockerfile: the ledger {path} is not in a VOLUME ({volumes})")

    # Dependencies: from the lock, installed before the source is copied.
    build = stages[0]
    lock_install = next(
        (
            i
            for i, ins in enumerate(build)
            if ins.name == "RUN" and "pip install" in ins.args and "requirements.lock" in ins.args
        ),
        None,
    )
    source_copy = next(
        (
            i
            for i, ins in enumerate(build)
            if ins.name == "COPY" and re.search(r"\bapp\b", ins.args)
        ),
        None,
    )
    if lock_install is None:
        problems.append("Dockerfile: no `pip install` from requirements.lock in the first stage")
    elif source_copy is None or source_copy < lock_install:
        problems.append("Dockerfile: the source is copied before the dependencies are installed")
    return problems


def copy_sources(root: Path) -> list[str]:
    """What the Dockerfile's COPY instructions take from the build context."""
    sources: list[str] = []
    for ins in parse_dockerfile(_read(root, "Dockerfile")):
        if ins.name != "COPY" or "--from=" in ins.args:
            continue
        words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
        sources.extend(words[:-1])
    return sources


# ---------------------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker's pattern matcher reads it: `*` and `?` stop at `/`,
    `**` spans directories, `[...]` is a class, and the whole path must match."""
    out = ""
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out += ".*" if i >= len(pattern) else "(.*/)?"
            continue
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(f"^{out}$")


def dockerignore_matcher(text: str) -> Callable[[str], bool]:
    """`path -> excluded?`: the last matching pattern decides (`!` re-includes); a pattern that
    matches a parent directory matches everything under it."""
    patterns: list[tuple[bool, re.Pattern[str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = line[1:].strip() if negate else line
        line = re.sub(r"/+", "/", line).strip("/")
        patterns.append((negate, _pattern_regex(line)))

    def excluded(path: str) -> bool:
        parts = path.strip("/").split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for negate, regex in patterns:
            if any(regex.match(c) for c in candidates):
                result = not negate
        return result

    return excluded


def dockerignore_problems(root: Path) -> list[str]:
    path = root / ".dockerignore"
    if not path.exists():
        return [".dockerignore: missing"]
    excluded = dockerignore_matcher(path.read_text())
    problems = [
        f".dockerignore: {p} is sent to the build" for p in MUST_BE_IGNORED if not excluded(p)
    ]
    # Whatever the Dockerfile copies must be in the context.
    for source in copy_sources(root):
        files = [source]
        if (ROOT / source).is_dir():
            files += [
                str(p.relative_to(ROOT))
                for p in (ROOT / source).rglob("*")
                if p.suffix in (".py", ".ini", ".mako", ".toml") and "__pycache__" not in p.parts
            ]
        problems += [
            f".dockerignore: excludes {f}, which the Dockerfile copies"
            for f in files
            if excluded(f)
        ]
    return problems


# ------------------------------------------------------------------------- settings names


def deploy_files(root: Path) -> list[Path]:
    files = [root / "Dockerfile", root / "deploy" / "docker-compose.yml"]
    files += [root / "deploy" / ".env.example", root / "deploy" / "litellm-config.yaml"]
    files += sorted((root / "deploy" / "kubernetes").glob("*.yaml"))
    return files


def variable_name_problems(root: Path) -> list[str]:
    """Every BUDGETGATE_ name written in a deploy file is a setting (or the image's port)."""
    problems = []
    for path in deploy_files(root):
        for name in sorted(set(re.findall(r"BUDGETGATE_[A-Za-z0-9_]+", path.read_text()))):
            if name.upper() not in SETTINGS_VARIABLES | IMAGE_VARIABLES:
                problems.append(f"{path.relative_to(root)}: {name} is not a budgetgate setting")
    _, final = _dockerfile(root)
    for name in IMAGE_VARIABLES - set(_env(final)):
        problems.append(f"Dockerfile: {name} is allowed as the image's variable but not set by ENV")
    return problems


def settings_value_problems(env: dict[str, str], where: str) -> list[str]:
    """The literal values given to the gateway are valid settings."""
    values = {
        name[len("BUDGETGATE_") :].lower(): value
        for name, value in env.items()
        if name.upper() in SETTINGS_VARIABLES and "${" not in value
    }
    try:
        Settings(_env_file=None, **values)  # type: ignore[call-arg]
    except ValidationError as exc:
        return [f"{where}: invalid setting {e['loc']}: {e['msg']}" for e in exc.errors()]
    return []


def model_problems(config: dict[str, Any], where: str) -> list[str]:
    """Every model LiteLLM serves is priced by budgetgate (else: 400 before forwarding)."""
    book = PriceBook.load(None)
    models = [m.get("model_name") for m in (config or {}).get("model_list") or []]
    if not models:
        return [f"{where}: no model_list"]
    return [
        f"{where}: model {m!r} is not priced by budgetgate" for m in models if not book.is_priced(m)
    ]


# ------------------------------------------------------------------------------ compose


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _argv(value: Any) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value or []]


def _published(service: dict[str, Any]) -> list[str]:
    """Container ports a service publishes on the host."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append(str(port["target"]))
        else:
            out.append(str(port).split("/")[0].rsplit(":", 1)[-1])
    return out


def _interpolated(value: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", value))


def _expanded(value: str) -> str:
    """The value with each ${...} replaced by a placeholder, as compose would fill it in."""
    return re.sub(r"\$\{[^}]*\}", "placeholder", value)


def compose_problems(root: Path) -> list[str]:
    deploy = root / "deploy"
    compose = yaml.safe_load((deploy / "docker-compose.yml").read_text())
    services: dict[str, Any] = compose.get("services") or {}
    problems: list[str] = []
    missing = {"postgres", "migrate", "budgetgate", "litellm"} - set(services)
    if missing:
        return [f"compose: services missing: {sorted(missing)}"]
    postgres, migrate, gateway, litellm = (
        services[n] for n in ("postgres", "migrate", "budgetgate", "litellm")
    )
    gateway_env, litellm_env = _environment(gateway), _environment(litellm)

    # Only budgetgate is reachable from the host.
    for name, service in services.items():
        if name != "budgetgate" and service.get("ports"):
            problems.append(f"compose: {name} publishes ports {service['ports']}")
    _, final = _dockerfile(root)
    port = gateway_env.get("BUDGETGATE_PORT") or _env(final).get("BUDGETGATE_PORT")
    if _published(gateway) != [port]:
        problems.append(f"compose: budgetgate publishes {_published(gateway)}, serves on {port}")

    # Migrations run once, after PostgreSQL is healthy; the gateway waits for them.
    depends = gateway.get("depends_on")
    if (
        not isinstance(depends, dict)
        or (depends.get("migrate") or {}).get("condition") != "service_completed_successfully"
    ):
        problems.append("compose: budgetgate does not wait for migrate to complete successfully")
    if _argv(migrate.get("command")) != ["budgetgate", "migrate"]:
        problems.append(f"compose: migrate runs {migrate.get('command')!r}")
    if ((migrate.get("depends_on") or {}).get("postgres") or {}).get(
        "condition"
    ) != "service_healthy":
        problems.append("compose: migrate does not wait for a healthy postgres")
    if migrate.get("image") != gateway.get("image"):
        problems.append("compose: migrate and budgetgate run different images")

    # PostgreSQL 15 with a volume and a health check.
    if not str(postgres.get("image", "")).startswith("postgres:15"):
        problems.append(f"compose: postgres image is {postgres.get('image')!r}")
    healthcheck = postgres.get("healthcheck") or {}
    if not healthcheck.get("test") or healthcheck.get("disable"):
        problems.append("compose: postgres has no healthcheck")
    data = [
        v for v in postgres.get("volumes") or [] if str(v).endswith(":/var/lib/postgresql/data")
    ]
    if not data or str(data[0]).split(":")[0] not in (compose.get("volumes") or {}):
        problems.append("compose: postgres data is not on a named volume")

    # The gateway: managed mode, LiteLLM as the upstream with its master key, PostgreSQL.
    if gateway_env.get("BUDGETGATE_KEY_MODE") != "managed":
        problems.append("compose: budgetgate is not in managed mode")
    upstream = urlsplit(gateway_env.get("BUDGETGATE_UPSTREAM_URL", ""))
    litellm_port = _flag(_argv(litellm.get("command")), "--port") or "4000"
    if upstream.hostname != "litellm" or str(upstream.port) != litellm_port:
        problems.append(f"compose: upstream {upstream.geturl()!r} is not litellm:{litellm_port}")
    master = litellm_env.get("LITELLM_MASTER_KEY", "")
    if not _interpolated(master) or gateway_env.get("BUDGETGATE_UPSTREAM_API_KEY") != master:
        problems.append("compose: BUDGETGATE_UPSTREAM_API_KEY is not LiteLLM's master key")
    for service_name, env in (("budgetgate", gateway_env), ("migrate", _environment(migrate))):
        url = urlsplit(_expanded(env.get("BUDGETGATE_DATABASE_URL", "")))
        if url.scheme != "postgresql+asyncpg" or url.hostname != "postgres":
            problems.append(f"compose: {service_name}'s database is not the postgres service")
    if not str(litellm.get("image", "")).startswith("ghcr.io/berriai/litellm"):
        problems.append(f"compose: litellm image is {litellm.get('image')!r}")

    # Secrets come from the env file, never written here; .env.example names each one.
    secrets = [gateway_env.get(n, "") for n in SECRET_SETTINGS]
    secrets.append(_environment(postgres).get("POSTGRES_PASSWORD", ""))
    for value in secrets:
        if not _interpolated(value):
            problems.append(f"compose: a secret is written in the file: {value[:12]!r}...")
    example = deploy / ".env.example"
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example.read_text(), re.M))
    required = set(
        re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", _read(deploy, "docker-compose.yml"))
    )
    for name in sorted(required - documented):
        problems.append(f"compose: {name} is required but not in deploy/.env.example")

    # LiteLLM's config: mounted from deploy/, serves models budgetgate prices.
    mounts = [str(v).split(":") for v in litellm.get("volumes") or []]
    config_file = _flag(_argv(litellm.get("command")), "--config")
    host_paths = [m[0] for m in mounts if len(m) >= 2 and m[1] == config_file]
    if not host_paths or not (deploy / host_paths[0]).is_file():
        problems.append(f"compose: LiteLLM's --config {config_file} is not a mounted deploy/ file")
    else:
        config = yaml.safe_load((deploy / host_paths[0]).read_text())
        problems += model_problems(config, f"deploy/{host_paths[0]}")
    problems += settings_value_problems(gateway_env, "compose budgetgate")
    return problems


# --------------------------------------------------------------------------- kubernetes


def _k8s(root: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((root / "deploy" / "kubernetes").glob("*.yaml")):
        docs += _yaml_docs(path)
    return docs


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"want one {kind}, found {len(found)}"
    return found[0]


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in pod.get("containers") or [] if c.get("name") == name]
    assert found, f"no container {name!r}"
    return found[0]


def _resolve_port(container: dict[str, Any], port: Any) -> int | None:
    for p in container.get("ports") or []:
        if port in (p.get("name"), p.get("containerPort")):
            return int(p["containerPort"])
    return None


def _env_list(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or []}


def kubernetes_problems(root: Path) -> list[str]:
    from app.main import LOCAL_PATHS  # the gateway's own routes (here: only this check needs it)

    docs = _k8s(root)
    problems: list[str] = []
    deployment = _one(docs, "Deployment")
    template = deployment["spec"]["template"]
    pod = template["spec"]
    labels = template["metadata"]["labels"]
    gateway = _container(pod, "budgetgate")
    litellm = _container(pod, "litellm")
    env = _env_list(gateway)

    # The gateway's port: the one the image's CMD reads, and the probes' port.
    ports = [int(p["containerPort"]) for p in gateway.get("ports") or []]
    port_value = (env.get("BUDGETGATE_PORT") or {}).get("value")
    if len(ports) != 1 or str(ports[0]) != str(port_value):
        problems.append(f"k8s: budgetgate containerPort {ports} != BUDGETGATE_PORT {port_value}")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = (gateway.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != path or get.get("path") not in LOCAL_PATHS:
            problems.append(f"k8s: budgetgate {probe} requests {get.get('path')!r}, not {path}")
        if _resolve_port(gateway, get.get("port")) not in ports:
            problems.append(f"k8s: budgetgate {probe} port {get.get('port')!r} is not its port")

    # LiteLLM: beside it on localhost, never exposed.
    args = _argv(litellm.get("args"))
    litellm_port = _flag(args, "--port")
    if litellm.get("ports"):
        problems.append("k8s: the litellm container declares ports")
    if _flag(args, "--host") != "127.0.0.1":
        problems.append("k8s: litellm does not listen on 127.0.0.1 only")
    upstream = urlsplit((env.get("BUDGETGATE_UPSTREAM_URL") or {}).get("value", ""))
    if upstream.hostname not in ("127.0.0.1", "localhost") or str(upstream.port) != litellm_port:
        problems.append(f"k8s: upstream {upstream.geturl()!r} is not litellm on localhost")
    if (env.get("BUDGETGATE_KEY_MODE") or {}).get("value") != "managed":
        problems.append("k8s: budgetgate is not in managed mode")

    # Secrets: from secretKeyRef, keys the Secret (example) defines; the upstream key is
    # LiteLLM's master key.
    secret = _one(docs, "Secret")
    keys = set(secret.get("stringData") or {}) | set(secret.get("data") or {})
    for name in SECRET_SETTINGS:
        if "secretKeyRef" not in ((env.get(name) or {}).get("valueFrom") or {}):
            problems.append(f"k8s: {name} is not read from a Secret")
    containers = list(pod.get("containers") or []) + list(pod.get("initContainers") or [])
    for c in containers:
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref and (
                ref.get("name") != secret["metadata"]["name"] or ref.get("key") not in keys
            ):
                problems.append(f"k8s: {c['name']} {e['name']} reads a key the Secret lacks: {ref}")
    master = (_env_list(litellm).get("LITELLM_MASTER_KEY") or {}).get("valueFrom")
    if master is None or (env.get("BUDGETGATE_UPSTREAM_API_KEY") or {}).get("valueFrom") != master:
        problems.append("k8s: BUDGETGATE_UPSTREAM_API_KEY is not LiteLLM's master key")

    # Migrations before the gateway starts, with the same image and database.
    migrate = [
        c
        for c in pod.get("initContainers") or []
        if _argv(c.get("command")) == ["budgetgate", "migrate"]
    ]
    if not migrate:
        problems.append("k8s: no init container runs `budgetgate migrate`")
    elif migrate[0].get("image") != gateway.get("image") or _env_list(migrate[0]).get(
        "BUDGETGATE_DATABASE_URL"
    ) != env.get("BUDGETGATE_DATABASE_URL"):
        problems.append("k8s: the migrate init container's image or database differs")

    # Hardening and resources.
    if (pod.get("securityContext") or {}).get("runAsNonRoot") is not True:
        problems.append("k8s: pod securityContext.runAsNonRoot is not true")
    if pod.get("enableServiceLinks") is not False:
        problems.append("k8s: enableServiceLinks would inject BUDGETGATE_PORT=tcp://... variables")
    for c in containers:
        ctx = c.get("securityContext") or {}
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"k8s: {c['name']} allows privilege escalation")
        if c.get("image") == gateway.get("image") and ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"k8s: {c['name']} (budgetgate image) root filesystem is writable")
        resources = c.get("resources") or {}
        for kind in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(resources.get(kind) or {}):
                problems.append(f"k8s: {c['name']} has no cpu/memory {kind}")

    # The Service: budgetgate's port only, selecting these pods.
    service = _one(docs, "Service")
    service_ports = service["spec"].get("ports") or []
    selector = service["spec"].get("selector") or {}
    if (
        len(service_ports) != 1
        or _resolve_port(gateway, service_ports[0].get("targetPort")) not in ports
    ):
        problems.append(f"k8s: the Service targets {service_ports}, not budgetgate's port only")
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        problems.append("k8s: the Service selector does not match the pods")
    pdb = _one(docs, "PodDisruptionBudget")
    match = (pdb["spec"].get("selector") or {}).get("matchLabels") or {}
    if not match or any(labels.get(k) != v for k, v in match.items()):
        problems.append("k8s: the PodDisruptionBudget selector does not match the pods")

    # LiteLLM's config comes from the ConfigMap, and serves models budgetgate prices.
    configmap = _one(docs, "ConfigMap")
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    config = _flag(args, "--config") or ""
    mounted = [
        m
        for m in litellm.get("volumeMounts") or []
        if config.startswith(m["mountPath"].rstrip("/") + "/")
        and (volumes.get(m["name"]) or {}).get("configMap", {}).get("name")
        == configmap["metadata"]["name"]
    ]
    key = config.rsplit("/", 1)[-1]
    if not mounted or key not in (configmap.get("data") or {}):
        problems.append(f"k8s: LiteLLM's --config {config} is not the ConfigMap's {key}")
    else:
        problems += model_problems(yaml.safe_load(configmap["data"][key]), "k8s ConfigMap")

    # kustomization.yaml applies every manifest but the Secret example.
    kustomization = yaml.safe_load(_read(root, "deploy/kubernetes/kustomization.yaml"))
    manifests = {
        p.name
        for p in (root / "deploy" / "kubernetes").glob("*.yaml")
        if p.name not in ("kustomization.yaml", "secret.example.yaml")
    }
    if set(kustomization.get("resources") or []) != manifests:
        problems.append(
            f"k8s: kustomization resources {kustomization.get('resources')} != {sorted(manifests)}"
        )

    values = {n: e.get("value", "") for n, e in env.items() if "value" in e}
    problems += settings_value_problems(values, "k8s budgetgate")
    return problems


# ------------------------------------------------------------------------------ the lock


def _lock(root: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in _read(root, "requirements.lock").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            specs = list(req.specifier)
            exact = len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version
            pins[canonicalize_name(req.name)] = specs[0].version if exact else ""
    return pins


def _pyproject(root: Path) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(_read(root, "pyproject.toml"))


def lock_problems(root: Path) -> list[str]:
    pins = _lock(root)
    project = _pyproject(root)["project"]
    problems = [
        f"requirements.lock: {name} is not pinned with ==" for name, v in pins.items() if not v
    ]
    for line in project["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"requirements.lock: runtime dependency {name} is missing (make lock)")
        elif pins[name] and not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"requirements.lock: {name}=={pins[name]} is outside {req.specifier}")
    dev_only = {
        canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["dev"]
    }
    for name in sorted(dev_only & set(pins)):
        problems.append(f"requirements.lock: dev tool {name} is in the runtime lock")
    if canonicalize_name(project["name"]) in pins:
        problems.append("requirements.lock: pins the project itself")
    return problems


# ------------------------------------------------------------------------------- tests

CHECKS: dict[str, Callable[[Path], list[str]]] = {
    "dockerfile": dockerfile_problems,
    "dockerignore": dockerignore_problems,
    "names": variable_name_problems,
    "compose": compose_problems,
    "kubernetes": kubernetes_problems,
    "lock": lock_problems,
}


@pytest.mark.parametrize("check", list(CHECKS))
def test_deploy_files(check: str) -> None:
    assert CHECKS[check](ROOT) == []


def test_every_file_parses() -> None:
    for path in deploy_files(ROOT):
        if path.suffix == ".yaml" or path.suffix == ".yml":
            assert _yaml_docs(path), path
    assert [i.name for i in parse_dockerfile(_read(ROOT, "Dockerfile"))].count("FROM") == 2
    kinds = sorted(d["kind"] for d in _k8s(ROOT))
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Kustomization",
        "PodDisruptionBudget",
        "Secret",
        "Service",
    ]


def test_dockerfile_parser() -> None:
    text = "# syntax=docker/dockerfile:1\nFROM a AS b\nRUN x \\\n  # note\n  && y\nENV A=1 \\\n    B='two words'\n"
    ins = parse_dockerfile(text)
    assert [(i.name, i.line) for i in ins] == [("FROM", 2), ("RUN", 3), ("ENV", 6)]
    assert ins[1].args == "x && y"
    assert _env(ins) == {"A": "1", "B": "two words"}


def test_dockerignore_matcher_reads_patterns_as_docker_does() -> None:
    excluded = dockerignore_matcher("*.db\n**/*.log\n.venv\n!keep.log\ndocs/*.md\n")
    assert excluded("x.db") and not excluded("sub/x.db")  # a bare `*` stops at `/`
    assert excluded("a.log") and excluded("a/b/c.log") and not excluded("keep.log")
    assert excluded(".venv") and excluded(".venv/lib/site.py") and not excluded("venv")
    assert excluded("docs/a.md") and not excluded("docs/sub/a.md")


def test_lock_generator_takes_runtime_dependencies_only() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock", ROOT / "scripts" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    closure = module.runtime_closure("budgetgate")
    project = _pyproject(ROOT)["project"]
    runtime = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert runtime <= set(closure)
    assert {"uvloop", "httptools", "greenlet"} <= set(closure)  # from the extras asked for
    assert not {"pytest", "hypothesis", "mypy", "ruff", "budgetgate"} & set(closure)


# Each case breaks one file of a copy of the repository's deploy files and names the problem
# the checks must then report: every check above can fail.
MUTATIONS = [
    # Dockerfile
    ("Dockerfile", "USER 10001:10001", "USER root", "numeric non-root uid"),
    ("Dockerfile", "USER 10001:10001", "USER budgetgate", "numeric non-root uid"),
    ("Dockerfile", '--port \\"${BUDGETGATE_PORT:-8080}\\"', "--port 8080", "not a variable"),
    ("Dockerfile", '"exec budgetgate serve', '"budgetgate serve', "without `exec`"),
    ("Dockerfile", "--host 0.0.0.0", "--host 127.0.0.1", "budgetgate serve --host 0.0.0.0"),
    ("Dockerfile", "(os.environ.get('BUDGETGATE_PORT') or '8080')", "8080", "does not read"),
    ("Dockerfile", "/healthz' %", "/readyz' %", "does not request /healthz"),
    ("Dockerfile", "BUDGETGATE_PORT=8080 \\", "BUDGETGATE_PORT=http \\", "no numeric ENV default"),
    ("Dockerfile", "EXPOSE 8080", "EXPOSE 9090", "EXPOSE"),
    ("Dockerfile", 'VOLUME ["/srv/data"]', 'VOLUME ["/var/data"]', "not in a VOLUME"),
    (
        "Dockerfile",
        "RUN pip install --no-deps -r requirements.lock",
        "RUN true",
        "requirements.lock",
    ),
    (
        "Dockerfile",
        "BUDGETGATE_DATABASE_URL=sqlite",
        "BUDGETGATE_DATABSE_URL=sqlite",
        "not a budgetgate setting",
    ),
    # .dockerignore
    (".dockerignore", "\n.venv\n", "\n", ".venv/bin/python is sent"),
    (".dockerignore", "**/*.db\n", "*.db\n", "data/ledger.db is sent"),
    (".dockerignore", "**/*.db-wal\n", "", "budgetgate.db-wal is sent"),
    (".dockerignore", "\n.git\n", "\n", ".git/HEAD is sent"),
    (".dockerignore", "**/.env\n", "", ".env is sent"),
    (".dockerignore", "\ndeploy\n", "\ndeploy\napp\n", "excludes app"),
    (".dockerignore", "\ndeploy\n", "\ndeploy\n*.lock\n", "excludes requirements.lock"),
    # compose
    (
        "deploy/docker-compose.yml",
        "      BUDGETGATE_ADMIN_KEY: ${",
        "      BUDGETGATE_ADMIN_KYE: ${",
        "not a budgetgate setting",
    ),
    (
        "deploy/docker-compose.yml",
        '    expose:\n      - "4000"',
        '    ports:\n      - "4000:4000"',
        "litellm publishes",
    ),
    (
        "deploy/docker-compose.yml",
        "condition: service_completed_successfully",
        "condition: service_started",
        "wait for migrate",
    ),
    (
        "deploy/docker-compose.yml",
        'command: ["budgetgate", "migrate"]',
        'command: ["budgetgate", "serve"]',
        "migrate runs",
    ),
    (
        "deploy/docker-compose.yml",
        '      test: ["CMD-SHELL", "pg_isready -U budgetgate -d budgetgate"]\n',
        "",
        "postgres has no healthcheck",
    ),
    ("deploy/docker-compose.yml", "image: postgres:15", "image: postgres:13", "postgres image"),
    ("deploy/docker-compose.yml", "      - pgdata:/var/lib/postgresql/data\n", "", "named volume"),
    (
        "deploy/docker-compose.yml",
        '"${GATEWAY_PORT:-8080}:8080"',
        '"8080:9090"',
        "publishes ['9090']",
    ),
    (
        "deploy/docker-compose.yml",
        "BUDGETGATE_KEY_MODE: managed",
        "BUDGETGATE_KEY_MODE: passthrough",
        "managed mode",
    ),
    (
        "deploy/docker-compose.yml",
        "BUDGETGATE_UPSTREAM_URL: http://litellm:4000",
        "BUDGETGATE_UPSTREAM_URL: http://litellm:8000",
        "is not litellm:4000",
    ),
    (
        "deploy/docker-compose.yml",
        "BUDGETGATE_UPSTREAM_API_KEY: ${LITELLM_MASTER_KEY",
        "BUDGETGATE_UPSTREAM_API_KEY: ${OPENAI_API_KEY",
        "master key",
    ),
    (
        "deploy/docker-compose.yml",
        "BUDGETGATE_ADMIN_KEY: ${BUDGETGATE_ADMIN_KEY:?set BUDGETGATE_ADMIN_KEY in deploy/.env}",
        "BUDGETGATE_ADMIN_KEY: hunter2",
        "secret is written",
    ),
    (
        "deploy/docker-compose.yml",
        "@postgres:5432/budgetgate\n    depends_on:\n      postgres:",
        "@db:5432/budgetgate\n    depends_on:\n      postgres:",
        "migrate's database",
    ),
    (
        "deploy/docker-compose.yml",
        "./litellm-config.yaml:/app/config.yaml:ro",
        "./missing.yaml:/app/config.yaml:ro",
        "not a mounted deploy/ file",
    ),
    (
        "deploy/docker-compose.yml",
        "BUDGETGATE_LOG_FORMAT: json",
        "BUDGETGATE_LOG_FORMAT: xml",
        "invalid setting",
    ),
    (
        "deploy/.env.example",
        "\nLITELLM_MASTER_KEY=",
        "\nLITELLM_KEY=",
        "not in deploy/.env.example",
    ),
    (
        "deploy/litellm-config.yaml",
        "model_name: gpt-4o-mini",
        "model_name: no-such-model-x1",
        "not priced",
    ),
    # kubernetes
    (
        "deploy/kubernetes/deployment.yaml",
        "name: BUDGETGATE_KEY_MODE",
        "name: BUDGETGATE_KEYMODE",
        "not a budgetgate setting",
    ),
    (
        "deploy/kubernetes/deployment.yaml",
        "path: /readyz",
        "path: /ready",
        "readinessProbe requests",
    ),
    (
        "deploy/kubernetes/deployment.yaml",
        "path: /healthz\n              port: http\n            periodSeconds: 10",
        "path: /health\n              port: http\n            periodSeconds: 10",
        "livenessProbe requests",
    ),
    (
        "deploy/kubernetes/deployment.yaml",
        "path: /readyz\n              port: http",
        "path: /readyz\n              port: 4000",
        "readinessProbe port",
    ),
    (
        "deploy/kubernetes/deployment.yaml",
        "containerPort: 8080",
        "containerPort: 8000",
        "BUDGETGATE_PORT",
    ),
    (
        "deploy/kubernetes/deployment.yaml",
        "runAsNonRoot: true",
        "runAsNonRoot: false",
        "runAsNonRoot",
    ),
    (
        "deploy/kubernetes/deployment.yaml",
        "enableServiceLinks: false",
        "enableServiceLinks: true",
        "enableServiceLinks",
    ),
    (
        "deploy/kubernetes/deployment.yaml",
        '"--host", "127.0.0.1"',
        '"--host", "0.0.0.0"',
        "127.0.0.1 only",
    ),
    (
        "deploy/kubernetes/deployment.yaml",
        "value: http://127.0.0.1:4000",
        "value: http://litellm:4000",
        "litellm on localhost",
    ),
    ("deploy/kubernetes/deployment.yaml", "key: admin-key", "key: admin-token", "Secret lacks"),
    (
        "deploy/kubernetes/deployment.yaml",
        'command: ["budgetgate", "migrate"]',
        'command: ["budgetgate", "serve"]',
        "budgetgate migrate",
    ),
    (
        "deploy/kubernetes/deployment.yaml",
        "              memory: 512Mi\n",
        "",
        "no cpu/memory limits",
    ),
    (
        "deploy/kubernetes/deployment.yaml",
        'readOnlyRootFilesystem: true\n            capabilities:\n              drop: ["ALL"]\n          volumeMounts:\n            - name: tmp',
        'readOnlyRootFilesystem: false\n            capabilities:\n              drop: ["ALL"]\n          volumeMounts:\n            - name: tmp',
        "root filesystem is writable",
    ),
    (
        "deploy/kubernetes/deployment.yaml",
        "mountPath: /etc/litellm",
        "mountPath: /etc/other",
        "not the ConfigMap",
    ),
    (
        "deploy/kubernetes/service.yaml",
        "targetPort: http",
        "targetPort: 4000",
        "not budgetgate's port only",
    ),
    (
        "deploy/kubernetes/service.yaml",
        "      protocol: TCP\n",
        "      protocol: TCP\n    - name: litellm\n      port: 4000\n      targetPort: 4000\n",
        "not budgetgate's port only",
    ),
    (
        "deploy/kubernetes/service.yaml",
        "  selector:\n    app.kubernetes.io/name: budgetgate",
        "  selector:\n    app.kubernetes.io/name: other",
        "Service selector",
    ),
    (
        "deploy/kubernetes/pdb.yaml",
        "    matchLabels:\n      app.kubernetes.io/name: budgetgate",
        "    matchLabels:\n      app.kubernetes.io/name: other",
        "PodDisruptionBudget selector",
    ),
    (
        "deploy/kubernetes/configmap.yaml",
        "model_name: gpt-4o-mini",
        "model_name: no-such-model-x1",
        "not priced",
    ),
    ("deploy/kubernetes/kustomization.yaml", "  - pdb.yaml\n", "", "kustomization resources"),
    # the lock
    ("requirements.lock", "\nfastapi==", "\nfastapi>=", "fastapi is not pinned"),
    ("requirements.lock", "\nhttpx==", "\nhttpx-other==", "httpx is missing"),
    ("requirements.lock", "\npydantic==2", "\npydantic==1", "outside"),
    ("requirements.lock", "\nyarl==", "\npytest==8.0.0\nyarl==", "dev tool pytest"),
]


def _copy_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name in ("Dockerfile", ".dockerignore", "requirements.lock", "pyproject.toml"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "deploy", root / "deploy", ignore=shutil.ignore_patterns(".env"))
    return root


def _mutation_id(case: tuple[str, str, str, str]) -> str:
    return f"{case[0]}: {case[3]}"


@pytest.mark.parametrize("case", MUTATIONS, ids=[_mutation_id(c) for c in MUTATIONS])
def test_each_check_can_fail(case: tuple[str, str, str, str], tmp_path: Path) -> None:
    name, old, new, expected = case
    root = _copy_repo(tmp_path)
    path = root / name
    text = path.read_text()
    assert text.count(old) == 1, f"the mutation's text must occur once in {name}: {old!r}"
    path.write_text(text.replace(old, new))
    problems = [p for check in CHECKS.values() for p in _problems(check, root)]
    assert any(expected in p for p in problems), problems


def _problems(check: Callable[[Path], list[str]], root: Path) -> Iterator[str]:
    try:
        yield from check(root)
    except (AssertionError, KeyError, TypeError, ValueError) as exc:  # a file broken beyond reading
        yield f"{check.__name__}: {exc!r}"
