#!/usr/bin/env bash
# PF2LoRA and every baseline federated on one base with the same settings, two methods at a time
# (one BLAS thread each): what scripts/reproduce.sh and scripts/experiment_unseen_base.sh share.
#
#   FED="--rounds 8 ..." scripts/federate_all_methods.sh MODEL ROOT
#
# Writes ROOT/stores/<method> (the adapter store), ROOT/federate/<method> (metrics.json, loss.svg,
# results.md) and ROOT/federate-<method>.{out,log}; removes the old stores and metrics first.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1 ROOT=$2
BIN=.build/release/pf2lora
rm -rf "$ROOT/stores" "$ROOT/federate"
mkdir -p "$ROOT/federate"
run_method() {
  # PF2LoRA's lower level: SGD 0.5 with 5 steps, selected on the validation split (docs/RESULTS-fortunes.md).
  local extra=""
  [ "$1" = pf2lora ] && extra="--lr2 0.5 --lower-steps 5"
  "$BIN" federate --model "$MODEL" --data data/corpus/clients --store "$ROOT/stores/$1" --method "$1" \
    $FED $extra --threads 1 --out "$ROOT/federate/$1" > "$ROOT/federate-$1.out" 2> "$ROOT/federate-$1.log"
}
for pair in "pf2lora homlora" "perfedavg hetlora" "local fedavg-ft"; do
  set -- $pair
  run_method "$1" & p1=$!
  run_method "$2" & p2=$!
  wait $p1; wait $p2
  echo "federate_all_methods: done: $pair" >&2
done
