"""Batched LoRA training: the teachers of K tasks trained at once on one frozen base model.

The LoRA factors of K tasks are leaf tensors with a leading K dim (``A: (K, L, r, in)``,
``B: (K, L, out, r)``). One forward of ``FunctionalLoRA`` runs every task's sequences, each through its
task's adapter; the loss is the sum over tasks of each task's loss. The ``lm`` objective (default) is
the mean cross-entropy on the answer tokens (the prompt is masked). The ``choice`` objective is the
loss a multiple-choice task is scored by: each option's mean per-token log-likelihood is its score
(``eval.scoring``'s default), and the loss is the cross-entropy of the softmax over an example's
options against the gold one, averaged over the task's examples. ``lm+choice`` adds to that the gold
option's mean per-token cross-entropy (the lm term on the sequence the choice term scores, without
the end token), meant to let the teacher learn to pick the answer while its next-token distributions
stay near an lm teacher's (on SmolLM2-135M the lm term dominates the sum; README). Since the factors
of different tasks share nothing, the gradient of task k's factors is the gradient of its own loss;
AdamW acts element by element and gradients are clipped per task, so every task follows exactly the
trajectory of a PEFT LoRA trained on it alone (kaiming-uniform A, zero B, scaling alpha / r, no
dropout), at about the cost of one forward instead of K (tests/test_teachers.py checks steps against PEFT).

A group's training state (factors, optimizer, step, RNG) is saved atomically every ``save_every``
steps; a run that was killed continues from the last one, and since a step's batch depends only on
(seed, task, step), the continued run computes what the uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..atomic import atomic_dir
from ..delta.functional import FunctionalLoRA, get_backbone
from ..lora.factors import LoraFactors, state_dict_from_factors
from ..lora.layout import LoraLayout
from .batches import Batch, EncodedTask, make_batch, step_indices, task_seed
from .config import INIT_KINDS, TeacherConfig, TeacherError


SHARED_INIT = "shared init"  # the name whose task_seed seeds the one initialisation all tasks share


def init_factors(layout: LoraLayout, names: list[str], seed: int, init: str = "shared") -> LoraFactors:
    """PEFT's initialisation (A ~ U(±1/√in), i.e. kaiming-uniform with a = √5; B = 0), stacked into
    trainable leaf tensors with leading dim K.

    ``init="shared"``: every task starts from the same A, drawn from ``(seed, SHARED_INIT)``, as DnD's
    data collection runs every data set under one fixed seed; the teachers then share a basis, and a
    generator can learn their differences instead of their random starting points. ``"per-task"``: A
    drawn from ``(seed, task)``, so the teachers share nothing (for ablations).
    """
    if init not in INIT_KINDS:
        raise TeacherError(f"init must be one of {', '.join(INIT_KINDS)}, got {init!r}")
    seeds = [task_seed(seed, SHARED_INIT if init == "shared" else name) for name in names]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    factors = {}
    for proj in layout.targets:
        a_shape, b_shape = layout.factor_shapes(proj)
        bound = 1.0 / math.sqrt(a_shape[1])
        a = torch.stack([(torch.rand(layout.num_layers, *a_shape, generator=g) * 2 - 1) * bound for g in generators])
        b = torch.zeros(len(names), layout.num_layers, *b_shape)
        factors[proj] = (a.requires_grad_(True), b.requires_grad_(True))
    return factors


def initial_adapter(layout: LoraLayout, seed: int) -> dict[str, Tensor]:
    """The shared initial adapter of a teacher run (PEFT state dict): what every task's LoRA starts from."""
    factors = init_factors(layout, [SHARED_INIT], seed, "shared")
    return state_dict_from_factors({p: (a[0].detach(), b[0].detach()) for p, (a, b) in factors.items()}, layout)


def _mean_by(values: Tensor, groups: Tensor, n: int) -> Tensor:
    """(n,) mean of ``values`` over each group (0 for an empty group)."""
    sums = torch.zeros(n, device=values.device).index_add(0, groups, values)
    return sums / torch.bincount(groups, minlength=n).clamp(min=1)


def choice_losses(scores: Tensor, batch: Batch, k: int) -> Tensor:
    """(K,) each task's mean over its examples of −log softmax(option scores)[gold]; options per example may differ."""
    real = batch.row_example >= 0  # fill rows (see make_batch) belong to no example
    example, option = batch.row_example[real], scores[real]
    examples = batch.gold.numel()
    peak = torch.full((examples,), -torch.inf, device=scores.device).scatter_reduce(0, example, option.detach(), "amax")
    shifted = (option - peak[example]).exp()
    log_z = peak + torch.zeros(examples, device=scores.device).index_add(0, example, shifted).log()
    return _mean_by(log_z - scores[batch.gold], batch.example_task, k)


def task_losses(model: nn.Module, lora: FunctionalLoRA, factors: LoraFactors, batch: Batch,
                objective: str) -> Tensor:
    """(K,) each task's loss under ``objective`` (see the module docstring); the LM head runs on the target
    positions only. ``batch`` is encoded for it: one row per option unless ``lm``."""
    k = next(iter(factors.values()))[0].shape[0]
    rows = batch.input_ids.shape[0]
    with lora.apply(factors):
        hidden = get_backbone(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     use_cache=False).last_hidden_state  # (R, T, H)
    logits = model.get_output_embeddings()(hidden[batch.predicts]).float()  # (M, V)
    nll = F.cross_entropy(logits, batch.targets, reduction="none")  # (M,)
    row = torch.arange(rows, device=nll.device)[:, None].expand_as(batch.predicts)[batch.predicts]  # (M,)
    if (objective == "lm") != (batch.gold is None):
        raise TeacherError(f"the {objective} objective needs a batch with one row per "
                           f"{'example (encode_pairs)' if objective == 'lm' else 'option (encode_choices)'}")
    if objective == "lm":
        return _mean_by(nll, batch.row_task[row], k)
    row_nll = _mean_by(nll, row, rows)  # (R,) each option's mean per-token cross-entropy: minus its score
    losses = choice_losses(-row_nll, batch, k)
    if objective == "lm+choice":
        losses = losses + _mean_by(row_nll[batch.gold], batch.example_task, k)
    return losses


def clip_per_task(factors: LoraFactors, max_norm: float) -> Tensor:
    """Clip each task's gradient to ``max_norm`` (as ``clip_grad_norm_`` over that task's parameters); returns the norms."""
    grads = [t.grad for pair in factors.values() for t in pair]
    norms = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()  # (K,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))
    return norms


def learning_rate(step: int, config: TeacherConfig) -> float:
    """Learning rate of 0-based ``step``: linear warm-up, then cosine to ``min_lr_ratio``·lr at the last step."""
    if step < config.lr_warmup:
        return config.lr * (step + 1) / config.lr_warmup
    progress = (step - config.lr_warmup) / max(1, config.total_steps - config.lr_warmup - 1)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class GroupTrainer:
    """Trains the teachers of one group of tasks together and saves / restores its state under ``state_dir``."""

    def __init__(self, model: nn.Module, layout: LoraLayout, tasks: list[EncodedTask], config: TeacherConfig,
                 state_dir: str | os.PathLike, names: list[str] | None = None):
        """``names``: of the adapters trained (default: one per task, named after it; the tasks' objectives must
        then agree)."""
        self.model, self.layout, self.tasks, self.config = model, layout, tasks, config
        self.state_dir = Path(state_dir)
        self.names = names or [t.name for t in tasks]
        objectives = sorted({config.objective_of(name) for name in self.names})
        if len(objectives) > 1:
            raise TeacherError(f"tasks {', '.join(self.names)}: one group trains with one objective, not "
                               f"{' and '.join(objectives)}")
        self.objective = objectives[0]
        self.device = next(model.parameters()).device
        self.lora = FunctionalLoRA(model, layout)
        self.factors = {p: tuple(t.detach().to(self.device).requires_grad_(True) for t in ab)
                        for p, ab in init_factors(layout, self.names, config.seed, config.init).items()}
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=config.weight_decay)
        self.step = 0  # optimizer steps done

    def parameters(self) -> list[Tensor]:
        return [t for proj in self.layout.targets for t in self.factors[proj]]

    def batch(self, step: int) -> Batch:
        indices = [step_indices(len(t), self.config.batch_size, self.config.seed, t.name, step) for t in self.tasks]
        return make_batch(self.tasks, indices).to(self.device)

    def train_step(self) -> Tensor:
        """One optimizer step for every task; returns the (K,) losses before it."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.config)
        losses = self.backward(self.step)
        clip_per_task(self.factors, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return losses.cpu()

    def backward(self, step: int) -> Tensor:
        """The (K,) losses of ``step``'s batch, their gradients accumulated into the factors."""
        losses = task_losses(self.model, self.lora, self.factors, self.batch(step), self.objective)
        losses.sum().backward()
        return losses.detach()

    def adapter(self, k: int) -> dict[str, Tensor]:
        """Task k's current adapter as a PEFT state dict (CPU copies)."""
        return state_dict_from_factors({p: (a[k].detach().cpu(), b[k].detach().cpu()) for p, (a, b) in self.factors.items()},
                                       self.layout)

    # --- training state ---------------------------------------------------------------------------
    def save_state(self) -> None:
        """Factors, optimizer, step and RNG, atomically (a kill while saving leaves the previous state)."""
        tensors = {f"{p}.{f}": t.detach().cpu().contiguous() for p, ab in self.factors.items() for f, t in zip("AB", ab)}
        with atomic_dir(self.state_dir) as tmp:
            save_file(tensors, str(tmp / "factors.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "tasks": self.names,
                                                        "digest": self.config.digest()}) + "\n")

    def load_state(self) -> bool:
        """Restore the saved state if there is one; False if none."""
        info_file = self.state_dir / "state.json"
        if not info_file.is_file():
            return False
        try:
            info = json.loads(info_file.read_text())
            tensors = load_file(str(self.state_dir / "factors.safetensors"))
            optimizer = torch.load(self.state_dir / "optimizer.pt", map_location="cpu", weights_only=True)
            rng = load_file(str(self.state_dir / "rng.safetensors"))
        except (OSError, ValueError, RuntimeError) as e:
            raise TeacherError(f"{self.state_dir}: unreadable training state ({str(e).splitlines()[0]}); "
                               "delete the directory to start this group again") from None
        if info.get("tasks") != self.names or info.get("digest") != self.config.digest():
            raise TeacherError(f"{self.state_dir}: saved by a run with other tasks or settings; use another --out")
        with torch.no_grad():
            for p, ab in self.factors.items():
                for f, t in zip("AB", ab):
                    t.copy_(tensors[f"{p}.{f}"])
        self.optimizer.load_state_dict(optimizer)
        torch.set_rng_state(rng["cpu"])
        self.step = int(info["step"])
        return True
