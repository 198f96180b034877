"""Every shipped run config loads, validates, and describes a generator that fits its layout."""

from dataclasses import replace

import pytest

from conftest import REPO_ROOT
from llgbm_ext.config import load_config, save_config
from llgbm_ext.generator.build import count_parameters
from llgbm_ext.lora.layout import get_layout, layout_from_config
from llgbm_ext.training import TrainingConfig

LAYOUTS = {  # the layout each config's teachers have
    "tiny": get_layout("tiny"),
    "smollm2-135m-commonsense": layout_from_config(dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                                        num_attention_heads=9, num_key_value_heads=3)),
    "qwen2.5-0.5b-commonsense": get_layout("qwen2.5-0.5b"),
    "qwen2.5-1.5b-math": get_layout("qwen2.5-1.5b"),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_shipped_config(name, tmp_path):
    cfg = load_config(TrainingConfig, REPO_ROOT / "configs" / f"{name}.yaml")
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(TrainingConfig, tmp_path / "resolved.yaml") == cfg
    assert count_parameters(cfg.generator, LAYOUTS[name]) > 0


def test_qwen05b_config_is_dnd_sized():
    cfg = load_config(TrainingConfig, REPO_ROOT / "configs" / "qwen2.5-0.5b-commonsense.yaml")
    assert cfg.data.held_out == ("arc_e",)
    assert abs(count_parameters(cfg.generator, LAYOUTS["qwen2.5-0.5b-commonsense"]) - 1.113e9) / 1.113e9 < 0.005


def test_tiny_yaml_is_the_demo_recipe():
    """configs/tiny.yaml (what the ablations start from) trains the demo's LLGBM generator."""
    from llgbm_ext.experiments.demo import PLANS

    plan = PLANS["default"]
    shipped = load_config(TrainingConfig, REPO_ROOT / "configs" / "tiny.yaml", ["data.teachers=x", "out_dir=y"])
    demo = load_config(TrainingConfig, None, ["data.teachers=x", "out_dir=y", *plan.training, *plan.llgbm.overrides])
    assert shipped == demo


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs" / "ablations").glob("*.yaml")), ids=lambda p: p.stem)
def test_ablation_configs_load_every_variant(path):
    from llgbm_ext.experiments.comparison import ComparisonConfig, training_config

    cfg = load_config(ComparisonConfig, path)
    assert (cfg.held_out or cfg.validation) and len(cfg.seeds) >= 3
    if cfg.validation and cfg.held_out:  # only the default demo's own comparison, over other seeds, reports both
        from pathlib import Path

        from llgbm_ext.experiments.demo import PLANS, comparison_config

        demo = comparison_config(PLANS["default"], Path("runs/demo"), workers=cfg.workers)
        assert replace(cfg, seeds=demo.seeds, out_dir=demo.out_dir) == demo
    elif cfg.validation:  # settings are chosen there: the suite's held-out tasks are neither trained on nor seen
        from llgbm_ext.data.synthetic import held_out_tasks, validation_tasks

        version = 3 if any(t.startswith("none_") for t in cfg.validation) else 2  # the suite of its teachers
        assert set(cfg.exclude) == set(held_out_tasks(version))
        assert set(cfg.validation) == set(validation_tasks(version))
        assert not cfg.held_out
    for variant in cfg.variants:
        tcfg = training_config(cfg, variant, cfg.seeds[0])  # every override names a real key with a valid value
        assert tcfg.out_dir.endswith(f"{variant.name}/seed{cfg.seeds[0]}")
