#!/usr/bin/env bash
# Reproduces the first-generation embedded default (the fortune GPT-2, shipped until issue 16) end to end: corpus -> tokenizer -> base model -> federation with
# PF2LoRA and every baseline -> models/fortune-gpt2, adapters/fortune-gpt2, docs/RESULTS-fortunes.md.
# Expected run time on the 2-core machine kind: ~35 min pretraining + ~25 min federation + a few
# minutes of evaluation (numbers in docs/RESULTS-fortunes.md). Every step is deterministic for its seed.
#
#   scripts/reproduce_fortunes.sh              everything (`make reproduce-fortunes`)
#   SKIP_PRETRAIN=1 scripts/reproduce_fortunes.sh   keep models/fortune-gpt2, redo the federation and tables
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.build/release/pf2lora
STEPS=${PRETRAIN_STEPS:-1500}
FED="--rounds ${ROUNDS:-8} --local-steps ${LOCAL_STEPS:-4} --lower-steps ${LOWER_STEPS:-2} --batch 8 --seq 64 --rank 8 --rank2 2 --seed 0"
T0=$(date +%s)
say() { echo "reproduce [$(( $(date +%s) - T0 ))s]: $*" >&2; }

make build >&2
say "corpus"
python3 scripts/make_corpus.py --out data/corpus >&2
say "tokenizer (must equal the committed one)"
python3 scripts/train_tokenizer.py --corpus data/corpus --out runs/tokenizer >&2
cmp -s runs/tokenizer/tokenizer.json models/fortune-gpt2/tokenizer.json || { echo "reproduce: the tokenizer differs from models/fortune-gpt2/tokenizer.json" >&2; exit 1; }

if [ -z "${SKIP_PRETRAIN:-}" ]; then
  say "pretraining the base ($STEPS steps)"
  rm -rf runs/pretrain/fortune-gpt2
  "$BIN" pretrain --data data/corpus/pretrain --tokenizer models/fortune-gpt2 --out runs/pretrain/fortune-gpt2 \
    --steps "$STEPS" --warmup 100 --eval-every 250 --save-every 250 --log-every 50 --seed 0 > runs/pretrain.json
  cp runs/pretrain/fortune-gpt2/config.json runs/pretrain/fortune-gpt2/model.safetensors models/fortune-gpt2/
fi

say "federation: PF2LoRA and every baseline, two at a time (one BLAS thread each)"
FED="$FED" bash scripts/federate_all_methods.sh models/fortune-gpt2 runs

say "shipping PF2LoRA's store as adapters/"
rm -rf adapters/fortune-gpt2
cp -r runs/stores/pf2lora/fortune-gpt2 adapters/fortune-gpt2
rm -f adapters/fortune-gpt2/.lock

say "results"
python3 scripts/results_table.py --runs runs/federate --out docs/RESULTS-fortunes.md --svg docs/results.svg \
  --model models/fortune-gpt2 --store adapters --preamble "$(cat docs/results-preamble.md 2>/dev/null || true)" \
  --appendix docs/results-analysis.md
say "finished"
