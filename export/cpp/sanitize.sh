#!/usr/bin/env bash
# Build fastddpm_sample with AddressSanitizer + UndefinedBehaviorSanitizer (-DFASTDDPM_SANITIZE=ON).
#
#   sanitize.sh [BUILD_DIR]    build into BUILD_DIR (default <repo>/build/cpp-sanitize) and print
#                              the environment to run it with
#   sanitize.sh --probe        only check that the compiler can link a sanitized program; if not,
#                              say which packages to install (exit 1)
#
# ONNXRUNTIME_ROOT as for CMake (default <repo>/build/onnxruntime, see get_onnxruntime.sh). The
# prebuilt libonnxruntime is not instrumented and needs no LD_PRELOAD: the executable links the
# ASan runtime itself. Leak detection stays off (ORT's own allocations are not ours to judge).
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
cxx="${CXX:-c++}"
flags=(-fsanitize=address,undefined,float-cast-overflow -fno-omit-frame-pointer)

probe() {
  local work
  work="$(mktemp -d)"
  echo 'int main() { return 0; }' > "$work/probe.cpp"
  if ! "$cxx" "${flags[@]}" "$work/probe.cpp" -o "$work/probe" 2> "$work/log" || ! "$work/probe"; then
    echo "sanitize.sh: $cxx cannot build -fsanitize=address,undefined programs ($(tail -n 1 "$work/log"));" \
         "install the sanitizer runtimes of your g++ (Debian bookworm, g++-12: apt-get install libasan8 libubsan1)" >&2
    rm -rf "$work"
    return 1
  fi
  rm -rf "$work"
}

if [ "${1:-}" = "--probe" ]; then
  probe
  exit
fi
probe
build="${1:-$repo/build/cpp-sanitize}"
cmake -S "$repo/export/cpp" -B "$build" -DONNXRUNTIME_ROOT="${ONNXRUNTIME_ROOT:-$repo/build/onnxruntime}" \
      -DFASTDDPM_SANITIZE=ON > /dev/null
cmake --build "$build" -j "$(nproc 2>/dev/null || echo 2)"
echo "run it with: ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1" \
     "$build/fastddpm_sample ..."
