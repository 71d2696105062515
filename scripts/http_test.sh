#!/usr/bin/env bash
# The OpenAI-compatible HTTP endpoint driven by the official `openai` package (docs/HTTP.md):
# installs the pinned openai if missing (skips, saying so, when python3 or the package cannot be had),
# builds the release binary if missing, runs scripts/http_test.py (about a minute on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
OPENAI_VERSION=3.57.0
command -v python3 >/dev/null || { echo "http_test: SKIPPED: python3 is not installed (the test drives the server with the openai package)"; exit 0; }
python3 -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null || {
  echo "http-test: installing openai==$OPENAI_VERSION" >&2
  python3 -m pip install -q "openai==$OPENAI_VERSION" >&2 || true
  python3 -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null || {
    echo "http_test: SKIPPED: the openai package $OPENAI_VERSION is not installed and could not be (python3 -m pip install openai==$OPENAI_VERSION)"
    exit 0
  }
}
[ -x .build/release/pf2lora ] || swift build -c release --product pf2lora
python3 scripts/http_test.py
