"""Evaluation of base models, trained and generated adapters: task accuracy (option log-likelihood,
exact match), delta behaviour (cosine, specificity, top-1) and reports (JSON, markdown, PNG)."""

from .behaviour import BehaviourReport, cosine_matrix, delta_specificity, task_means
from .report import ModelInfo, accuracy_markdown, behaviour_markdown, plot_accuracy, plot_heatmap, write_json
from .scoring import (
    AdapterBatch,
    EvalError,
    ExampleResult,
    ScoringConfig,
    TaskResult,
    answers_match,
    evaluate_task,
    extract_answer,
    generate_answers,
    greedy_generate,
    normalise_answer,
    sequence_log_likelihoods,
)

__all__ = [
    "AdapterBatch",
    "BehaviourReport",
    "EvalError",
    "ExampleResult",
    "ModelInfo",
    "ScoringConfig",
    "TaskResult",
    "accuracy_markdown",
    "answers_match",
    "behaviour_markdown",
    "cosine_matrix",
    "delta_specificity",
    "evaluate_task",
    "extract_answer",
    "generate_answers",
    "greedy_generate",
    "normalise_answer",
    "plot_accuracy",
    "plot_heatmap",
    "sequence_log_likelihoods",
    "task_means",
    "write_json",
]
