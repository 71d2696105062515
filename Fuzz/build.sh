#!/usr/bin/env bash
# Builds the libFuzzer targets (Swift's -sanitize=fuzzer, with AddressSanitizer) into .build/fuzz/:
#   protocol-fuzzer   the request parser and dispatcher (Server.handle) of `pf2lora serve`
#   adapter-fuzzer    adapter file validation (zstd frame, safetensors header, metadata, shapes)
# Each is the library's sources plus one harness compiled as one module (the harness reaches
# internal API). Usage: Fuzz/build.sh [protocol|adapter]...   (default: both)
# Run from the repository root, e.g.:
#   .build/fuzz/adapter-fuzzer -max_total_time=300 -max_len=65536 .build/fuzz/corpus-adapter Fuzz/seeds/adapter
#   .build/fuzz/protocol-fuzzer -max_total_time=300 -max_len=4096 -dict=Fuzz/json.dict .build/fuzz/corpus-protocol Fuzz/seeds/protocol
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .build/fuzz
targets=("$@"); [ ${#targets[@]} -eq 0 ] && targets=(protocol adapter)
SOURCES=$(find Sources/PF2LoRA -name '*.swift' | sort)
# The library's C targets (CQuant: the q8_0 kernels; CMemory: the allocator hooks): compiled with
# clang, imported through module maps written here (SwiftPM makes its own for `swift build`; nothing
# is added to Sources/). A C target added to Package.swift must be added to CTARGETS.
CTARGETS=(CQuant CMemory)
COBJS=(); CINCS=()
for c in "${CTARGETS[@]}"; do
  mkdir -p ".build/fuzz/$c"
  cat > ".build/fuzz/$c/module.modulemap" <<MAP
module $c {
    header "$PWD/Sources/$c/include/$c.h"
    export *
}
MAP
  clang -O2 -g -fsanitize=address,fuzzer-no-link -I "Sources/$c/include" -c "Sources/$c/$c.c" -o ".build/fuzz/$c/$c.o"
  COBJS+=(".build/fuzz/$c/$c.o"); CINCS+=(-I ".build/fuzz/$c")
done
for t in "${targets[@]}"; do
  case "$t" in
    protocol) harness=Fuzz/ProtocolFuzzer.swift ;;
    adapter)  harness=Fuzz/AdapterFuzzer.swift ;;
    *) echo "unknown target $t (protocol|adapter)" >&2; exit 2 ;;
  esac
  echo "building .build/fuzz/$t-fuzzer" >&2
  # shellcheck disable=SC2086
  # -target-cpu haswell as Package.swift's default (the SIMD kernels); Swift 6 mode as the library.
  swiftc -sanitize=fuzzer,address -parse-as-library -O -swift-version 6 -target-cpu haswell -module-name PF2LoRAFuzz \
    -I Sources/COpenBLAS -I Sources/CZstd "${CINCS[@]}" $(pkg-config --cflags-only-I openblas libzstd | sed 's/-I/-Xcc -I/g') \
    $SOURCES "$harness" "${COBJS[@]}" $(pkg-config --libs openblas libzstd) -o ".build/fuzz/$t-fuzzer" 2> >(grep -v "Cannot export local symbol" >&2)
done
