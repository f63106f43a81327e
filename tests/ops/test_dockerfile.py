"""The Dockerfile builds in stages, runs as non-root, checks its health and carries no secrets.

Docker cannot run here, so the file is read as instructions (continuations joined, comments
dropped) and checked for what an image reviewer would check.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_SECRET_NAME = re.compile(r"(^|/)(\.env(\..*)?|.*\.pem|.*\.key|jwt_secret|\.threadline)$")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, in order."""
    lines: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "dangling line continuation"
    result = []
    for line in lines:
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def stage_named(name: str) -> list[tuple[str, str]]:
    for stage in stages():
        found = re.search(r"\bAS\s+(\S+)", stage[0][1], re.IGNORECASE)
        if found is not None and found[1] == name:
            return stage
    raise AssertionError(f"no stage named {name}")


def test_it_is_multi_stage_and_the_runtime_copies_only_the_build_output() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    stage_named("build")
    runtime = all_stages[-1]
    assert "slim" in runtime[0][1]
    copies = [args for op, args in runtime if op == "COPY"]
    assert copies and all(args.startswith("--from=build") for args in copies), copies
    assert not [op for op, _ in runtime if op == "ADD"]


def test_a_node_stage_builds_the_web_client_into_the_package() -> None:
    web = stage_named("web")
    assert web[0][1].startswith("node:")
    runs = " ".join(args for op, args in web if op == "RUN")
    assert "npm ci" in runs and "npm run build" in runs, "lock-file install, then the build"
    sources = [args.split()[0] for op, args in web if op == "COPY"]
    assert "web/package-lock.json" in " ".join(args for op, args in web if op == "COPY")
    assert "web/node_modules" not in sources
    build = stage_named("build")
    copied = [args for op, args in build if op == "COPY" and args.startswith("--from=web")]
    assert copied and copied[0].split()[-1] == "./server/webdist", copied
    assert "webui.DIST_DIR" in " ".join(args for op, args in build if op == "RUN")


def test_it_runs_as_a_non_root_user() -> None:
    runtime = stages()[-1]
    users = [args for op, args in runtime if op == "USER"]
    assert users, "the runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # The user exists in the image (created in this stage).
    created = " ".join(args for op, args in runtime if op == "RUN")
    assert "useradd" in created and (user in created)


def test_it_has_a_healthcheck_on_healthz_without_curl() -> None:
    checks = [args for op, args in instructions() if op == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/healthz" in checks[0]
    assert "urllib" in checks[0] and "python" in checks[0]
    assert "curl" not in checks[0] and "wget" not in checks[0]


def test_it_listens_on_all_interfaces_and_keeps_data_on_a_volume() -> None:
    runtime = stages()[-1]
    env = " ".join(args for op, args in runtime if op == "ENV")
    assert "THREADLINE_HOST=0.0.0.0" in env
    data_dir = re.search(r"THREADLINE_DATA_DIR=(\S+)", env)
    assert data_dir is not None
    volumes = " ".join(args for op, args in runtime if op == "VOLUME")
    assert data_dir[1] in volumes
    entry = [args for op, args in runtime if op in ("ENTRYPOINT", "CMD")]
    assert any("threadline" in args for args in entry)


def test_migrations_are_shipped_next_to_the_server_package() -> None:
    build = stage_named("build")
    assert any(op == "COPY" and args.split()[0] == "migrations" for op, args in build)
    runs = " ".join(args for op, args in build if op == "RUN")
    assert "server.__file__" in runs and "migrations" in runs


def test_no_layer_receives_secrets() -> None:
    for op, args in instructions():
        if op in ("COPY", "ADD"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            for source in parts[:-1]:
                assert source not in (".", "./"), "copying the whole context invites secrets in"
                assert not _SECRET_NAME.search(source), source
        if op in ("ENV", "ARG"):
            assert not re.search(r"(SECRET|API_KEY|PASSWORD|TOKEN|DATABASE_URL)", args), args


def _ignored(patterns: list[str], path: str) -> bool:
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.lstrip("*/")) for p in patterns)


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_context() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (".env", ".env.production", ".venv", ".git", ".threadline", "loadtests/out"):
        assert _ignored(patterns, path), path
    for path in ("web/node_modules", "server/webdist"):
        assert _ignored(patterns, path), path
    for needed in ("server", "actors", "migrations", "pyproject.toml", "README.md", "web"):
        assert not _ignored(patterns, needed), needed
    assert not any(p.startswith("!") for p in patterns), "no re-inclusion exceptions"
