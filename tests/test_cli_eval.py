"""``llgbm eval`` end to end on the tiny model, adapter discovery, and bad input."""

import importlib.util
import json
import sys

import pytest
import torch

from llgbm_ext.cli import main
from llgbm_ext.cli.eval import collect_adapters
from llgbm_ext.data.adapter_tasks import adapter_task, match_task
from llgbm_ext.data.formatting import PromptFormat
from llgbm_ext.data.synthetic import get_synthetic_task
from llgbm_ext.models.registry import load_base_model
from llgbm_ext.eval.scoring import ScoringConfig, evaluate_task
from llgbm_ext.lora.adapters import save_dnd_checkpoint, save_peft_adapter
from llgbm_ext.lora.factors import random_factors, state_dict_from_factors
from llgbm_ext.lora.layout import get_layout

LAYOUT = get_layout("tiny")
PNG = b"\x89PNG\r\n\x1a\n"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def write_adapter(path, seed, **kwargs):
    factors = random_factors(LAYOUT, generator=torch.Generator().manual_seed(seed), std=0.1)
    return save_peft_adapter(state_dict_from_factors(factors, LAYOUT), path, LAYOUT, **kwargs)


def test_end_to_end_with_trained_and_generated_adapters(tmp_path, capsys):
    write_adapter(tmp_path / "teachers" / "category_food_0", 0)
    write_adapter(tmp_path / "teachers" / "kind_2_0", 1)
    write_adapter(tmp_path / "gen" / "out0", 2, extra_json={"prompts.json": {"task": "category_food", "generated": True}})
    out = tmp_path / "report"
    code = main(["eval", "--base-model", "tiny", "--synthetic", "--tasks", "category_food", "kind_2", "shift_1",
                 "--adapters", str(tmp_path / "teachers"), "--generated", str(tmp_path / "gen"), "--limit", "4",
                 "--max-new-tokens", "3", "--adapters-per-forward", "2", "--probes", "generic", "--out", str(out),
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| base | 1 |" in printed and "**" in printed and "specificity" in printed
    for name in ("results.json", "report.md"):
        assert (out / name).is_file()
    for name in ("accuracy.png", "delta_cosines.png"):
        assert (out / name).read_bytes()[:8] == PNG if HAS_MATPLOTLIB else not (out / name).exists()
    report = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in report["models"]] == ["base", "category_food_0", "kind_2_0", "out0"]
    assert [m["task"] for m in report["models"]][1:] == ["category_food", "kind_2", "category_food"]
    assert report["models"][3]["role"] == "generated"
    assert len(report["results"]) == 4 * 3 and all(r["total"] == 4 for r in report["results"])
    behaviour = report["behaviour"]
    assert behaviour["teacher_tasks"] == ["category_food", "kind_2"] and len(behaviour["adapters"]) == 1
    assert any("random or nonsense prompts" in note for note in report["notes"])
    # the command's base result is what the library computes directly
    base = next(r for r in report["results"] if r["model"] == "base" and r["task"] == "category_food")
    task = get_synthetic_task("category_food")
    (direct,) = evaluate_task(*load_base_model("tiny"), task, ScoringConfig(fmt=PromptFormat(), progress=False), limit=4)
    assert base["correct"] == direct.correct
    torch.testing.assert_close(torch.tensor([e["scores"] for e in base["examples"]]),
                               torch.tensor([e.scores for e in direct.examples]), rtol=0, atol=1e-5)


def test_missing_adapter_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope"
    code = main(["eval", "--base-model", "tiny", "--synthetic", "--tasks", "shift_1", "--adapters", str(missing),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(missing) in err and err.startswith("llgbm eval: error:")
    assert not (tmp_path / "out").exists()


def test_unknown_task_and_bad_arguments(tmp_path, capsys):
    assert main(["eval", "--base-model", "tiny", "--synthetic", "--tasks", "shift_99"]) == 2
    assert "unknown synthetic task 'shift_99'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--base-model", "tiny", "--synthetic", "--tasks", "shift_1", "--limit", "0"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):  # --data-dir and --synthetic exclude each other
        main(["eval", "--base-model", "tiny", "--synthetic", "--data-dir", str(tmp_path), "--tasks", "shift_1"])


def test_task_of_an_adapter(tmp_path):
    tasks = ["add_3", "arc_e", "category_food"]
    assert match_task("add_3_seed1", tasks) == "add_3"
    assert match_task("add_30", tasks) is None  # not a prefix match across a digit
    assert match_task("ARC-e", tasks) == "arc_e"
    assert match_task("arc_e.v2", tasks) == "arc_e"
    assert match_task("add_3_x", ["add_3", "add_3_x"]) == "add_3_x"  # the longest task wins
    save_dnd_checkpoint(state_dict_from_factors(random_factors(LAYOUT), LAYOUT), tmp_path / "ARC-e" / "7.safetensors", LAYOUT)
    assert adapter_task(tmp_path / "ARC-e" / "7.safetensors", tasks) == ("arc_e", False)  # DnD folder name
    write_adapter(tmp_path / "runs" / "seed0", 0, extra_json={"prompts.json": {"task": "Category_Food", "generated": True}})
    assert adapter_task(tmp_path / "runs" / "seed0", tasks) == ("category_food", True)
    write_adapter(tmp_path / "a" / "seed0", 1)
    labels = [e.label for e in collect_adapters([str(tmp_path / "runs"), str(tmp_path / "a")], [], tasks)]
    assert labels == ["runs/seed0", "a/seed0"]  # repeated names get their folder


def test_plots_are_skipped_with_a_message_without_matplotlib(tmp_path, capsys, monkeypatch):
    from llgbm_ext.eval.report import ModelInfo, plot_accuracy, plot_heatmap
    from llgbm_ext.eval.scoring import TaskResult

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    results = [TaskResult("t", "mc", "base", 1, 2)]
    assert plot_accuracy(tmp_path / "a.png", [ModelInfo("base", "base")], results) is None
    assert plot_heatmap(tmp_path / "h.png", [[1.0]], ["t"], ["t"], "x") is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_report_tables_average_groups_and_json_has_no_nan(tmp_path):
    from llgbm_ext.eval.report import ModelInfo, accuracy_markdown, write_json
    from llgbm_ext.eval.scoring import TaskResult

    models = [ModelInfo("base", "base"), ModelInfo("a0", "adapter", "a"), ModelInfo("a1", "adapter", "a")]
    results = [TaskResult("a", "mc", "base", 1, 4), TaskResult("a", "mc", "a0", 4, 4), TaskResult("a", "mc", "a1", 0, 4),
               TaskResult("b", "mc", "base", 0, 0), TaskResult("b", "mc", "a0", 1, 2), TaskResult("b", "mc", "a1", 2, 2)]
    table = accuracy_markdown(models, results).splitlines()
    assert table[2:] == ["| base | 1 | 25.0 | – |", "| adapter [a] | 2 | **50.0** | 75.0 |"]
    assert "| a1 | adapter | a | **0.0 (0/4)** | 100.0 (2/2) |" in accuracy_markdown(models, results, per_model=True)
    write_json(tmp_path / "r.json", {"x": results[3].accuracy, "y": [float("inf"), 1.5]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": None, "y": [None, 1.5]}
