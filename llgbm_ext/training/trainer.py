"""Generator training without DnD: ``Trainer(cfg).setup()``, ``.train()``, ``.cleanup()``.

Each step: embed the condition prompts (cached), generate DnD tokens, and depending on the mode
  * weight_only   L = λw·L_weight(tokens, teacher)                       (DnD's baseline)
  * multitask     L = λw·L_weight + Σ_s λ_s·L_s(generated LoRA, teacher)
  * delta_only    L = Σ_s λ_s·L_s                                         (weight loss logged only)
  * delta_guided  L = λp·L(head(tokens), Δ_t) [+ λc·Σ_s λ_s·L_s + λcons·L(head, sg Δ) every N steps]
                      [+ λw·L_weight]
where s runs over the behaviour signals of ``loss.signals`` (``llgbm_ext.signals``: Δ on generic,
task-grounded or mixed probes; KL of next-token distributions at the answers of each task's training
inputs). Each signal runs the generated LoRAs on the frozen base model in one batched differentiable
forward (inside the trained module's forward) and compares with its teacher targets from the
DeltaCache (filled once; misses split over the ranks, written by rank 0). Runs on accelerate: one process, DDP, or
DeepSpeed ZeRO-1/2/3 (``training.distributed``), bf16 autocast on GPU; every process steps the same
global batch schedule on its slice of each batch, and the logged values are means over the
processes (the global batch's). Checkpoints hold everything an exact resume needs; metrics go to
``metrics.jsonl`` (every loss component, grad norm, lr, step time, base-model forwards) and
``loss_curves.png``; with ``eval.every``, recovery on left-out tasks too (``training.validation``,
``recovery_curves.png``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic import write_text
from ..config import save_config, to_dict
from ..errors import LLGBMError
from ..data.teacher_set import load_teacher_set
from ..generator.build import build_generator
from ..generator.text_encoder import EmbeddingCache, TextEncoder
from ..losses import BehaviourLoss, DeltaGuidedLoss, DeltaHead, DeltaWLoss, TokenMSELoss, WeightLoss
from ..lora.tokens import detokenize
from .checkpoint import (
    RUN_INFO, check_resume, latest_checkpoint, load_training_state, load_weights, save_checkpoint, save_rank_state,
    zero_partition,
)
from .config import TrainingConfig
from .data import StepBatches, batch_loader
from .distributed import (
    configure_deepspeed, gathered_weights, make_accelerator, whole_models, zero_stage,
)
from .plots import plot_metrics, plot_recovery


class DivergedError(LLGBMError):
    """Training produced a non-finite loss (one line through the CLI; the run's checkpoints stay)."""


class GeneratorWithHead(nn.Module):
    """What is trained: the generator and, in delta_guided mode, its delta head (one module for DDP or
    DeepSpeed), whose forward also runs the behaviour signals on the generated LoRAs when asked.

    The frozen base model of the signals is not a submodule (not saved, not wrapped), except under
    ZeRO-3 (``attach_signals(..., partition_base=True)``), where it must be one so that the engine
    partitions it and gathers each layer's weights for its forward and backward.
    """

    def __init__(self, generator: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.generator = generator
        self.head = head
        self._signals: tuple | None = None  # (signals dict, layout, base model); a tuple, so not a submodule

    def attach_signals(self, signals: dict, layout, base: nn.Module, partition_base: bool = False) -> None:
        self._signals = (signals, layout, base)
        if partition_base:
            self.base = base

    def forward(self, condition: torch.Tensor, index: torch.Tensor | None = None, step: int = 0,
                with_signals: bool = False):
        """(tokens (B, N_tok, H, W), head Δ (B, H) or None, {signal: SignalResult} or None); the signals
        compare the generated LoRAs with the teachers ``index`` (B,)."""
        tokens = self.generator(condition)
        head_delta = self.head(tokens) if self.head is not None else None
        results = None
        if with_signals:  # batched forwards of the frozen base model, in its own dtype (not autocast)
            signals, layout, _ = self._signals
            with torch.autocast(tokens.device.type, enabled=False):
                factors = detokenize(tokens.float(), layout)
                results = {name: signal(factors, index, step) for name, signal in signals.items()}
        return tokens, head_delta, results

    def train(self, mode: bool = True) -> "GeneratorWithHead":
        super().train(mode)
        if self._signals is not None:
            self._signals[2].eval()  # the frozen base stays in eval mode, also as a ZeRO-3 submodule
        return self

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: generator and head, never the frozen base."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}


class WarmupCosine:
    """LR factor: linear warm-up, then cosine decay to ``floor``, constant after ``total`` steps."""

    def __init__(self, warmup: int, total: int, floor: float):
        self.warmup, self.total, self.floor = max(0, warmup), max(1, total), floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def config_digest(cfg: TrainingConfig) -> str:
    """Digest of everything that must not change when a run is resumed (all but steps and intervals)."""
    data = to_dict(cfg)
    for key in ("steps", "save_every", "keep_checkpoints", "out_dir", "eval"):
        data.pop(key)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# Settings a resume may change: they change when and where results are written, not what is computed
# (each step's batch is a function of (seed, step), whatever the loader's workers; the evaluation draws
# no random numbers). ``steps`` may grow.
RESUME_MAY_CHANGE = ("steps", "save_every", "keep_checkpoints", "out_dir", "data.num_workers", "eval.every",
                     "eval.tasks", "eval.limit", "eval.data_dir")


def resume_settings(cfg: TrainingConfig) -> dict:
    """Every setting that determines the trained weights, as dotted keys: what a resume must keep."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = value

    walk("", to_dict(cfg))
    return {k: v for k, v in flat.items() if k not in RESUME_MAY_CHANGE}


class Trainer:
    """The training recipe. ``resume=True`` continues from ``<out_dir>/checkpoints/latest`` if present
    (refused, before any model is loaded, where it would not continue that run: ``check_resume``)."""

    def __init__(self, cfg: TrainingConfig, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.resume = resume
        self.progress = progress
        self.out = Path(cfg.out_dir)
        self.start_step = 0
        self.base_forwards = 0
        self.base: tuple | None = None  # (frozen base model, tokenizer) once loaded

    # --- setup ----------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        cfg = self.cfg
        self.accelerator = acc = make_accelerator(cfg)
        self.device = acc.device
        self.zero_stage = zero_stage(acc)
        self.digest, self.settings = config_digest(cfg), resume_settings(cfg)
        checkpoint = latest_checkpoint(self.out) if self.resume else None
        if checkpoint is not None:  # refused before any model is loaded
            self.start_step = check_resume(checkpoint, self.settings, self.digest, cfg.steps, acc.num_processes)
            if acc.is_main_process:
                print(f"{self.out}: resuming at step {self.start_step} from {checkpoint}", flush=True)
        teachers = load_teacher_set(cfg.data.teachers)
        include = list(cfg.data.tasks) if cfg.data.tasks is not None else None
        self.teachers = teachers.select(include=include, exclude=list(cfg.data.held_out))
        if cfg.eval.enabled:
            from .validation import check_eval_tasks

            check_eval_tasks(cfg.eval, teachers, self.teachers.task_names())
            if self.zero_stage == 3:
                raise LLGBMError("eval.every: the evaluation needs whole weights; set eval.every=0 under ZeRO-3")
        self.layout = self.teachers.layout
        self.batches = StepBatches(  # this process's slice of every step's global batch
            self.teachers, cfg.batch_size, cfg.generator.num_prompts, cfg.seed,
            rank=acc.process_index, world_size=acc.num_processes,
            need_tokens=cfg.loss.weight_loss == "token", need_factors=cfg.loss.weight_loss != "token",
        )
        self.encoder = TextEncoder(cfg.encoder, EmbeddingCache())  # on disk, shared by runs and ranks
        if self.zero_stage == 3:  # load it now, whole (see _setup_signals); later it would be partitioned
            with whole_models(acc):
                _ = self.encoder.model
        # every condition prompt once, in large batches, into the embedding cache: steps then only read it
        self.encoder.encode([p for task in self.teachers.task_names() for p in self.teachers.prompts(task)],
                            cfg.generator.condition_level)
        head = DeltaHead(self.layout, dim=cfg.loss.head_dim) if cfg.loss.mode == "delta_guided" else None
        self.trainable = GeneratorWithHead(self._generator(), head)
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio))
        self._setup_losses()
        if cfg.loss.uses_delta:
            with whole_models(acc):
                base = self._setup_signals()
            self.trainable.attach_signals(self.signals, self.layout, base, partition_base=self.zero_stage == 3)
        if checkpoint is not None:  # weights before wrapping: DDP broadcasts them, ZeRO partitions them
            load_weights(checkpoint, self.trainable)
        configure_deepspeed(acc, cfg)
        # the scheduler is not prepared: accelerate's wrapper would step it num_processes times a step
        self.model, self.optimizer = acc.prepare(self.trainable, self.optimizer)
        # under ZeRO, the engine's partitioned optimizer around our AdamW (whose lr the scheduler sets)
        self.zero_optimizer = self.optimizer.optimizer if self.zero_stage else None
        self.validator = self._validator(teachers)
        # the condition / target noise: seeded after all setup, which may draw (building a model does)
        torch.manual_seed(cfg.seed + acc.process_index)
        if checkpoint is not None:
            load_training_state(checkpoint, self.optimizer, self.scheduler, acc.process_index, self.zero_optimizer)
            self.base_forwards = self._logged_base_forwards()
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            info = {"base_model": self.teachers.model_name, "layout": self.layout.to_dict(),
                    "tasks": self.teachers.task_names(), "held_out": list(cfg.data.held_out)}
            write_text(self.out / RUN_INFO, json.dumps(info, indent=1) + "\n")
        return self

    def _validator(self, teachers):
        """The evaluation of ``eval.tasks`` (main process; None when off), on the signals' base model if any."""
        cfg = self.cfg
        if not (cfg.eval.enabled and self.accelerator.is_main_process):
            return None
        from ..models.registry import load_base_model, resolve_base_model
        from .validation import Validator

        if self.base is None:
            self.base = load_base_model(resolve_base_model(teachers.model_name), dtype=cfg.dtype, device=self.device)
        model, tokenizer = self.base
        self.encoder.encode([p for task in cfg.eval.tasks for p in teachers.prompts(task)],
                            cfg.generator.condition_level)
        self.out.mkdir(parents=True, exist_ok=True)
        return Validator(cfg.eval, teachers, model, tokenizer, cfg.generator.num_prompts, cfg.seed, self.out)

    def _generator(self) -> nn.Module:
        """The generator; with ``generator.prior=teacher_init`` its prior is the teachers' shared initial adapter."""
        cfg = self.cfg.generator
        generator = build_generator(cfg, self.layout)
        if cfg.prior == "teacher_init":
            from ..generator.build import prior_tokens_from

            if self.teachers.init_adapter is None:
                raise LLGBMError(f"{self.teachers.root / 'manifest.json'}: generator.prior=teacher_init needs teachers "
                                 "trained from one shared initialisation (llgbm teachers --init shared)")
            generator.set_prior(prior_tokens_from(self.teachers.init_adapter, self.layout, cfg.prior_b_std, cfg.seed))
        return generator

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW; the generator's shared token offset (if any) in its own group at ``optim.offset_lr``."""
        o = self.cfg.optim
        offset = getattr(self.trainable.generator, "offset", None)
        params = [p for p in self.trainable.parameters() if p.requires_grad and p is not offset]
        groups = [{"params": params}]
        if offset is not None:
            groups.append({"params": [offset], "lr": o.offset_lr or o.lr})
        if o.eight_bit and torch.cuda.is_available():
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
            except ImportError:
                pass
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)

    def _setup_losses(self) -> None:
        loss = self.cfg.loss
        if loss.weight_loss == "token":
            weight = None
            if loss.criterion_weight:
                from ..lora.criterion_weights import load_criterion_weight

                weight = load_criterion_weight(loss.criterion_weight, self.layout)
            self.weight_loss = TokenMSELoss(weight).to(self.device)
        elif loss.weight_loss == "ab":
            self.weight_loss = WeightLoss()
        else:
            self.weight_loss = DeltaWLoss(scaling=self.layout.scaling)
        if loss.mode == "delta_guided":
            self.guided = DeltaGuidedLoss(loss.lambda_pred, loss.lambda_computed, loss.lambda_consistency, loss.delta_kind)
        else:
            lambda_weight = 0.0 if loss.mode == "delta_only" else loss.lambda_weight
            self.objective = BehaviourLoss(self.weight_loss, lambda_weight, loss.signal_lambdas())

    def _setup_signals(self) -> nn.Module:
        """Frozen base model and the behaviour signals, with the teacher targets of every training adapter
        (from the cache; misses split over the ranks). Returns the base model."""
        from ..delta.cache import DeltaCache
        from ..models.registry import load_base_model, resolve_base_model
        from ..signals import build_signals

        cfg, d = self.cfg, self.cfg.delta
        model_dir = resolve_base_model(self.teachers.model_name)
        model, tokenizer = load_base_model(model_dir, dtype=cfg.dtype, device=self.device)
        self.base = (model, tokenizer)
        if d.gradient_checkpointing:
            from ..delta.functional import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        tasks = self.teachers.task_names()
        self.signals = build_signals(cfg.loss.signals, model, tokenizer, self.teachers, tasks,
                                     base_model=self.teachers.model_name, model_dir=model_dir, delta=d, kl=cfg.kl,
                                     delta_kind=cfg.loss.delta_kind, seed=cfg.seed)
        cache = DeltaCache(d.cache or Path(cfg.data.teachers) / "deltas")
        paths = [Path(e.path) for e in self.teachers.entries]
        entry_tasks = [e.task for e in self.teachers.entries]
        show = self.progress and self.accelerator.is_main_process
        for signal in self.signals.values():
            signal.prepare(paths, entry_tasks, cache, d.batch_size, progress=show)
        return model

    def _logged_base_forwards(self) -> int:
        """Base-model forwards counted up to the resumed step (from metrics.jsonl)."""
        count = 0
        for record in self._read_metrics():
            if record["step"] < self.start_step:
                count = record.get("base_forwards", count)
        return int(count)

    # --- training ---------------------------------------------------------------------------------
    def signal_lambdas(self, step: int) -> dict[str, float]:
        """λ of each behaviour signal at ``step`` (ramped over ``loss.lambda_delta_warmup`` steps)."""
        loss = self.cfg.loss
        ramp = 1.0 if loss.lambda_delta_warmup <= 0 else min(1.0, (step + 1) / loss.lambda_delta_warmup)
        return {name: value * ramp for name, value in loss.signal_lambdas().items()}

    def _loss_step(self, batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        condition = self.encoder.condition(batch.prompts, cfg.generator.condition_level, self.device)
        if cfg.loss.noise > 0:
            condition = torch.randn_like(condition).mul_(cfg.loss.noise).add_(condition)  # = c + σ·ε, in one buffer
        with_signals = cfg.loss.uses_delta and (cfg.loss.mode != "delta_guided" or step % cfg.loss.delta_every == 0)
        index = batch.indices.to(self.device)
        with self.accelerator.autocast():
            tokens, head_delta, results = self.model(condition, index, step, with_signals)  # (B, N_tok, H, W), (B, H)
        self.base_forwards += int(with_signals) * len(cfg.loss.signals)
        weight_pred = weight_target = None
        if cfg.loss.weight_loss == "token":
            target = batch.tokens.to(self.device)
            if cfg.loss.noise > 0:
                target = torch.randn_like(target).mul_(0.1 * cfg.loss.noise).add_(target)
            weight_pred, weight_target = tokens, target
        else:
            weight_pred = detokenize(tokens, self.layout)
            weight_target = {p: (a.to(self.device), b.to(self.device)) for p, (a, b) in batch.factors.items()}
        signal_losses = {name: r.loss for name, r in results.items()} if results else None
        lambdas = self.signal_lambdas(step)
        if cfg.loss.mode == "delta_guided":
            teacher = self.signals["delta"].targets[index].mean(1)  # (B, H) the teachers' probe-averaged Δ
            computed = results["delta"].summary[0] if results else None
            result = self.guided(head_delta, teacher, computed, signal_losses, lambdas)
            loss = result["loss"]
            with torch.set_grad_enabled(cfg.loss.lambda_weight > 0):
                weight = self.weight_loss(weight_pred, weight_target)["loss"]
            if cfg.loss.lambda_weight > 0:
                loss = loss + cfg.loss.lambda_weight * weight
            logs = {**result, "loss/weight": weight.detach()}
        else:
            self.objective.lambdas = lambdas
            result = self.objective(weight_pred=weight_pred, weight_target=weight_target, signals=signal_losses)
            loss = result["loss"]
            logs = {**result, **{f"lambda_{name}": torch.tensor(value) for name, value in lambdas.items()}}
        logs["loss"] = loss.detach()
        return loss, self._mean_over_processes(logs)

    def _mean_over_processes(self, logs: dict) -> dict[str, float]:
        """Each logged value averaged over the processes: the value of the global batch (equal shares)."""
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32).detach().reshape(()) for v in logs.values()])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values.to(self.device), reduction="mean")
        return dict(zip(logs, values.tolist()))

    def train(self, until: int | None = None) -> dict[str, float]:
        """Train from the start (or resumed) step to ``cfg.steps`` (or stop after step ``until``)."""
        cfg, acc = self.cfg, self.accelerator
        stop = cfg.steps if until is None else min(until, cfg.steps)
        loader = batch_loader(self.batches, self.start_step, stop, cfg.data.num_workers)
        self._truncate_metrics(self.start_step)
        bar = tqdm(total=cfg.steps, initial=self.start_step, desc="train", unit="step",
                   disable=not (self.progress and acc.is_main_process))
        self.model.train()
        last: dict[str, float] = {}
        for batch in loader:
            step = batch.step
            started = time.perf_counter()
            loss, logs = self._loss_step(batch, step)
            acc.backward(loss)  # DeepSpeed: also clips and steps its optimizer
            grad_norm = self._clip_gradients()
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            logs.update(step=step, lr=lr, grad_norm=float(grad_norm), step_time=time.perf_counter() - started,
                        base_forwards=self.base_forwards)
            if not all(math.isfinite(v) for k, v in logs.items() if k.startswith("loss")):
                raise DivergedError(f"{self.out}: training diverged at step {step} (loss {logs['loss']}, grad norm "
                                    f"{logs['grad_norm']:.3g}, lr {lr:.3g}); lower optim.lr or the λs")
            last = logs
            if acc.is_main_process:
                self._append_metrics(logs)
                bar.set_postfix(loss=f"{logs['loss']:.4g}")
            bar.update(1)
            if self.validator is not None and ((step + 1) % cfg.eval.every == 0 or step + 1 == cfg.steps):
                self._evaluate(step)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                self.save(step + 1)
        bar.close()
        return last

    def _evaluate(self, step: int) -> None:
        """Log the eval tasks' accuracy and recovery after ``step`` (a row of its own in metrics.jsonl)."""
        started = time.perf_counter()
        logs = self.validator(self.trainable.generator, self.encoder, self.cfg.generator.condition_level, self.device)
        self.model.train()
        self._append_metrics({"step": step, **logs, "eval_time": time.perf_counter() - started})

    def _clip_gradients(self) -> float:
        """Clip to ``optim.max_grad_norm`` (0: no clipping); the gradient norm before clipping."""
        if self.zero_stage:  # the engine clipped inside backward; this reads its norm
            return float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm))
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.optim.max_grad_norm > 0:
            return float(self.accelerator.clip_grad_norm_(params, self.cfg.optim.max_grad_norm))
        return float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))

    # --- saving -----------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        """Checkpoint (every process stages its own state, the main process writes) and refresh the loss curves."""
        acc = self.accelerator
        acc.wait_for_everyone()
        # ZeRO-3 gathers the partitioned weights (a collective: every process takes part)
        weights = gathered_weights(self.trainable) if self.zero_stage == 3 else self.trainable.trained_state()
        save_rank_state(self.out, step, acc.process_index, replica=None if self.zero_stage == 3 else weights,
                        zero_partition=zero_partition(self.zero_optimizer) if self.zero_optimizer is not None else None)
        acc.wait_for_everyone()
        if acc.is_main_process:
            optimizer_state = None if self.zero_optimizer is not None else self.optimizer.state_dict()
            save_checkpoint(self.out, step, weights, optimizer_state, self.scheduler.state_dict(), self.digest,
                            processes=acc.num_processes, zero_stage=self.zero_stage, keep=self.cfg.keep_checkpoints,
                            settings=self.settings)
            records = self._read_metrics()
            plot_metrics([r for r in records if "loss" in r], self.out / "loss_curves.png")
            plot_recovery(records, self.out / "recovery_curves.png")
        acc.wait_for_everyone()

    def _append_metrics(self, logs: dict) -> None:
        path = self.out / "metrics.jsonl"
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(logs) + "\n")
        except OSError as e:  # e.g. a full disk: name the file
            e.filename = e.filename or str(path)
            raise

    def _read_metrics(self) -> list[dict]:
        """Logged records; a last line cut short by a killed process is left out."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return []
        text = path.read_text()
        lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
        return [json.loads(line) for line in lines if line.strip()]

    def _truncate_metrics(self, start: int) -> None:
        """On resume, drop metrics of steps after the checkpoint (they will be logged again)."""
        if not self.accelerator.is_main_process:
            return
        records = [r for r in self._read_metrics() if r["step"] < start]
        write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    def cleanup(self) -> None:
        self.accelerator.wait_for_everyone()
        self.accelerator.free_memory()
        self.accelerator.end_training()  # closes the process group of a multi-process run
