"""Behavioral signatures of LoRAs: probe sets, activations v(M), a batched functional LoRA and deltas.

Δ(M) = v(M) − v(base), where v is the final-norm hidden state at each probe's last real token,
averaged over a fixed probe set (Delta Activations, arXiv 2509.04442).
"""

from .activations import base_activation, last_token_states, mean_activations
from .deltas import DeltaComputer, DeltaSettings, delta_settings, load_teacher_factors
from .functional import FunctionalLoRA, get_backbone, num_adapters
from .probes import ProbeBatch, ProbeError, ProbeSet, builtin_probe_sets, encode_probes, get_probe_set, load_probe_file

__all__ = [
    "DeltaComputer",
    "DeltaSettings",
    "FunctionalLoRA",
    "ProbeBatch",
    "ProbeError",
    "ProbeSet",
    "base_activation",
    "builtin_probe_sets",
    "delta_settings",
    "encode_probes",
    "get_backbone",
    "get_probe_set",
    "last_token_states",
    "load_probe_file",
    "load_teacher_factors",
    "mean_activations",
    "num_adapters",
]
