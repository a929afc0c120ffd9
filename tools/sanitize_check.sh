#!/usr/bin/env bash
# Builds pyllm's C++ module with AddressSanitizer and UndefinedBehaviorSanitizer
# (PYLLM_SANITIZE=address,undefined, CPU only) in its own build directory, and runs the format,
# kernel, engine and fuzz-corpus tests against it. Any sanitizer report aborts the run.
#
#   tools/sanitize_check.sh [pytest arguments]     (default: the four test files, -x -q)
#
# Needs cmake, ninja or make, pybind11 (pip install pybind11) and gcc or clang with the sanitizer
# runtimes. The installed pyllm stays as it is: the sanitized pyllm._core is put in front of it by
# a sitecustomize in the build directory, for this run only.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
build="${SANITIZE_BUILD:-build/sanitize}"
sanitizers="${PYLLM_SANITIZE:-address,undefined}"
cxx="${CXX:-g++}"

generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$cxx" \
  -DPYLLM_CUDA=OFF -DPYLLM_SANITIZE="$sanitizers" -DPython_EXECUTABLE="$(command -v "$python")" \
  -Dpybind11_DIR="$("$python" -m pybind11 --cmakedir)" >/dev/null
nice cmake --build "$build" --target _core -j "${JOBS:-2}"
module="$(ls "$build"/_core*.so)"

overlay="$build/overlay"
mkdir -p "$overlay"
cat >"$overlay/sitecustomize.py" <<PY
# Written by tools/sanitize_check.sh: pyllm._core is the sanitized build.
import importlib.abc, importlib.machinery, importlib.util, sys

class _Sanitized(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pyllm._core":
            loader = importlib.machinery.ExtensionFileLoader(name, "$(realpath "$module")")
            return importlib.util.spec_from_loader(name, loader)
        return None

sys.meta_path.insert(0, _Sanitized())
PY

runtimes=()
if [[ ",$sanitizers," == *",address,"* ]]; then runtimes+=("$("$cxx" -print-file-name=libasan.so)"); fi
if [[ ",$sanitizers," == *",undefined,"* ]]; then runtimes+=("$("$cxx" -print-file-name=libubsan.so)"); fi
export LD_PRELOAD="${runtimes[*]}"  # Python itself is not instrumented: the runtimes load first
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:${UBSAN_OPTIONS:-}"
export PYTHONPATH="$overlay${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "import pyllm._core as c; assert '$build' in c.__file__, c.__file__; print('sanitized module:', c.__file__)"
if [ $# -eq 0 ]; then
  set -- -x -q tests/test_format.py tests/test_kernels.py tests/test_engine.py tests/test_fuzz.py
fi
"$python" -m pytest -p no:cacheprovider "$@"
