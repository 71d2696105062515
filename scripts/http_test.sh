#!/usr/bin/env bash
# The OpenAI-compatible HTTP endpoint driven by the official `openai` package (docs/HTTP.md):
# installs the pinned openai if missing, builds the release binary if missing, runs scripts/http_test.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OPENAI_VERSION=3.57.0
python3 -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null || {
  echo "http-test: installing openai==$OPENAI_VERSION" >&2
  python3 -m pip install -q "openai==$OPENAI_VERSION" >&2
}
[ -x .build/release/pf2lora ] || swift build -c release --product pf2lora
python3 scripts/http_test.py
