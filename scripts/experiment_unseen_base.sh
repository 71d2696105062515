#!/usr/bin/env bash
# Experiment B of docs/RESULTS-fortunes.md: the same federation as the embedded default, on a base that has
# never seen the clients' text. The embedded default's base was pretrained on every category's train
# split, the clients' included, which leaves the shared level little to learn (docs/RESULTS-fortunes.md,
# "Why"). Here the base is pretrained on the fortune categories that are *not* clients only (the
# pretrain mix minus every text that is in any client's train, valid or test split), with the same
# recipe, and PF2LoRA and every baseline are federated on it with the same settings as
# scripts/reproduce.sh. Writes runs/unseen/ and docs/RESULTS-unseen-base.md (+ .svg); leaves
# models/ and adapters/ alone. About 17 min on the 2-core machine kind.
#
#   scripts/experiment_unseen_base.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.build/release/pf2lora
OUT=runs/unseen
STEPS=${PRETRAIN_STEPS:-1500}
FED="--rounds ${ROUNDS:-8} --local-steps ${LOCAL_STEPS:-4} --lower-steps ${LOWER_STEPS:-2} --batch 8 --seq 64 --rank 8 --rank2 2 --seed 0"
T0=$(date +%s)
say() { echo "unseen-base [$(( $(date +%s) - T0 ))s]: $*" >&2; }

[ -x "$BIN" ] || swift build -c release --product pf2lora >&2
[ -d data/corpus/clients ] || python3 scripts/make_corpus.py --out data/corpus >&2
mkdir -p "$OUT"

say "pretrain data without any client text"
python3 - "$OUT/pretrain-data" <<'EOF'
import json, os, pathlib, sys
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
corpus = pathlib.Path("data/corpus")
client_texts = set()
for c in (corpus / "clients").iterdir():
    for split in ("train", "valid", "test"):
        for line in open(c / f"{split}.jsonl", encoding="utf-8"):
            client_texts.add(json.loads(line)["text"])
kept = dropped = 0
for split in ("train", "valid", "test"):
    with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
        for line in open(corpus / "pretrain" / f"{split}.jsonl", encoding="utf-8"):
            if json.loads(line)["text"] in client_texts:
                dropped += 1
                continue
            f.write(line); kept += 1
print(f"pretrain texts kept {kept}, dropped (client texts) {dropped}", file=sys.stderr)
EOF

if [ ! -f "$OUT/base/model.safetensors" ]; then
  say "pretraining the base on non-client text ($STEPS steps)"
  "$BIN" pretrain --data "$OUT/pretrain-data" --tokenizer models/fortune-gpt2 --out "$OUT/base" \
    --steps "$STEPS" --warmup 100 --eval-every 250 --save-every 250 --log-every 50 --seed 0 > "$OUT/pretrain.json"
fi

say "federation: PF2LoRA and every baseline, two at a time (one BLAS thread each)"
FED="$FED" bash scripts/federate_all_methods.sh "$OUT/base" "$OUT"

say "results"
python3 scripts/results_table.py --runs "$OUT/federate" --out docs/RESULTS-unseen-base.md --svg docs/results-unseen-base.svg \
  --model "$OUT/base" --store "$OUT/stores/pf2lora" --title "Results, experiment B: the fortune federation on a base that has never seen the clients" \
  --preamble "$(cat docs/results-unseen-preamble.md 2>/dev/null || true)" \
  $( [ -f docs/results-unseen-analysis.md ] && echo --appendix docs/results-unseen-analysis.md )
say "finished"
