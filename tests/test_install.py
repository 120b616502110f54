"""The API side installs and runs without torch (`pip install darkroom`, no extras), as the README says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent

# What an API host runs: the app as `darkroom api` builds it, migrations, API keys, the submit client. The
# modules of distributions that `pip install darkroom` would not bring are made missing first, so optional
# imports (`try: import cryptography`) go the way they would there, and a needed one fails.
IMPORT_AS_THE_API_DOES = """
import json, sys
from importlib.abc import MetaPathFinder

ABSENT = set(json.loads(sys.argv[1]))

class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the base install)", name=name)
        return None

sys.meta_path.insert(0, Absent())
from api.app import create_app
create_app()
import cli.main, cli.submit, shared.migrate, shared.tenants
"""


def base_install(name: str = "darkroom") -> set[str]:
    """The distributions `pip install <name>` brings: its requirements without extras, and theirs."""
    wanted, seen = [name], set()
    while wanted:
        dist = wanted.pop()
        key = canonicalize_name(dist)
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue  # a requirement whose marker excludes this platform and so is not installed
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue  # another extra's, or another platform's
            wanted.append(requirement.name)
            for extra in requirement.extras:  # uvicorn[standard], celery[redis], ...
                wanted.extend(_extra_requirements(requirement.name, extra))
    return seen


def _extra_requirements(dist: str, extra: str) -> list[str]:
    """What `dist[extra]` adds to `dist`."""
    try:
        requires = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return []
    names = []
    for line in requires:
        requirement = Requirement(line)
        if requirement.marker is not None and requirement.marker.evaluate({"extra": extra}):
            names.append(requirement.name)
    return names


def test_the_api_runs_on_its_base_install_alone(tmp_path: Path) -> None:
    installed = base_install()
    absent = sorted(
        module
        for module, dists in metadata.packages_distributions().items()
        if not any(canonicalize_name(dist) in installed for dist in dists)
    )
    assert "torch" in absent and "diffusers" in absent  # what the API must do without
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")}
    env |= {"DARKROOM_ENV_FILE": "", "DARKROOM_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_AS_THE_API_DOES, json.dumps(absent)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
