"""The environment pins agree everywhere a user may install from."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _pyproject_pins() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])


def test_environment_yml_lists_the_same_pins_as_pyproject():
    # given both dependency files
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
    # when comparing the pinned requirements
    conda_pins = {p for p in pip_section if not p.startswith("-e")}
    # then they are the same set
    assert conda_pins == _pyproject_pins()


def test_every_dependency_is_pinned_exactly():
    assert all("==" in pin for pin in _pyproject_pins())


def test_constraints_agree_with_pyproject_pins():
    # given the full lock of the tested environment
    lock = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            lock[name.lower().replace("_", "-")] = version.strip()
    # then every direct pin is the locked version
    for pin in _pyproject_pins():
        name, version = pin.split("==", 1)
        name = name.split("[", 1)[0]  # psycopg[binary]: the extra does not change the locked name
        assert lock.get(name.lower()) == version, pin


def test_installed_opencv_is_the_single_headless_build():
    from importlib.metadata import PackageNotFoundError, version

    import cv2

    assert cv2.__version__ == "4.14.0"
    try:
        version("opencv-python")
    except PackageNotFoundError:
        return
    raise AssertionError("opencv-python and opencv-python-headless are both installed (they share cv2/)")
