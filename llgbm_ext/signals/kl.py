"""The KL signal: the generated adapter's next-token distributions against its teacher's, where it answers.

For every task, ``examples`` training inputs (context + gold answer, in the teachers' answer format,
from ``<task>/train_inputs.json``) are encoded once as training sequences (``teachers.batches``). The
teacher's distribution at each answer position (teacher-forced on the gold answer) is cached as its
top-k log-probabilities (``losses.kl.teacher_topk``); each step, every generated adapter is run on
``per_step`` of its task's inputs, drawn as a function of (seed, step), and ``TopKKLLoss`` compares
the two. All K adapters × inputs go through one ``FunctionalLoRA`` forward; the LM head runs only at
the answer positions.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.formatting import PromptFormat
from ..data.teacher_set import TeacherSet
from ..delta.cache import DeltaContext
from ..delta.deltas import load_teacher_factors, model_dtype
from ..delta.functional import FunctionalLoRA
from ..lora.factors import LoraFactors
from ..losses.kl import TopKKLLoss, teacher_topk
from ..teachers.batches import encode_pairs
from .base import BehaviourSignal, SignalError, SignalResult

ENCODING_VERSION = 1  # bump when the encoding of the inputs below changes


class KLSignal(BehaviourSignal):
    """KL(teacher ‖ generated) at the answer positions of each task's own training inputs.

    Args:
        model, tokenizer: the frozen base model.
        teachers: the teacher set (layout, training inputs and answer format of each task).
        tasks: the tasks whose adapters are compared.
        examples: training inputs per task whose teacher distributions are cached.
        per_step: inputs per adapter and step.
        top_k: teacher log-probabilities kept per position (plus the rest of the mass).
        max_length: tokens per sequence (contexts lose their beginning, as in teacher training).
        seed: the inputs of step s are drawn from (seed, s).
        base_model, model_dir: the base model's name and directory (cache context).
    """

    name = "kl"

    def __init__(self, model: nn.Module, tokenizer, teachers: TeacherSet, tasks: Sequence[str], *, base_model: str,
                 model_dir: str | os.PathLike, examples: int = 32, per_step: int = 4, top_k: int = 32,
                 max_length: int = 96, seed: int = 0):
        super().__init__(model, teachers.layout, base_model, model_dir)
        if not 1 <= per_step <= examples:
            raise SignalError(f"kl.per_step must be in [1, kl.examples = {examples}], got {per_step}")
        vocab = model.get_output_embeddings().weight.shape[0]
        if not 1 <= top_k <= vocab:
            raise SignalError(f"kl.top_k must be in [1, {vocab}] (the vocabulary), got {top_k}")
        self.examples, self.per_step, self.top_k, self.max_length, self.seed = examples, per_step, top_k, max_length, seed
        self.lora = FunctionalLoRA(model, teachers.layout)
        self.criterion = TopKKLLoss()
        encoded, self._hashes = [], []
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        for task in tasks:
            inputs = teachers.train_inputs(task)
            if len(inputs) < examples:
                raise SignalError(f"kl.examples={examples}: task {task!r} has only {len(inputs)} training inputs")
            inputs = inputs[:examples]
            fmt = PromptFormat(**teachers.tasks[task]["format"]) if teachers.tasks[task].get("format") else PromptFormat()
            encoded.append(encode_pairs(task, [r["context"] for r in inputs], [r["answer"] for r in inputs], tokenizer,
                                        fmt, max_length, pad))
            text = json.dumps({"inputs": inputs, "format": teachers.tasks[task].get("format"), "max_length": max_length,
                               "encoding": ENCODING_VERSION, "ids": encoded[-1].ids.tolist()})
            self._hashes.append(hashlib.sha256(text.encode()).hexdigest()[:16])
        self.set_of_task = {t: i for i, t in enumerate(tasks)}
        width = max(e.ids.shape[1] for e in encoded)
        answer = max(int(e.num_target.max()) for e in encoded)  # A: answer positions per input, at most
        self.input_ids = torch.stack([nn.functional.pad(e.ids, (0, width - e.ids.shape[1]), value=pad) for e in encoded])
        steps = torch.arange(width)
        self.attention_mask = torch.stack([(steps < e.lengths[:, None]).long() for e in encoded])  # (S, E, T)
        first = torch.stack([e.lengths - e.num_target - 1 for e in encoded])  # (S, E): predicts the first answer token
        offsets = torch.arange(answer)
        self.valid = offsets < torch.stack([e.num_target for e in encoded])[..., None]  # (S, E, A)
        self.positions = (first[..., None] + offsets).clamp(max=width - 1) * self.valid  # (S, E, A)
        for name in ("input_ids", "attention_mask", "valid", "positions"):
            setattr(self, name, getattr(self, name).to(self.device))

    def context(self, input_set: int) -> DeltaContext:
        settings = {"signal": "kl", "top_k": self.top_k, "dtype": str(model_dtype(self.model)).removeprefix("torch.")}
        return DeltaContext(base_model=self.base_model, fingerprint=self.fingerprint, probe_hash=self._hashes[input_set],
                            settings=settings)

    def _answer_logits(self, factors: LoraFactors, sets: Tensor, picks: Tensor) -> Tensor:
        """Logits (K, n, A, V) of K adapters at the answer positions of their inputs ``picks`` (K, n)."""
        k, n = picks.shape
        rows = (sets[:, None], picks)
        ids, mask = self.input_ids[rows].flatten(0, 1), self.attention_mask[rows].flatten(0, 1)  # (K*n, T)
        with self.lora.apply(factors):
            hidden = self.lora.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        positions = self.positions[rows].flatten(0, 1)  # (K*n, A)
        at = hidden[torch.arange(k * n, device=hidden.device)[:, None], positions]  # (K*n, A, H)
        return self.model.get_output_embeddings()(at).float().view(k, n, *positions.shape[1:], -1)

    @torch.no_grad()
    def compute_targets(self, paths, sets, progress=False, batch_size: int = 8) -> Tensor:
        """(N, E·A, 2k + 1): the teacher's top-k at every answer position of its task's inputs, for
        ``batch_size`` adapters × ``batch_size`` inputs per forward."""
        width = self.examples * self.valid.shape[-1]
        out = [torch.zeros(0, width, 2 * self.top_k + 1, device=self.device)]
        examples = torch.arange(self.examples, device=self.device)
        with tqdm(total=len(paths), desc="teacher logits", unit="adapter", disable=not progress) as bar:
            for start in range(0, len(paths), batch_size):
                chunk = list(paths[start : start + batch_size])
                chunk_sets = torch.tensor(list(sets[start : start + batch_size]), device=self.device)
                factors = load_teacher_factors(chunk, self.layout, model_dtype(self.model), self.device)
                picks = [part.expand(len(chunk), -1) for part in examples.split(batch_size)]
                logits = torch.cat([self._answer_logits(factors, chunk_sets, p) for p in picks], dim=1)  # (K, E, A, V)
                top = teacher_topk(logits, self.top_k) * self.valid[chunk_sets][..., None]  # padding positions: 0
                out.append(top.flatten(1, 2))
                bar.update(len(chunk))
        return torch.cat(out)

    def picks(self, k: int, step: int) -> Tensor:
        """(K, per_step) input indices of step ``step`` for K adapters: a function of (seed, step)."""
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        order = rng.random((k, self.examples)).argsort(axis=1)[:, : self.per_step]
        return torch.from_numpy(order).to(self.device)

    def loss(self, factors: LoraFactors, targets: Tensor, sets: Tensor, step: int) -> SignalResult:
        k = targets.shape[0]
        picks = self.picks(k, step)
        logits = self._answer_logits(factors, sets, picks)  # (K, n, A, V)
        teacher = targets.view(k, self.examples, -1, targets.shape[-1])[torch.arange(k, device=self.device)[:, None], picks]
        return SignalResult(self.criterion(logits, teacher, self.valid[sets[:, None], picks]))
