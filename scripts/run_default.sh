#!/usr/bin/env bash
# The README's first command runs this after the release build: serve the embedded default model and
# its adapter store (models/debian-llama + adapters/debian-llama), ask three clients and the shared pair
# alone for the same package description, personalize a new client from examples/newcomer-client.jsonl,
# ask it again (scripts/demo_client.py). Needs only the shipped files (no corpus, no network).
# Without the shipped weights (a partial checkout) it makes a small random model with the default tokenizer.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.build/release/pf2lora
MODEL=models/debian-llama
STORE=adapters
if [ ! -f "$MODEL/model.safetensors" ]; then
  MODEL=.build/demo-model
  STORE=.build/demo-adapters
  if [ ! -f "$MODEL/model.safetensors" ]; then
    echo "run: no trained default model yet; making a small random one in $MODEL" >&2
    "$BIN" model random --config tiny-llama --vocab-size 8192 --tokenizer models/debian-llama --out "$MODEL" --seed 1
  fi
fi
# The demo personalizes a new client: it works on a copy so the shipped store stays as committed.
RUNSTORE=.build/run-store
rm -rf "$RUNSTORE" && mkdir -p "$RUNSTORE"
[ -d "$STORE" ] && cp -r "$STORE"/. "$RUNSTORE"/
exec python3 scripts/demo_client.py --binary "$BIN" --model "$MODEL" --store "$RUNSTORE" "$@"
