"""bench/gpu_wheels.py (bench/gpu_prepare.sh's closure and size check) on small fake wheels made in a temp dir."""

import subprocess
import sys
import zipfile

import pytest

from bench import gpu_wheels
from conftest import REPO


def fake_wheel(folder, name, version, *requires):
    """A .whl holding only its METADATA, as pip download leaves one."""
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", metadata)
        archive.writestr(f"{name.replace('-', '_')}/__init__.py", "")
    return path


@pytest.fixture()
def box(tmp_path):
    path = tmp_path / "box_packages.txt"
    path.write_text("numpy\ntorch\nPyYAML\n")
    return path


@pytest.fixture()
def tree(tmp_path):
    """A working tree of 1 KiB tracked, plus an ignored file that must not count."""
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / ".gitignore").write_text("/.whl/\n/big.bin\n")
    (root / "code.py").write_bytes(b"x" * 1024)
    (root / "big.bin").write_bytes(b"x" * 2**20)
    (root / ".whl").mkdir()
    return root


def check(tree, box, *extra):
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_wheels", "check", "--wheels", str(tree / ".whl"), "--root", str(tree)]
        + ["--box-packages", str(box), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def test_a_complete_closure_passes_and_prints_the_allow_list(tree, box):
    wheels = tree / ".whl"
    fake_wheel(wheels, "verl", "0.6.1", "numpy<2.0.0", "tensordict<=0.10.0", "ray[default]>=2.41.0", "wandb")
    fake_wheel(wheels, "tensordict", "0.10.0", "torch", "pyvers<0.2.0,>=0.1.0", 'orjson; python_version < "3.13"')
    fake_wheel(wheels, "pyvers", "0.1.0", "pyyaml")  # on the box as PyYAML: names compare canonically
    fake_wheel(wheels, "other", "1.0", 'colorama; sys_platform == "win32"', 'typing; python_version < "3.5"')
    fake_wheel(wheels, "extras", "1.0", 'pytest; extra == "tests"', "fsspec[http]<=2026.6.0; extra == 'x'")
    result = check(tree, box)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "closure complete" in result.stdout and result.stderr == ""
    for name in ("ray", "wandb", "orjson"):
        assert f"  {name}: " in result.stdout
    # 1 KiB tracked + .gitignore + 5 small wheels; the ignored 1 MiB file is not carried
    assert "size: 0.0 MiB of the 64 MiB carry limit" in result.stdout


def test_a_missing_dependency_names_itself_and_the_wheel_that_needs_it(tree, box):
    wheels = tree / ".whl"
    fake_wheel(wheels, "tensordict", "0.10.0", "torch", "pyvers<0.2.0,>=0.1.0")
    fake_wheel(wheels, "datasets", "5.0.1", 'xxhash; python_version >= "3.12"', 'dill; platform_machine == "x86_64"')
    result = check(tree, box)
    assert result.returncode == 1
    errors = sorted(result.stderr.splitlines())
    assert len(errors) == 3, result.stderr
    assert errors[0].startswith("error: datasets 5.0.1 requires dill; platform_machine")
    assert errors[1].startswith('error: datasets 5.0.1 requires xxhash; python_version >= "3.12"')
    assert errors[2].startswith("error: tensordict 0.10.0 requires pyvers<0.2.0,>=0.1.0: neither carried nor on")
    assert "closure complete" not in result.stdout


def test_a_carried_wheel_must_match_the_version_asked_for(tree, box):
    wheels = tree / ".whl"
    fake_wheel(wheels, "datasets", "5.0.1", "fsspec<=2026.6.0", "dill<0.4.2")
    fake_wheel(wheels, "fsspec", "2026.9.0")
    fake_wheel(wheels, "dill", "0.4.1")
    result = check(tree, box)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: datasets 5.0.1 requires fsspec<=2026.6.0: carried fsspec is 2026.9.0; add it to DOWNLOADED_WHEELS "
        "in bench/gpu_wheels.py (or to LEFT_UNCARRIED, with the reason)"
    ]


def test_the_box_list_is_the_one_passed(tree, box, tmp_path):
    fake_wheel(tree / ".whl", "peft", "0.21.2", "accelerate>=0.21.0", "numpy")
    assert check(tree, box).returncode == 1
    other_box = tmp_path / "other.txt"
    other_box.write_text("# read 2026-11\nnumpy==2.1.0\naccelerate\n")
    assert check(tree, other_box).returncode == 0


def test_over_the_carry_limit_fails_with_the_size(tree, box):
    fake_wheel(tree / ".whl", "pyvers", "0.1.0")
    (tree / ".whl" / "padding.bin").write_bytes(b"x" * 3 * 2**20)  # the carried folder counts whole
    result = check(tree, box, "--limit-mib", "3")
    assert result.returncode == 1 and "size: 3.0 MiB of the 3 MiB carry limit" in result.stdout
    assert "over the 3 MiB the device tool carries" in result.stderr
    assert check(tree, box, "--limit-mib", "4").returncode == 0


def test_the_pin_list_carries_what_the_box_needs():
    pins = gpu_wheels.DOWNLOADED_WHEELS + gpu_wheels.BUILT_WHEELS
    names = {pin.split("=")[0].split(">")[0].split("<")[0] for pin in pins}
    assert {"verl", "transformers", "tensordict", "pyvers", "hydra-core", "antlr4-python3-runtime"} <= names
    assert "ray" not in names and "ray" in gpu_wheels.LEFT_UNCARRIED
