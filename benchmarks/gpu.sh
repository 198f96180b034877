#!/usr/bin/env bash
# GPU benchmarks in one call of at most 5 minutes, from the repository root:
#
#     bash benchmarks/gpu.sh          # on a machine with a CUDA GPU
#     bash benchmarks/gpu.sh --cpu    # a dry run of the same steps on the CPU with tiny sizes (a few minutes)
#
# Assumes a copy of this repository and a Python that has torch (a CUDA build), transformers, accelerate,
# safetensors, tokenizers, pyyaml and tqdm: the repository's .venv if its Python runs there and its torch
# sees a GPU, else `python3` on PATH. Nothing is installed and nothing is downloaded (no internet needed):
# the package is imported from this repository (PYTHONPATH), the models are random-weight Qwen2.5
# geometries or the shipped tiny model, and the Hugging Face hub is switched off.
#
# Parts, each under its own time limit, cut to what is left of a 280 s budget for the whole script:
#   delta-qwen0.5b, delta-qwen1.5b  benchmarks/delta.py: K = 8 and K = 32 adapters x 5 probes, bf16, full
#                                   depth, batched vs a loop over adapters vs the plain model;
#   tokens-qwen0.5b                 benchmarks/tokens.py: the 0.5B layout on the GPU, vectorised vs a loop;
#   train-tiny, train-qwen0.5b      benchmarks/train.py: generator training, a step with the delta term vs a
#                                   weight-only step (300 steps on tiny, 100 on a random-weight Qwen2.5-0.5B).
# Logs go to $OUT if set (else runs/benchmarks/gpu-<date>); the ratio lines of all parts are printed at
# the end side by side and written to $OUT/summary.txt.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODE=cuda
case "${1:-}" in
  "") ;;
  --cpu) MODE=cpu ;;
  *) echo "benchmarks/gpu.sh: unknown argument '$1' (only --cpu)" >&2; exit 2 ;;
esac
OUT=${OUT:-$ROOT/runs/benchmarks/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" || { echo "benchmarks/gpu.sh: cannot create OUT=$OUT" >&2; exit 2; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
BUDGET=280
RATIO='^[a-z][a-z0-9_]*=[^ ]+$'  # the machine-readable lines of the benchmarks: key=value

# the first Python whose torch imports (and, unless --cpu, sees a GPU)
NEED=$([ "$MODE" = cuda ] && echo "assert torch.cuda.is_available(), 'no CUDA device'" || echo "pass")
PY=
for candidate in "$ROOT/.venv/bin/python" python3 python; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch, transformers; $NEED" >/dev/null 2>&1; then
    PY=$(command -v "$candidate"); break
  fi
done
if [ -z "$PY" ]; then
  echo "benchmarks/gpu.sh: no Python with torch and transformers$([ "$MODE" = cuda ] && echo " and a CUDA device") (tried .venv/bin/python, python3, python)" >&2
  exit 2
fi
{
  echo "date $(date -u +%FT%TZ), mode $MODE, python $PY"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
: > "$OUT/summary.txt"

part() {  # part NAME LIMIT_SECONDS COMMAND...: run under min(limit, what is left of the budget), log, collect ratios
  local name=$1 limit=$2 left=$((BUDGET - SECONDS)) rc
  shift 2
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    echo "== $name: skipped, the time budget is spent"; echo "$name skipped budget" >> "$OUT/summary.txt"; return
  fi
  echo "== $name (limit ${limit}s): ${*#"$ROOT/"}"
  local start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  grep -v -E "$RATIO" "$OUT/$name.log" | grep -v -i -E 'warn|^\s*$' | tail -n 20
  grep -E "$RATIO" "$OUT/$name.log" | sed "s/=/ /; s/^/$name /" >> "$OUT/summary.txt"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "   $name: stopped at its limit of ${limit}s"; echo "$name timed_out ${limit}s" >> "$OUT/summary.txt"
  elif [ "$rc" -ne 0 ]; then
    echo "   $name: failed (exit $rc), see $OUT/$name.log"; tail -n 5 "$OUT/$name.log"; echo "$name failed rc=$rc" >> "$OUT/summary.txt"
  fi
  echo "   ($((SECONDS - start)) s)"
}

B="$ROOT/benchmarks"
if [ "$MODE" = cuda ]; then
  part delta-qwen0.5b 50 "$PY" "$B/delta.py" --device cuda --geometry qwen2.5-0.5b --dtype bf16 --adapters 8 32 \
    --probes 5 --repeats 5
  part delta-qwen1.5b 55 "$PY" "$B/delta.py" --device cuda --geometry qwen2.5-1.5b --dtype bf16 --adapters 8 32 \
    --probes 5 --repeats 5
  part tokens-qwen0.5b 35 "$PY" "$B/tokens.py" --layout qwen2.5-0.5b --device cuda --repeats 5
  part token-loss-qwen1.5b 25 "$PY" "$B/token_loss.py" --layout qwen2.5-1.5b --batch 8 --device cuda
  part train-tiny 65 "$PY" "$B/train.py" --device cuda --steps 300 --warmup 20
  part train-qwen0.5b 120 "$PY" "$B/train.py" --device cuda --geometry qwen2.5-0.5b --dtype bf16 --steps 100 \
    --warmup 10 data.num_workers=4
else  # the same steps at CPU sizes, fp32 (bf16 matmuls are very slow on most CPUs), one thread each
  export OMP_NUM_THREADS=1
  part delta-tiny 50 "$PY" "$B/delta.py" --device cpu --geometry tiny --adapters 2 4 --probes 2 --repeats 1 \
    --threads 1 --no-memory
  part delta-qwen0.5b-1layer 55 "$PY" "$B/delta.py" --device cpu --geometry qwen2.5-0.5b --layers 1 --adapters 2 \
    --probes 1 --repeats 1 --threads 1 --no-memory
  part tokens-tiny 25 "$PY" "$B/tokens.py" --layout tiny --device cpu --repeats 2
  part token-loss-tiny 20 "$PY" "$B/token_loss.py" --layout tiny --device cpu --repeats 5
  part train-tiny 65 "$PY" "$B/train.py" --device cpu --steps 12 --warmup 2 --teachers 1 batch_size=2
  part train-qwen0.5b-1layer 85 "$PY" "$B/train.py" --device cpu --geometry qwen2.5-0.5b --layers 1 --steps 3 \
    --warmup 1 --teachers 1 batch_size=2
fi

echo "== summary ($MODE, ${SECONDS} s; logs in $OUT)"
if command -v column >/dev/null; then column -t "$OUT/summary.txt"; else cat "$OUT/summary.txt"; fi
