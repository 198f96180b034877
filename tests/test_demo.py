"""``llgbm demo --quick`` end to end (the CI smoke test of the README's main job), and its caching."""

import importlib.util
import json

import pytest

from llgbm_ext.cli import main
from llgbm_ext.data.synthetic import HELD_OUT, held_out_tasks, validation_tasks
from llgbm_ext.experiments.demo import PLANS

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, main(["demo", "--quick", "--out", str(out), "--no-progress"])


def test_quick_demo_runs_every_stage(quick_demo, capsys):
    out, code = quick_demo
    assert code == 0
    manifest = json.loads((out / "teachers" / "manifest.json").read_text())
    assert sorted(manifest["tasks"]) == sorted(PLANS["quick"].tasks)
    # teachers learn the tasks the base model does not solve (colour it nearly solves already)
    hard = [t for t in manifest["tasks"].values() if t["base_accuracy"] < 0.5]
    assert len(hard) >= 5 and all(t["teacher_accuracy"] > t["base_accuracy"] + 0.3 for t in hard)
    assert manifest["init"]["kind"] == "shared"  # aligned teachers by default
    for variant in ("weight_only", "llgbm"):
        assert (out / "runs" / variant / "seed0" / "metrics.jsonl").is_file()
    assert (out / "runs" / "multitask_lora" / "seed0" / "adapter_model.safetensors").is_file()
    results = json.loads((out / "results.json").read_text())
    for split in ("held-out", "in-distribution"):
        summary = {e["model"]: e for e in results["summary"] if e["split"] == split}
        assert {"base", "teacher", "weight_only", "llgbm", "multitask_lora"} <= set(summary), split
    held = {e["model"]: e for e in results["summary"] if e["split"] == "held-out"}
    assert {"llgbm (mismatched prompts)", "llgbm (random prompts)"} <= set(held)
    teacher_rows = [r for r in results["rows"] if r["model"] == "teacher"]
    assert all(r["recovery"] == pytest.approx(1.0) for r in teacher_rows if r["recovery"] is not None)
    # the behaviour signal moves the generated adapters' outputs toward the teachers' on their own tasks
    indist = {e["model"]: e for e in results["summary"] if e["split"] == "in-distribution"}
    assert indist["llgbm"]["accuracy"] > indist["base"]["accuracy"]
    assert (out / "report.md").is_file() and "## In-distribution tasks" in (out / "report.md").read_text()
    csv_header = (out / "results.csv").read_text().splitlines()[0]
    assert "recovery" in csv_header and "norm_ratio" in csv_header


def test_quick_demo_draws_its_plots(quick_demo):
    """The comparison and each generator run's loss curves (drawn at its last checkpoint), wherever
    matplotlib is installed (``bash scripts/setup.sh`` installs it)."""
    out, code = quick_demo
    assert code == 0
    plots = [out / "comparison.png"] + [out / "runs" / v / "seed0" / "loss_curves.png" for v in ("weight_only", "llgbm")]
    if importlib.util.find_spec("matplotlib") is None:
        assert not any(png.exists() for png in plots)
        return
    for png in plots:  # matplotlib is installed: every plot must be there
        assert png.is_file() and png.read_bytes()[:8] == PNG, png
    for variant in ("weight_only", "llgbm"):
        run = out / "runs" / variant / "seed0"
        assert (run / "loss_curves.png").stat().st_mtime_ns >= (run / "metrics.jsonl").stat().st_mtime_ns


def test_second_run_reuses_every_stage(quick_demo, capsys):
    out, _ = quick_demo
    capsys.readouterr()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| llgbm |" in printed and "| teacher |" in printed and "| multitask_lora |" in printed
    assert "(held out)" in printed and "LLGBM here is:" in printed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps  # nothing retrained


def test_plans_hold_out_tasks_they_train_teachers_for():
    for name, plan in PLANS.items():
        left_out = set(plan.held_out) | set(plan.validation)
        assert set(plan.held_out) < set(plan.tasks) and left_out < set(plan.tasks), name
        assert not set(plan.held_out) & set(plan.validation), name
        assert not left_out & set(plan.eval_in_distribution), name  # in-distribution tasks are trained on
    default = PLANS["default"]  # suite v2, its held-out and validation members, at least 40 training tasks
    assert default.held_out == held_out_tasks(2) and default.validation == validation_tasks(2)
    assert len(default.tasks) - len(default.held_out) - len(default.validation) >= 40 and default.seeds == 3
    assert PLANS["v1"].held_out == ("kind_3", "category_food", "rank_2")  # suite v1's, for its families
    assert set(PLANS["v1"].held_out) < set(HELD_OUT)
