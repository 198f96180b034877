"""Sampling error of accuracies measured on n test examples, and of the gain recovery computed from them.

An accuracy p on n examples has the binomial standard error ``sqrt(p (1 − p) / n)``. Recovery
``r = (a − b) / (t − b)`` of a model's accuracy a, from the base model's b and the teacher's t, all three
scored on the same n examples, gets its standard error by the delta method (first-order Taylor
expansion; ∂r/∂a = 1/(t − b), ∂r/∂t = −r/(t − b), ∂r/∂b = (r − 1)/(t − b)), the three accuracies
treated as independent binomials:

    se(r)² ≈ [se(a)² + r² se(t)² + (1 − r)² se(b)²] / (t − b)²

It neglects the correlation of the three (they are scored on the same examples), which can move the
error either way, and it is only meaningful when t − b is several of its standard errors: with a small
gain, recovery has no useful value at all.
"""

from __future__ import annotations

import math
import statistics

from ..errors import LLGBMError

REFERENCES = ("base", "teacher")  # rows whose recovery is 0 and 1 by definition
ERROR_NOTE = ("Accuracy ± its binomial standard error sqrt(p (1 − p) / n) on the task's n test examples; recovery "
              "± its delta-method standard error sqrt(se(a)² + r² se(t)² + (1 − r)² se(b)²) / |t − b| (a, b, t: "
              "the model's, the base model's and the teacher's accuracy on the same examples, treated as "
              "independent). Means over seeds; their spread over seeds is the summary table's ±.")


def recovery(accuracy: float, base: float, teacher: float, examples: int) -> float | None:
    """Gain recovery (accuracy − base) / (teacher − base); None where the teacher is within one of the
    ``examples`` scored of the base model (|teacher − base| < 1 / examples, up to float rounding: no gain)."""
    gain = teacher - base
    return (accuracy - base) / gain if abs(gain) * examples > 1 - 1e-6 else None


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` examples."""
    if n < 1:
        raise LLGBMError(f"an accuracy needs at least 1 example, got n = {n}")
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def paired_gain_se(model_correct: list[bool], base_correct: list[bool]) -> float:
    """Standard error of a model's accuracy gain over the base model scored on the same examples: the SE of
    the mean of the per-example differences (−1, 0 or 1). Pairing leaves out the examples both get right
    or wrong, so it is smaller than the two binomial SEs combined (PIQA, 400 examples: 2.0 against 3.3)."""
    n = len(model_correct)
    if n < 2 or len(base_correct) != n:
        raise LLGBMError(f"a paired gain needs two equal lists of at least 2 examples, got {n} and {len(base_correct)}")
    diffs = [int(m) - int(b) for m, b in zip(model_correct, base_correct)]
    return statistics.stdev(diffs) / math.sqrt(n)


def recovery_se(accuracy: float, base: float, teacher: float, n: int) -> float:
    """Delta-method standard error of (accuracy − base) / (teacher − base), all on the same ``n``
    examples (NaN when teacher == base: no gain, no recovery)."""
    gain = teacher - base
    if gain == 0:
        return math.nan
    r = (accuracy - base) / gain
    variance = (binomial_se(accuracy, n) ** 2 + r**2 * binomial_se(teacher, n) ** 2
                + (1.0 - r) ** 2 * binomial_se(base, n) ** 2)
    return math.sqrt(variance) / abs(gain)


def error_table(rows: list[dict], split: str = "held-out") -> str:
    """Per task and model of one split: accuracy % ± its binomial SE and recovery ± its delta-method SE,
    from the mean accuracy over seeds (the SE is that of one evaluation on the task's examples; the spread
    over seeds is the summary table's ±). Recovery is "–" where undefined; base and teacher have none."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in (r for r in rows if r["split"] == split):
        groups.setdefault((row["task"], row["model"]), []).append(row)
    reference = {(task, model): statistics.fmean(r["accuracy"] for r in group)
                 for (task, model), group in groups.items() if model in REFERENCES}
    lines = ["| task | model | examples | accuracy % | accuracy SE | recovery | recovery SE |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (task, model), group in groups.items():
        n = group[0]["examples"]
        accuracy = statistics.fmean(r["accuracy"] for r in group)
        recoveries = [r["recovery"] for r in group if r.get("recovery") is not None and not math.isnan(r["recovery"])]
        recovery = error = "–"
        if recoveries and model not in REFERENCES:
            recovery = f"{statistics.fmean(recoveries):.2f}"
            error = f"{recovery_se(accuracy, reference[task, 'base'], reference[task, 'teacher'], n):.2f}"
        lines.append(f"| {task} | {model} | {n} | {100 * accuracy:.1f} | {100 * binomial_se(accuracy, n):.1f} | "
                     f"{recovery} | {error} |")
    return "\n".join(lines)
