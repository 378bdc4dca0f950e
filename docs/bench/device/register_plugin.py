"""Register the project's entry points (pyproject.toml) in SITE without installing it.

On the device the project runs from its tree on PYTHONPATH; vLLM finds its plugins through
installed distributions' entry points, so a spawned EngineCore would not run yapd's. This
writes the distribution's metadata (name, version, entry points) into SITE, on the same
PYTHONPATH. Usage: python3 docs/bench/device/register_plugin.py /tmp/site
"""

from __future__ import annotations

import pathlib
import sys

import tomllib


def main(site: str) -> None:
    project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
    info = pathlib.Path(site) / f"{project['name']}-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in points.items()) + "\n"
        for group, points in project.get("entry-points", {}).items()))
    print(f"registered {info}")


if __name__ == "__main__":
    main(sys.argv[1])
