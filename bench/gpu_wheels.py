"""The wheels a GPU box without a package registry needs, and the check that they are enough (bench/gpu_prepare.sh).

    python -m bench.gpu_wheels pins                        # the wheel list, one pip requirement a line
    python -m bench.gpu_wheels check [--wheels .whl] [--box-packages ../shared/gpu/box_packages.txt]

The box (Python 3.12, Linux x86-64) has its own torch and the packages its list names, but no verl, hydra or
tensordict: the wheels below travel with the command (the device tool's `carry`, 64 MiB with the working tree).
`check` reads every carried wheel's `Requires-Dist` (markers evaluated for Python 3.12 on Linux x86-64, extras
skipped) and exits 1 naming each requirement that neither the box nor another carried wheel satisfies, and the
wheel that needs it; a carried wheel's version must also satisfy the specifier (it shadows the box's copy on
PYTHONPATH). The box's list names packages only, so a box package counts whatever its version. Declared
dependencies that nothing imports on the path this project runs stay uncarried on purpose: LEFT_UNCARRIED, printed.
Then the size of the working tree plus the carried folders against the carry limit.
"""

from __future__ import annotations

import argparse
import email.parser
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

try:
    from packaging.markers import Marker
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare python3 with pip alone (gpu_prepare.sh needs pip anyway): pip's own copy
    from pip._vendor.packaging.markers import Marker
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parent.parent

# The project's wheel list: what the box lacks or has at a version the project cannot use (transformers 5.x).
# pip download takes the binary wheels; BUILT_WHEELS are sdist-only and built here (pure Python).
DOWNLOADED_WHEELS = (
    "verl==0.6.1",
    "transformers==4.57.6",  # the box has 5.17: the carried copy comes first on PYTHONPATH
    "tokenizers==0.22.2",  # transformers 4.57.6 caps tokenizers below 0.23
    "huggingface-hub>=0.34,<1.0",  # transformers 4.57.6 caps it below 1.0
    "tensordict==0.10.0",
    "pyvers==0.1.0",  # tensordict 0.10 imports it at import time
    "torchdata==0.11.0",
    "hydra-core==1.3.8",
    "omegaconf==2.3.1",
    "codetiming",
    "pylatexenc",
    "datasets==5.0.1",
    "fsspec==2026.6.0",  # datasets 5.0.1 caps fsspec at 2026.6.0
    "dill",
    "multiprocess",
    "peft==0.21.2",
)
BUILT_WHEELS = ("antlr4-python3-runtime==4.9.3",)  # omegaconf's parser runtime: sdist only

# Declared dependencies left uncarried on purpose, each with why that is safe (printed by `check`).
LEFT_UNCARRIED = {
    "ray": "verl imports it at import time but this trainer never starts a cluster: .raystub/ stands in (the wheel "
    "is over the carry limit)",
    "wandb": "verl imports it only for its wandb tracker; trainer.logger stays console/file on the box",
    "orjson": "tensordict 0.10 picks it only when installed (@implement_for('orjson')), json otherwise",
    "importlib-metadata": "tensordict 0.10 declares it but its code never imports it (Python 3.12 has importlib.metadata)",
}

# The box: CPython 3.12 on Linux x86-64 (what `packaging.markers` evaluates each Requires-Dist marker against).
BOX_ENVIRONMENT = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": "3.12.3",
    "python_version": "3.12",
    "sys_platform": "linux",
    "extra": "",  # extras skipped: a requirement only an extra asks for evaluates false
}
CARRY_LIMIT_MIB = 64  # the device tool's carry: the working tree and the carried folders together
CARRIED_FOLDERS = (".whl", ".raystub")


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # canonical
    version: str
    requires: tuple[str, ...]


@dataclass(frozen=True)
class Missing:
    wheel: str  # "name version" of the wheel that needs it
    requirement: str  # as declared
    why: str


def read_wheel(path: Path) -> Wheel:
    """Name, version and Requires-Dist of a .whl, from its *.dist-info/METADATA."""
    with zipfile.ZipFile(path) as archive:
        metadata = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        message = email.parser.Parser().parsestr(archive.read(metadata).decode("utf-8"))
    return Wheel(
        path,
        canonicalize_name(message["Name"]),
        message["Version"],
        tuple(message.get_all("Requires-Dist") or ()),
    )


def read_box_packages(path: Path) -> set[str]:
    """The box's package list: one name a line (a `name==version` line counts by its name); # comments."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonicalize_name(re.split(r"[\s=<>!~;\[]", line, maxsplit=1)[0]))
    return names


def applies_on_box(requirement: Requirement) -> bool:
    return requirement.marker is None or Marker(str(requirement.marker)).evaluate(BOX_ENVIRONMENT)


def missing_requirements(wheels: list[Wheel], box: set[str], left_uncarried: dict[str, str]) -> list[Missing]:
    """Every Requires-Dist of every wheel, on the box, that neither a carried wheel (at a matching version), the box's
    list nor the allow-list covers."""
    carried = {wheel.name: wheel for wheel in wheels}
    allowed = {canonicalize_name(name) for name in left_uncarried}
    missing = []
    for wheel in wheels:
        for declared in wheel.requires:
            try:
                requirement = Requirement(declared)
            except InvalidRequirement as error:
                missing.append(Missing(f"{wheel.name} {wheel.version}", declared, f"unreadable: {error}"))
                continue
            if not applies_on_box(requirement):
                continue
            name = canonicalize_name(requirement.name)
            if name in carried:
                try:
                    fits = requirement.specifier.contains(Version(carried[name].version), prereleases=True)
                except InvalidVersion:
                    fits = False
                if not fits:
                    why = f"carried {name} is {carried[name].version}"
                    missing.append(Missing(f"{wheel.name} {wheel.version}", declared, why))
            elif name not in box and name not in allowed:
                missing.append(Missing(f"{wheel.name} {wheel.version}", declared, "neither carried nor on the box"))
    return missing


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def tree_bytes(root: Path) -> int:
    """What the device tool copies of the working tree: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    paths = (root / os.fsdecode(name) for name in listed if name)
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def check(wheel_dir: Path, box_list: Path, root: Path, limit_mib: float) -> int:
    wheels = [read_wheel(path) for path in sorted(wheel_dir.glob("*.whl"))]
    if not wheels:
        print(f"error: no wheels in {wheel_dir}; run bash bench/gpu_prepare.sh first", file=sys.stderr)
        return 2
    box = read_box_packages(box_list)
    print(f"{len(wheels)} wheels in {wheel_dir}: " + ", ".join(f"{w.name} {w.version}" for w in wheels))
    print("left uncarried on purpose (bench/gpu_wheels.py LEFT_UNCARRIED):")
    for name, why in LEFT_UNCARRIED.items():
        print(f"  {name}: {why}")
    missing = missing_requirements(wheels, box, LEFT_UNCARRIED)
    for item in missing:
        print(
            f"error: {item.wheel} requires {item.requirement}: {item.why}; add it to DOWNLOADED_WHEELS in "
            f"bench/gpu_wheels.py (or to LEFT_UNCARRIED, with the reason)",
            file=sys.stderr,
        )
    if not missing:
        print(f"closure complete: every Requires-Dist (Python 3.12, Linux x86-64) is carried or on {box_list}")
    sizes = {"working tree": tree_bytes(root)}
    sizes.update({f"{folder}/": folder_bytes(root / folder) for folder in CARRIED_FOLDERS if (root / folder).is_dir()})
    total = sum(sizes.values())
    detail = ", ".join(f"{name} {size / 2**20:.1f}" for name, size in sizes.items())
    fits = total <= limit_mib * 2**20
    print(f"size: {total / 2**20:.1f} MiB of the {limit_mib:g} MiB carry limit ({detail} MiB)")
    if not fits:
        print(
            f"error: the working tree and {', '.join(CARRIED_FOLDERS)} hold {total / 2**20:.1f} MiB, over the "
            f"{limit_mib:g} MiB the device tool carries; drop untracked files or wheels",
            file=sys.stderr,
        )
    return 1 if missing or not fits else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pins", help="the wheel list: downloaded, then built (after a line `--build`)")
    checking = commands.add_parser("check", help="dependency closure of the carried wheels, and their size")
    checking.add_argument("--wheels", type=Path, default=Path(".whl"), help="the carried wheels' folder")
    checking.add_argument(
        "--box-packages",
        type=Path,
        default=REPO.parent / "shared" / "gpu" / "box_packages.txt",
        help="the box's package list, one name a line (default ../shared/gpu/box_packages.txt)",
    )
    checking.add_argument("--root", type=Path, default=REPO, help="the working tree that travels with the wheels")
    checking.add_argument("--limit-mib", type=float, default=CARRY_LIMIT_MIB, help="the carry limit")
    args = parser.parse_args(argv)
    if args.command == "pins":
        print("\n".join([*DOWNLOADED_WHEELS, "--build", *BUILT_WHEELS]))
        return 0
    if not args.box_packages.is_file():
        print(
            f"error: {args.box_packages}: no such file; pass the box's package list with --box-packages",
            file=sys.stderr,
        )
        return 2
    return check(args.wheels, args.box_packages, args.root, args.limit_mib)


if __name__ == "__main__":
    sys.exit(main())
