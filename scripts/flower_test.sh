#!/usr/bin/env bash
# The Flower path end to end (docs/FLOWER.md): installs flwr if missing, builds the fortune corpus if
# missing, then runs a real Flower federation of two pf2lora nodes on loopback for two rounds and
# checks it against `pf2lora federate` with the same settings (run_local.py exits non-zero if they differ).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import flwr, numpy, safetensors" 2>/dev/null || {
  echo "flower-test: installing flwr==1.42.0 numpy safetensors" >&2
  python3 -m pip install -q "flwr==1.42.0" "numpy>=2" "safetensors>=0.4" >&2
}
[ -x .build/release/pf2lora ] || swift build -c release --product pf2lora
[ -d data/corpus/clients/law ] || python3 scripts/make_corpus.py --out data/corpus >&2
python3 integrations/flower/run_local.py --clients debian,law --rounds 2 --local-steps 2 --lower-steps 1 \
  --work runs/flower-test --out runs/flower-test/results.md
