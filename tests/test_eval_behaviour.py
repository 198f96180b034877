"""Delta behaviour measures (cosine to the own task, to other tasks, specificity, top-1) on hand-made vectors."""

import math

import numpy as np
import pytest
import torch

from llgbm_ext.eval.behaviour import cosine_matrix, delta_specificity, task_means
from llgbm_ext.eval.scoring import EvalError


def cos(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_cosine_matrix_and_task_means():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [0.0, -3.0]])
    expected = [[1.0, 0.0], [1 / math.sqrt(2), -1 / math.sqrt(2)], [0.0, 0.0]]  # a zero row has cosine 0
    torch.testing.assert_close(cosine_matrix(a, b), torch.tensor(expected))
    names, means = task_means(torch.tensor([[1.0, 0.0], [0.0, 4.0], [3.0, 2.0]]), ["x", "y", "x"])
    assert names == ["x", "y"]
    torch.testing.assert_close(means, torch.tensor([[2.0, 1.0], [0.0, 4.0]]))


TEACHERS = np.array([[1.0, 0.0, 0.0], [1.0, 0.2, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
TEACHER_TASKS = ["a", "a", "b", "c"]


def test_specificity_against_task_means_by_hand():
    generated = np.array([[2.0, 1.0, 0.0], [1.0, 0.0, 0.1], [0.0, 0.5, 1.0]])
    report = delta_specificity(generated, ["a", "b", "c"], TEACHERS, TEACHER_TASKS, labels=["g0", "g1", "g2"])
    means = {"a": TEACHERS[:2].mean(0), "b": TEACHERS[2], "c": TEACHERS[3]}
    assert report.teacher_tasks == ["a", "b", "c"]
    for row, g, task in zip(report.adapters, generated, ["a", "b", "c"]):
        cosines = {t: cos(g, m) for t, m in means.items()}
        others = [c for t, c in cosines.items() if t != task]
        assert row.cos_own == pytest.approx(cosines[task], abs=1e-6)
        assert row.cos_others == pytest.approx(np.mean(others), abs=1e-6)
        assert row.specificity == pytest.approx(cosines[task] - np.mean(others), abs=1e-6)
        assert row.nearest_task == max(cosines, key=cosines.get)
        assert row.top1 == (row.nearest_task == task)
    assert [r.top1 for r in report.adapters] == [True, False, True]  # g1 (task b) points at a
    assert report.adapters[1].specificity < 0 < report.adapters[0].specificity
    assert report.cosines.shape == (3, 3)
    o = report.overall
    assert o["top1"] == pytest.approx(2 / 3) and o["adapters"] == 3
    assert o["specificity"] == pytest.approx(np.mean([r.specificity for r in report.adapters]))


def test_per_task_and_overall_means_weigh_adapters_and_tasks_differently():
    generated = np.array([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    report = delta_specificity(generated, ["a", "a", "a", "c"], TEACHERS, TEACHER_TASKS)
    by_task = {t.task: t for t in report.tasks}
    assert (by_task["a"].adapters, by_task["c"].adapters) == (3, 1)
    assert by_task["a"].top1 == pytest.approx(2 / 3) and by_task["c"].top1 == 0.0
    rows_a = [r for r in report.adapters if r.task == "a"]
    assert by_task["a"].specificity == pytest.approx(np.mean([r.specificity for r in rows_a]))
    assert report.overall["top1"] == pytest.approx(2 / 4)  # over adapters
    assert report.overall["top1_task_macro"] == pytest.approx((2 / 3 + 0) / 2)  # over tasks


def test_a_shared_format_direction_hides_behind_cos_own_but_not_specificity():
    """Teachers of all tasks share a large common direction (cosines ~0.97 between tasks). A generator
    that always outputs the average teacher has a high cos_own and zero specificity; one that adds its
    task's own direction has about the same cos_own but a positive specificity and top-1."""
    rng = np.random.default_rng(0)
    common = np.zeros(32)
    common[0] = 4.0
    own = {t: rng.normal(size=32) * 0.15 for t in "abcd"}
    teachers = np.stack([common + own[t] + rng.normal(size=32) * 0.01 for t in "abcd" for _ in range(3)])
    tasks = [t for t in "abcd" for _ in range(3)]
    names, means = task_means(teachers, tasks)
    between = cosine_matrix(means, means)
    assert float(between[~torch.eye(4, dtype=torch.bool)].min()) > 0.9
    average = np.repeat(teachers.mean(0, keepdims=True), 4, axis=0)
    specific = np.stack([common + own[t] for t in "abcd"])
    blind = delta_specificity(average, list("abcd"), teachers, tasks)
    aware = delta_specificity(specific, list("abcd"), teachers, tasks)
    assert blind.overall["cos_own"] > 0.9 and aware.overall["cos_own"] > 0.9
    assert abs(blind.overall["specificity"]) < 1e-6
    assert aware.overall["specificity"] > 0.02 and aware.overall["top1"] == 1.0


def test_per_adapter_reference_sees_a_teacher_the_task_mean_cancels():
    teachers = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])  # task a's teachers cancel in their mean
    generated = np.array([[1.0, 0.1]])
    per_task = delta_specificity(generated, ["a"], teachers, ["a", "a", "b"], reference="task_mean")
    per_adapter = delta_specificity(generated, ["a"], teachers, ["a", "a", "b"], reference="per_adapter")
    assert per_task.adapters[0].nearest_task == "b" and not per_task.adapters[0].top1
    assert per_adapter.adapters[0].nearest_task == "a" and per_adapter.adapters[0].top1
    expected_own = (cos([1, 0.1], [1, 0]) + cos([1, 0.1], [-1, 0])) / 2  # mean over a's teachers
    assert per_adapter.adapters[0].cos_own == pytest.approx(expected_own, abs=1e-6)
    assert per_adapter.adapters[0].cos_others == pytest.approx(cos([1, 0.1], [0, 1]), abs=1e-6)


def test_bad_inputs():
    with pytest.raises(EvalError, match="at least two tasks"):
        delta_specificity(np.ones((1, 3)), ["a"], TEACHERS[:2], ["a", "a"])
    with pytest.raises(EvalError, match="no teachers for the task.*: z"):
        delta_specificity(np.ones((1, 3)), ["z"], TEACHERS, TEACHER_TASKS)
    with pytest.raises(EvalError, match="width 2"):
        delta_specificity(np.ones((1, 2)), ["a"], TEACHERS, TEACHER_TASKS)
    with pytest.raises(EvalError, match="2 task labels for 1"):
        delta_specificity(np.ones((1, 3)), ["a", "b"], TEACHERS, TEACHER_TASKS)
    with pytest.raises(EvalError, match="reference"):
        delta_specificity(np.ones((1, 3)), ["a"], TEACHERS, TEACHER_TASKS, reference="nearest")
    with pytest.raises(EvalError, match="non-empty"):
        cosine_matrix(np.ones(3), TEACHERS)
