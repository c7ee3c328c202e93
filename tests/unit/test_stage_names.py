"""One name per stage everywhere: dvc.yaml stage, module, conf group, MLproject entry point."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_every_dvc_stage_has_a_module_a_conf_group_and_an_entry_point():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"python -m detloop.{name}"
        assert (ROOT / "src" / "detloop" / f"{name}.py").is_file()
        assert (ROOT / "conf" / name / "default.yaml").is_file()
        assert entry_points[name]["command"] == f"python -m detloop.{name} {{overrides}}"


def test_every_stage_declares_the_conf_file_of_its_group():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        params = [next(iter(p)) if isinstance(p, dict) else p for p in stage["params"]]
        assert f"conf/{name}/default.yaml" in params
