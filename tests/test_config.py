"""Typed configs: YAML round trip, dotted overrides, type conversion and clear errors."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from llgbm_ext.config import ConfigError, from_dict, load_config, save_config, to_dict


@dataclass
class Optim:
    lr: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Run:
    mode: Literal["weight_only", "delta_only"] = "weight_only"
    steps: int = 10
    seed: int | None = None
    tasks: list[str] = field(default_factory=lambda: ["a", "b"])
    gradient_checkpointing: bool = False
    optim: Optim = field(default_factory=Optim)


def test_defaults_yaml_round_trip(tmp_path):
    cfg = load_config(Run, None, ["optim.lr=1e-4", "mode=delta_only", "tasks=[x, y, z]", "seed=3"])
    assert cfg == Run(mode="delta_only", seed=3, tasks=["x", "y", "z"], optim=Optim(lr=1e-4))
    save_config(cfg, tmp_path / "run.yaml")
    assert load_config(Run, tmp_path / "run.yaml") == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.999]


def test_values_are_converted_to_declared_types(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: '20'\noptim:\n  lr: 1e-3\n  betas: [0.5, 0.6]\ngradient_checkpointing: 'yes'\n")
    cfg = load_config(Run, tmp_path / "c.yaml", ["seed=null"])
    assert cfg.steps == 20 and cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.5, 0.6)
    assert cfg.gradient_checkpointing is True and cfg.seed is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stpes=3"], "stpes: unknown key (did you mean 'steps'?)"),
        (["optim.lrr=3"], "optim.lrr: unknown key"),
        (["steps=many"], "steps: expected int, got 'many'"),
        (["mode=both"], "mode: 'both' is not one of ['weight_only', 'delta_only']"),
        (["optim.betas=[1, 2, 3]"], "expected 2 values"),
        (["gradient_checkpointing=maybe"], "expected true or false"),
        (["steps"], "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(Run, None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(Run, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line"):
        load_config(Run, tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(Run, tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("optim:\n  lr: 1\n  bta: 2\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: optim.bta: unknown key"):
        load_config(Run, tmp_path / "typo.yaml")


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError, match="expected a mapping of Optim fields"):
        from_dict(Run, {"optim": 3})
