#!/usr/bin/env bash
# Rebuild the demo model bundled in src/gpt2s/assets/demo/ (GPT-2 "mini": 4 layers, 4 heads,
# n_embd 128, n_ctx 256, the GPT-2 vocabulary; 7.3M parameters) from Tiny Shakespeare.
# About 6 minutes on 2 cores; stored as float16 (14.5 MB).  Usage: tools/train_demo.sh TEXT
set -euo pipefail
text=${1:?usage: tools/train_demo.sh tinyshakespeare.txt}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
python -m gpt2s.train "$text" --init mini --steps 700 --batch-size 8 --seq-len 128 --lr 2e-3 \
    --warmup 50 --eval-every 100 --seed 0 --out "$out/run" --log "$out/log.csv"
python - "$out/run" <<'PY'
import sys, gpt2s
gpt2s.GPT2.from_safetensors(sys.argv[1]).save_safetensors("src/gpt2s/assets/demo", dtype="float16")
PY
tail -n 3 "$out/log.csv"
