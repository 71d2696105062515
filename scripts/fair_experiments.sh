#!/usr/bin/env bash
# Every experiment of the fair protocol (issue 13, DESIGN §9), each resumable, each writing its page:
#   docs/SYNTHETIC-fair.md          synthetic federation: compute budget, equal grids, 5 seeds, ablations   (~10 min alone)
#   docs/SYNTHETIC-rank-sweep.md    learned rank under noise / few examples / misspecified truth, controls (~5 min alone)
#   docs/RESULTS-data-to-text-compute8.md  (debian) Debian package descriptions, 13 sections, six methods, 8 rounds, a fresh equal grid
#                                   5e-3,1e-2,2e-2 + a knob point, selection on seed 0's valid split, 3 seeds, BLEU/ROUGE-L/METEOR
#                                   (42 runs + 18 decodes; 2026-12-03: 55-140 s per run at nice 19, ~70 min in all at load 4-8).
#                                   It wrote docs/RESULTS-data-to-text.md before; that page is the 2026-12-02 one-seed record now.
#   docs/RESULTS-fortune-fair.md    the fortune federation under the same protocol                          (~2 h alone)
# Run times: measured on the 2-core machine (docs/RESULTS.md says which parts ran in which session).
# A killed run restarts where it stopped (finished runs are kept, per method, seed and grid point);
# a rerun with other settings refuses instead of mixing runs (delete runs/experiments/<name> first).
#
#   docs/RESULTS-data-to-text-fair.md  (debian6) the cut protocol that fits a shared 2-core session: the selection of
#                                   the 6-round grid already run (scripts/debian_prior_selection.json; FedAvg+FT's grid rerun
#                                   because its fine-tuning moved inside the budget), 3 seeds, BLEU/ROUGE-L/METEOR (~2,500 CPU-s)
#
#   docs/RESULTS-data-to-text-long.md  (debian-long) the debian6 settings at 16 rounds (2.7 x the tokens), every method at the
#                                   point it selected at 6 rounds (scripts/debian_long_selection.json), plus the joint ablation,
#                                   3 seeds, valid curves every 4 rounds (~2,700 CPU-s; no NLG decoding, no rank controls)
#
#   docs/RESULTS-data-to-text-default-base-grid.md  (debian-llama-grid) the shipped base models/debian-llama (10,000 steps),
#                                   the debian6 budget, an equal grid 5e-3..4e-2 for every method, 3 seeds, BLEU/ROUGE-L/METEOR
#                                   (42 runs, ~2 min per grid point and ~3.5 min per decoded seed run alone; the page's runs were made
#                                   with /work/data/runs/debian-llama-f16, byte-identical to models/debian-llama)
#   (debian-llama-long)             the same base at 16 rounds, every method at that grid's 6-round selection
#                                   (scripts/debian_llama_grid_selection.json), 3 seeds, no decoding (~4 min per run)
#
#   scripts/fair_experiments.sh [synthetic|debian|debian6|debian-long|debian-llama-grid|debian-llama-long|fortune|all]
#   (default all; debian6, debian-long and the debian-llama ones are not in all)
#   PF2LORA_BIN=path (default runs/bin/pf2lora), FAIR_ROOT=dir (debian6's runs; default runs/experiments/debian-fair6),
#   FAIR_JOBS=n (runs at a time for debian6; default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
BIN=${PF2LORA_BIN:-runs/bin/pf2lora}
if [ ! -x "$BIN" ]; then
  swift build -c release --product pf2lora >&2
  mkdir -p runs/bin && cp .build/release/pf2lora "$BIN.new" && mv "$BIN.new" "$BIN"   # a copy: rebuilds do not disturb a run
fi
T0=$(date +%s)
say() { echo "fair_experiments [$(( $(date +%s) - T0 ))s]: $*" >&2; }
# The Debian data-to-text corpus is built once (scripts/make_debian_corpus.py); the targets that only reuse it stop here.
need_debian_corpus() {
  [ -d data/debian/clients ] || { echo "fair_experiments: data/debian/clients missing: ln -s /work/data/debian data/debian, or python3 scripts/make_debian_corpus.py --out data/debian" >&2; exit 1; }
}

if [ "$WHAT" = all ] || [ "$WHAT" = synthetic ]; then
  say "synthetic federation, fair protocol"
  python3 scripts/synthetic_fair.py --binary "$BIN" --out docs/SYNTHETIC-fair.md > /dev/null
  say "synthetic rank sweep"
  python3 scripts/synthetic_rank_sweep.py --binary "$BIN" --out docs/SYNTHETIC-rank-sweep.md > /dev/null
fi

if [ "$WHAT" = all ] || [ "$WHAT" = debian ]; then
  [ -d data/debian/clients ] || python3 scripts/make_debian_corpus.py --out data/debian   # or: ln -s /work/data/debian data/debian
  say "data-to-text federation"
  python3 scripts/experiment.py --name debian-compute8 --root "${FAIR_ROOT:-runs/experiments/debian-compute8}" \
    --model models/fortune-gpt2 --data data/debian/clients --binary "$BIN" \
    --budget compute --rounds 8 --local-steps 2 --lower-steps 2 --batch 4 --seq 64 --eval-every 2 --eval-windows 32 \
    --lrs 5e-3,1e-2,2e-2 --seeds 0,1,2 --select-seed 0 --jobs "${FAIR_JOBS:-1}" --nlg --nlg-limit 20 --nlg-tokens 80 --rank-controls \
    --title "Data-to-text on Debian's package index: fair comparison (compute budget)" \
    --preamble docs/results-data-to-text-compute8-preamble.md --appendix docs/results-data-to-text-compute8-analysis.md \
    --out "${FAIR_OUT:-docs/RESULTS-data-to-text-compute8.md}" --svg docs/results-data-to-text-compute8-curves.svg
fi

if [ "$WHAT" = debian6 ]; then
  need_debian_corpus
  say "data-to-text federation, cut protocol (prior 6-round selection, 3 seeds)"
  python3 scripts/experiment.py --name debian-fair6 --root "${FAIR_ROOT:-runs/experiments/debian-fair6}" \
    --model models/fortune-gpt2 --data data/debian/clients --binary "$BIN" \
    --budget compute --rounds 6 --local-steps 2 --lower-steps 2 --batch 4 --seq 64 --eval-every 2 --eval-windows 64 \
    --lrs 2e-3,5e-3,1e-2 --no-knob --prior-selection scripts/debian_prior_selection.json --select-seed 100 \
    --seeds 0,1,2 --jobs "${FAIR_JOBS:-1}" --nlg --nlg-limit 20 --nlg-tokens 80 --rank-controls \
    --title "Data-to-text on Debian's package index: 3 seeds, compute budget, FedAvg+FT's fine-tuning inside it" \
    --preamble docs/results-data-to-text-fair-preamble.md --appendix docs/results-data-to-text-fair-analysis.md \
    --out docs/RESULTS-data-to-text-fair.md --svg docs/results-data-to-text-fair-curves.svg
fi

if [ "$WHAT" = debian-long ]; then
  need_debian_corpus
  say "data-to-text federation, 16 rounds at the 6-round selection (3 seeds, + the joint ablation)"
  python3 scripts/experiment.py --name debian-long16 --root "${FAIR_ROOT:-runs/experiments/debian-long16}" \
    --model models/fortune-gpt2 --data data/debian/clients --binary "$BIN" \
    --budget compute --rounds 16 --local-steps 2 --lower-steps 2 --batch 4 --seq 64 --eval-every 4 --eval-windows 64 \
    --lrs 2e-3,5e-3,1e-2 --no-knob --prior-selection scripts/debian_long_selection.json --select-seed 100 \
    --methods pf2lora,homlora,perfedavg,hetlora,local,fedavg-ft,pf2lora-joint \
    --seeds 0,1,2 --jobs "${FAIR_JOBS:-1}" \
    --title "Data to text at 16 rounds: does PF2LoRA catch up when the curves flatten?" \
    --preamble docs/results-data-to-text-long-preamble.md --appendix docs/results-data-to-text-long-analysis.md \
    --out docs/RESULTS-data-to-text-long.md --svg docs/results-data-to-text-long-curves.svg
fi

if [ "$WHAT" = debian-llama-grid ] || [ "$WHAT" = debian-llama-long ]; then
  need_debian_corpus
  [ -f models/debian-llama/model.safetensors ] || { echo "fair_experiments: models/debian-llama missing (scripts/reproduce.sh builds it)" >&2; exit 1; }
fi

if [ "$WHAT" = debian-llama-grid ]; then
  say "data to text on the shipped default base: equal grid 5e-3..4e-2, 3 seeds"
  python3 scripts/experiment.py --name debian-llama-grid --root "${FAIR_ROOT:-runs/experiments/debian-llama-grid}" \
    --model models/debian-llama --data data/debian/clients --binary "$BIN" \
    --budget compute --rounds 6 --local-steps 2 --lower-steps 2 --batch 4 --seq 64 --eval-every 2 --eval-windows 64 \
    --lrs 5e-3,1e-2,2e-2,4e-2 --no-knob --select-seed 100 --seeds 0,1,2 --jobs "${FAIR_JOBS:-1}" --nlg --nlg-limit 20 --nlg-tokens 80 \
    --title "Data-to-text on the 10,000-step default base: equal learning-rate grid, three seeds" \
    --out "${FAIR_OUT:-runs/experiments/RESULTS-debian-llama-grid.md}"
fi

if [ "$WHAT" = debian-llama-long ]; then
  say "data to text on the shipped default base at 16 rounds, the grid's 6-round selection, 3 seeds"
  python3 scripts/experiment.py --name debian-llama-long16 --root "${FAIR_ROOT:-runs/experiments/debian-llama-long16}" \
    --model models/debian-llama --data data/debian/clients --binary "$BIN" \
    --budget compute --rounds 16 --local-steps 2 --lower-steps 2 --batch 4 --seq 64 --eval-every 4 --eval-windows 64 \
    --lrs 5e-3,1e-2,2e-2,4e-2 --no-knob --prior-selection scripts/debian_llama_grid_selection.json --select-seed 100 \
    --seeds 0,1,2 --jobs "${FAIR_JOBS:-1}" --stage seeds \
    --title "Data to text on the 10,000-step default base at 16 rounds" \
    --out "${FAIR_OUT:-runs/experiments/RESULTS-debian-llama-long16.md}"
fi

if [ "$WHAT" = all ] || [ "$WHAT" = fortune ]; then
  [ -d data/corpus/clients ] || python3 scripts/make_corpus.py --out data/corpus
  say "fortune federation, fair protocol"
  python3 scripts/experiment.py --name fortune-compute --model models/fortune-gpt2 --data data/corpus/clients --binary "$BIN" \
    --budget compute --rounds 10 --local-steps 2 --lower-steps 2 --batch 8 --seq 64 --eval-every 2 --eval-windows 48 \
    --seeds 0,1,2 --jobs 2 --rank-controls \
    --title "The fortune federation: fair comparison (shipped base, compute budget)" \
    --out docs/RESULTS-fortune-fair.md --svg docs/results-fortune-fair-curves.svg
fi
say "finished"
