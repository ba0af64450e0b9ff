"""Write constraints.txt: the exact version of every package the SDK, its extras and the plugins need, as installed.

Run with the project's venv after changing a dependency (`make constraints`). It reads the requirements of
the SDK and the plugins (every extra) from their pyproject.toml files and follows them through the installed
distributions, so the file lists what the project needs, not whatever else happens to be in the venv.
"""

from __future__ import annotations

import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECTS = [ROOT / "pyproject.toml", *sorted((ROOT / "plugins").glob("*/pyproject.toml"))]
HEADER = """\
# The exact versions the tests ran on: `make setup` and CI install with `pip install -c constraints.txt ...`.
# pyproject.toml states compatible ranges; this file pins one tested point inside them.
# Generated from .venv by `make constraints` (tools/freeze_constraints.py); edit pyproject.toml, not this file.
"""


def requirements(name: str, extras: set[str]) -> list[Requirement]:
    """The requirements of an installed distribution that apply with these extras on this interpreter."""
    found = []
    for text in distribution(name).requires or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras | {""}):
            found.append(requirement)
    return found


def project_requirements() -> tuple[set[str], list[Requirement]]:
    """Our own distribution names, and everything their pyproject files require (all extras)."""
    names, found = set(), []
    for path in PYPROJECTS:
        project = tomllib.loads(path.read_text())["project"]
        names.add(canonicalize_name(project["name"]))
        found += [Requirement(text) for text in project.get("dependencies", [])]
        found += [Requirement(text) for extra in project.get("optional-dependencies", {}).values() for text in extra]
    return names, found


def closure() -> dict[str, str]:
    """Canonical name -> installed version for everything the projects need, transitively."""
    ours, direct = project_requirements()
    pending = [(requirement.name, set(requirement.extras)) for requirement in direct]
    seen: dict[str, set[str]] = {}
    versions: dict[str, str] = {}
    while pending:
        name, extras = pending.pop()
        key = canonicalize_name(name)
        if key in ours or (key in seen and extras <= seen[key]):
            continue
        seen[key] = seen.get(key, set()) | extras
        try:
            versions[key] = distribution(name).version
        except PackageNotFoundError:
            sys.exit(f"{name} is not installed: run `make setup` first")
        pending += [(requirement.name, set(requirement.extras)) for requirement in requirements(name, extras)]
    return versions


def main() -> None:
    lines = []
    for name, version in sorted(closure().items()):
        lines.append(f"{name}=={version.split('+')[0]}")  # torch 2.13.0+cpu: the local label is the build's
    (ROOT / "constraints.txt").write_text(HEADER + "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pins to constraints.txt")


if __name__ == "__main__":
    main()
