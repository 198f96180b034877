"""CPU smoke task for the llgbm_ext DnD plugin: DnD's training loop on LoRAs of the tiny base model.

Laid over DnD's ``workspace/`` (``llgbm dnd overlay``), it is built like DnD's task scripts
(``workspace/main/tasks/*/train_*.py``): it locates the repository root by the folder name
``Drag-and-Drop-LLMs`` and changes into it, sets everything up at import time, and trains DnD's own
``Text2Qwen25LoRA_FullCondDataset`` + ``HyperConvDecoderModel_FullCond`` + ``WarmupScheduler`` with the
same forward/backward/step calls and the same ``step:N Loss: x`` log line. So running it through
``llgbm_ext.dnd.runner`` (with or without hooks) exercises exactly what a real DnD run does, in seconds:

    python -m llgbm_ext.dnd.runner --llgbm-config ../llgbm/configs/smoke.yaml tasks/llgbm_smoke/train_tinylora_Smoke.py
    LLGBM_LAUNCH_FLAGS="--cpu --mixed_precision=no" bash /path/to/llgbm_ext/scripts/launch_llgbm.sh \
        tasks/llgbm_smoke/train_tinylora_Smoke.py 1 --llgbm-config ../llgbm/configs/smoke.yaml

Differences from DnD's scripts, all to run on a CPU offline: a tiny HyperConv (features
(4,16,384) -> (16,12,64) -> (152,10,66), kernel 3) predicting the 152 tokens (10, 66) of the ``tiny``
layout; a tokenizer for that layout built from DnD's own ``LoraTokenizer2D_Qwen`` and
``Tokenizer2D.with_scales_wrapper``; the offline all-MiniLM-L6-v2 text encoder instead of MiniLM-L12;
``torch.optim.AdamW`` instead of bitsandbytes' CUDA-only AdamW8bit; no wandb; the scheduler steps on
every process. Data (``llgbm_ext.dnd.smoke``) is created on first use. ``LLGBM_SMOKE_STEPS`` (default 4,
at least 2) and ``LLGBM_SMOKE_WORKERS`` (DataLoader workers, default 2) size the run.
"""

import json
import os
import sys

parts = os.path.abspath(__file__).split(os.sep)
root = os.sep.join(parts[: parts.index("Drag-and-Drop-LLMs") + 1])
sys.path.append(root)
os.chdir(root)

import torch
import accelerate.utils
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoTokenizer

from llgbm_ext.dnd.smoke import SMOKE_DIR, SMOKE_TASKS, ensure_smoke_data
from llgbm_ext.generator.text_encoder import resolve_sentence_model
from llgbm_ext.lora.layout import TINY
from workspace.dnd.dataset import Text2Qwen25LoRA_FullCondDataset as Dataset
from workspace.dnd.model import HyperConvDecoderModel_FullCond as Model
from workspace.dnd.module import WarmupScheduler
from workspace.dnd.tokenizer.tokenizer import LoraTokenizer2D_Qwen, Tokenizer2D
from workspace.dnd.tools import calculate_mean_criterion_weight

SEED = 999
accelerate.utils.set_seed(SEED)
accelerator = Accelerator()
with accelerator.main_process_first():
    ensure_smoke_data(root)

DATASET_ROOT = f"./{SMOKE_DIR}/checkpoints"
COND_ROOT = f"./{SMOKE_DIR}/prompts"
CONFIG_ROOT = f"./{SMOKE_DIR}/criterion_weights"
extractor = str(resolve_sentence_model("all-MiniLM-L6-v2"))
datasets = list(SMOKE_TASKS[:-1])
dataset_tag = SMOKE_TASKS[-1]
total_steps = max(2, int(os.environ.get("LLGBM_SMOKE_STEPS", "4")))  # DnD's WarmupScheduler needs > warmup
max_text_length = 16


@Tokenizer2D.with_scales_wrapper
class TinyLoRA_Tokenizer2D(LoraTokenizer2D_Qwen):
    """DnD's Qwen LoRA token scheme for the tiny layout: A-chunks, then Bᵀ-chunks, 64 columns each."""

    _tokenize_weightchunkin = Tokenizer2D._tokenize_weightchunkin  # DnD's chunk helpers (the Qwen
    _detokenize_weightchunkin = Tokenizer2D._detokenize_weightchunkin  # tokenizers each repeat them)

    def selector(self, key: str) -> tuple[str, list, int]:
        module = key.rsplit(".", 2)[0]
        projection = module.rsplit(".", 1)[1]
        return "lora", [f"{module}.lora_A.weight", f"{module}.lora_B.weight"], sum(TINY.tokens_per_module(projection))

    def _tokenize_lora(self, lora_a, lora_b, num_tokens):
        tokens_a, scales_a = self._tokenize_weightchunkin(lora_a, lora_a.shape[1] // TINY.chunk)
        tokens_b, scales_b = self._tokenize_weightchunkin(lora_b.transpose(0, 1), lora_b.shape[0] // TINY.chunk)
        return tokens_a + tokens_b, scales_a + scales_b

    def _detokenize_lora(self, fake_a, fake_b, tokens, scales):
        count = fake_a.shape[1] // TINY.chunk
        lora_a = self._detokenize_weightchunkin(fake_a, tokens[:count], scales[:count])[0]
        lora_bt = self._detokenize_weightchunkin(fake_b.transpose(0, 1), tokens[count:], scales[count:])[0]
        return lora_a, lora_bt.transpose(0, 1)


config = {
    "model_tag": os.path.basename(__file__)[:-3].split("_")[1],
    "dataset_tag": "Smoke",
    "token_size": TINY.token_size,
    "real_length": 6,
    "generated_file": f"./{SMOKE_DIR}/generated/",
    "batch_size": 4,
    "num_workers": int(os.environ.get("LLGBM_SMOKE_WORKERS", "2")),
    "prefetch_factor": 1,
    "warmup_steps": 1,
    "total_steps": total_steps,
    "learning_rate": 1e-3,
    "weight_decay": 0.1,
    "max_grad_norm": 1.0,
    "save_every": total_steps,
    "print_every": 1,
    "num_texts": 4,
    "save_folder": "./checkpoints",
    "noise_enhance": 0.0001,
    "criterion_weight": calculate_mean_criterion_weight([f"{CONFIG_ROOT}/{d}/criterion_weight.pt" for d in datasets]),
    "extractor_type": "BERT",
    "text_tokenizer": AutoTokenizer.from_pretrained(extractor),
    "extra_condition_module": AutoModel.from_pretrained(extractor).to(accelerator.device),
    "max_text_length": max_text_length,
    "model_config": {
        "features": [(4, max_text_length, 384), (16, 12, 64), (TINY.num_tokens, *TINY.token_size)],
        "condition_dim": (4, max_text_length, 384),
        "kernel_size": 3,
    },
}
config["tag"] = config["model_tag"] + "__" + config["dataset_tag"]

tokenizer = TinyLoRA_Tokenizer2D(token_size=config["token_size"])
Dataset.dtype = torch.bfloat16
expected_iteration = config["total_steps"] * config["batch_size"]


def prompts(name: str) -> list:
    with open(f"{COND_ROOT}/{name}_train.json", encoding="utf-8") as f:
        return json.load(f)


train_set = Dataset(
    checkpoint_folders=[f"{DATASET_ROOT}/{d}" for d in datasets],
    tokenizer=tokenizer,
    expected_iteration=expected_iteration,
    num_texts=config["num_texts"],
    text_tokenizer=config["text_tokenizer"],
    max_text_length=config["max_text_length"],
    real_length=config["real_length"],
    texts=[prompts(d) for d in datasets],
)
test_set = Dataset(
    checkpoint_folders=[f"{DATASET_ROOT}/{dataset_tag}"],
    tokenizer=tokenizer,
    expected_iteration=expected_iteration,
    num_texts=config["num_texts"],
    text_tokenizer=config["text_tokenizer"],
    max_text_length=config["max_text_length"],
    real_length=config["real_length"],
    texts=[prompts(dataset_tag)],
)

config["batch_size"] = config["batch_size"] // int(os.environ["NUM_PROCESSES"])
workers = config["num_workers"]
train_loader = DataLoader(
    dataset=train_set,
    batch_size=config["batch_size"],
    num_workers=workers,
    prefetch_factor=config["prefetch_factor"] if workers else None,
    collate_fn=train_set.collate_fn_train,
    drop_last=True,
    shuffle=True,
)
eval_iterator = iter(DataLoader(dataset=train_set, batch_size=1, collate_fn=train_set.collate_fn_test))
test_iterator = iter(DataLoader(dataset=test_set, batch_size=1, collate_fn=test_set.collate_fn_test))

model = Model(
    config=config["model_config"],
    criterion_weight=config["criterion_weight"].view(1, -1, 1, 1),
    extractor_type=config["extractor_type"],
    extra_condition_module=config["extra_condition_module"],
)
optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], weight_decay=config["weight_decay"])
scheduler = WarmupScheduler(optimizer=optimizer, warmup_steps=config["warmup_steps"], total_steps=config["total_steps"])

if __name__ == "__main__":
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)


def train():
    window_loss, window_steps = 0.0, 0
    model.train()
    for batch_idx, (tokens, cond_id, cond_mask) in enumerate(train_loader):
        conditions = {"input_ids": cond_id.to(accelerator.device), "attention_mask": cond_mask.to(accelerator.device)}
        optimizer.zero_grad()
        tokens = tokens.to(accelerator.device)
        mask = ~torch.isnan(tokens)
        tokens = torch.nan_to_num_(tokens, nan=0.0)
        with accelerator.autocast():
            loss = model(
                source=None, mask=mask, condition=conditions, target=tokens, noise_enhance=config["noise_enhance"]
            )
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), config["max_grad_norm"])
        optimizer.step()
        scheduler.step(batch_idx)
        if accelerator.is_main_process:
            window_loss, window_steps = window_loss + loss.item(), window_steps + 1
            if window_steps == config["print_every"]:
                print(f"step:{batch_idx} Loss: {window_loss / window_steps:.6f}")
                window_loss, window_steps = 0.0, 0
            if batch_idx % config["save_every"] == 0:
                state = {k: v for k, v in accelerator.unwrap_model(model).state_dict().items()
                         if not k.startswith("condition_module")}
                os.makedirs(config["save_folder"], exist_ok=True)
                torch.save(state, os.path.join(config["save_folder"], config["tag"] + ".pth"))
                generate(eval_iterator, batch_idx // config["save_every"])
        if batch_idx >= config["total_steps"]:
            break


def generate(iterator, idx):
    model.eval()
    tokens, cond_id, cond_mask, tag = next(iterator)
    conditions = {"input_ids": cond_id.to(accelerator.device), "attention_mask": cond_mask.to(accelerator.device)}
    predict = accelerator.unwrap_model(model).generate(
        source=None, mask=None, condition=conditions, target=None
    )
    print("generated_l2norm:", torch.square(predict).mean().item())
    train_set.save_checkpoint(save_path=config["generated_file"], tokens=predict[0].float(), tag=tag, number=idx)
    model.train()
    return predict


if __name__ == "__main__":
    train()
