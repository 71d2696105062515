#!/usr/bin/env bash
# Runs the test suite under ThreadSanitizer and under AddressSanitizer, separately (issue 7, item 6).
# Each sanitizer builds into its own scratch folder (.build/sanitize-<kind>), so the normal debug
# build is untouched; the `pf2lora` binary the end-to-end tests start is built with the same
# sanitizer, and a report in it makes it exit non-zero, which fails the test that started it.
#
#   scripts/sanitize.sh                      both, whole suite
#   scripts/sanitize.sh thread               one of them
#   scripts/sanitize.sh address -- --filter 'Fuzz|Reliability|Server|Adapter'
set -euo pipefail
cd "$(dirname "$0")/.."
kinds=(); args=()
while [ $# -gt 0 ]; do
  case "$1" in
    thread|address) kinds+=("$1"); shift ;;
    --) shift; args=("$@"); break ;;
    *) echo "usage: $0 [thread|address]... [-- swift test args]" >&2; exit 2 ;;
  esac
done
[ ${#kinds[@]} -eq 0 ] && kinds=(thread address)
export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1 exitcode=66 second_deadlock_stack=1}"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0 halt_on_error=1 exitcode=67}"
status=0
for k in "${kinds[@]}"; do
  scratch=".build/sanitize-$k"
  echo "== $k sanitizer: building into $scratch" >&2
  swift build --sanitize="$k" --scratch-path "$scratch" --build-tests
  echo "== $k sanitizer: testing ${args[*]:-}" >&2
  if swift test --sanitize="$k" --scratch-path "$scratch" --skip-build "${args[@]}"; then
    echo "== $k sanitizer: clean" >&2
  else
    echo "== $k sanitizer: FAILED" >&2; status=1
  fi
done
exit $status
