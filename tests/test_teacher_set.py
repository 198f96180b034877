"""Teacher-set manifests: round trip, task selection, malformed files."""

import json

import pytest

from llgbm_ext.data.teacher_set import TeacherSetError, load_teacher_set, write_manifest
from llgbm_ext.lora.layout import get_layout

LAYOUT = get_layout("tiny")


def _write(root):
    tasks = {"add_1": {"kind": "exact", "prompts": ["Add 1: 3"]}, "add_2": {"kind": "exact", "prompts": ["Add 2: 5"]}}
    adapters = [{"name": f"{t}_{i:03d}", "task": t, "path": f"{t}/{t}_{i:03d}", "step": 10 * i} for t in tasks for i in range(2)]
    return write_manifest(root, "tiny", LAYOUT, tasks, adapters)


def test_round_trip_and_select(tmp_path):
    _write(tmp_path)
    teachers = load_teacher_set(tmp_path)
    assert teachers.layout == LAYOUT and teachers.model_name == "tiny"
    assert [e.name for e in teachers.entries] == ["add_1_000", "add_1_001", "add_2_000", "add_2_001"]
    assert teachers.entries[1].path == tmp_path / "add_1" / "add_1_001" and teachers.entries[1].step == 10
    assert teachers.prompts("add_2") == ["Add 2: 5"]
    held_in = teachers.select(exclude=["add_2"])
    assert held_in.task_names() == ["add_1"] and all(e.task == "add_1" for e in held_in.entries)
    with pytest.raises(TeacherSetError, match="unknown task 'add_9'"):
        teachers.select(exclude=["add_9"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["lora_config"] == {"rank": 8, "alpha": 16.0, "targets": list(LAYOUT.targets)}


def test_malformed_manifests(tmp_path):
    with pytest.raises(TeacherSetError, match="no teacher manifest"):
        load_teacher_set(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(TeacherSetError, match="not valid JSON"):
        load_teacher_set(tmp_path)
    _write(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    del data["layout"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(TeacherSetError, match="malformed manifest .KeyError: 'layout'"):
        load_teacher_set(tmp_path)
