#!/usr/bin/env bash
# Compatibility lane: scc on the GPU machine's software (torch 2.11, triton 3.6, no package index), checked on a
# CPU machine.
#
#   benchmarks/compat_lane.sh                   # log: benchmarks/results/compat-lane.log
#   COMPAT_VENV=/tmp/cv COMPAT_LOG=/tmp/lane.log benchmarks/compat_lane.sh
#
# It builds a virtual environment (default .venv-compat/, git-ignored) with exactly the GPU machine's packages:
# CPython 3.12, torch 2.11.0, torchvision 0.26.0, triton 3.6.0, onnx 1.23.1, onnxscript 0.7.2, onnxruntime 1.30.0
# (CPU build), pytest with xdist and timeout, and whatever those pull in. scc and the wheels the GPU machine lacks
# (benchmarks/gpu_wheels.sh fills .whl/) go into a target folder on PYTHONPATH, installed the way the GPU command
# installs them (--no-index --no-deps --no-build-isolation --target). Test-only packages (scikit-learn for the
# digits fixture) go into a second folder that only the pytest stages see. Then:
#   1. the Triton kernel tests under the interpreter (TRITON_INTERPRET=1);
#   2. the backend parity tests (eager vs compiled vs ONNX on identical draws) and the check's own smoke test;
#   3. benchmarks/gpu_check.py --device cpu --vit tiny under a deadline, with only the GPU machine's packages and
#      the wheels (the check's JSON in a temporary folder).
# Exit status 0 only when every stage passes; 2 when the lane cannot be set up here (no Python 3.12, the registry
# unreachable), 1 for anything else that fails. The torch download is the CUDA build (several GB) from PyPI; a
# rebuilt environment is reused while its versions match. COMPAT_PYTHON names the Python 3.12 interpreter.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${COMPAT_VENV:-$ROOT/.venv-compat}"
LOG="${COMPAT_LOG:-$ROOT/benchmarks/results/compat-lane.log}"
DEADLINE_S="${COMPAT_DEADLINE_S:-420}"
PINS=(torch==2.11.0 torchvision==0.26.0 triton==3.6.0 onnx==1.23.1 onnxscript==0.7.2 onnxruntime==1.30.0)
TOOLS=(pytest pytest-xdist pytest-timeout)
TEST_ONLY=(scikit-learn)
KERNEL_TESTS=(tests/test_sign_step.py tests/test_view_augment.py
              "tests/test_compiled.py::test_triton_backend_runs_kernels_in_graph")
PARITY_TESTS=(tests/test_backends.py tests/test_compiled.py tests/test_gpu_check.py)

find_python() {  # a python3.12 that runs (a pyenv shim for a version that is not selected does not)
  if [ -n "${COMPAT_PYTHON:-}" ]; then echo "$COMPAT_PYTHON"; return; fi
  for p in "$(command -v python3.12 2>/dev/null)" "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    [ -x "$p" ] && "$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo "$p"; return; }
  done
  echo "no Python 3.12 found (the GPU machine runs CPython 3.12): set COMPAT_PYTHON=/path/to/python3.12" >&2
  return 1
}

pip_() {  # pip in the lane's venv, without this machine's notes about local index folders; pip's exit status
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location"
  return "${PIPESTATUS[0]}"
}

mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1
cd "$ROOT"
echo "compat lane: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -sm), $(nproc) CPUs"
START=$SECONDS
PY="$(find_python)" || exit 2
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -m pip show -q "${PINS[@]%%==*}" >/dev/null 2>&1 \
   || [ "$("$VENV/bin/python" -c 'import torch, triton; print(torch.__version__.split("+")[0], triton.__version__)' 2>/dev/null)" != "2.11.0 3.6.0" ]; then
  echo "== building $VENV with $PY"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" || exit 2
  pip_ install -q "${PINS[@]}" "${TOOLS[@]}" || exit 2
fi
"$VENV/bin/python" - "${PINS[@]}" <<'EOF' || exit 2
import importlib.metadata as md, platform, sys
print(f"python {platform.python_version()}")
bad = []
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    have = md.version(name)
    print(f"{name} {have}")
    if have.split("+")[0] != want:
        bad.append(f"{name} {have} (want {want})")
for name in ("numpy", "pillow", "setuptools", "pytest", "pytest-xdist", "pytest-timeout"):
    print(f"{name} {md.version(name)}")
if bad:
    sys.exit(f"the lane needs the GPU machine's versions: {', '.join(bad)}; delete the venv and run again")
EOF

echo "== wheels the GPU machine lacks (benchmarks/gpu_wheels.sh)"
# a failure here (a wheel missing, the tree and wheels over 64 MiB, scc not installable) is the lane's own: exit 1
PYTHON="$VENV/bin/python" benchmarks/gpu_wheels.sh > "$VENV/gpu-wheels.txt" 2>&1 || { cat "$VENV/gpu-wheels.txt"; exit 1; }
grep -v "^WARNING: Location" "$VENV/gpu-wheels.txt" | sed -n '1,/^work tree/p' | sed "s|$ROOT/||g"
TARGET="$VENV/scc-target"
EXTRAS="$VENV/test-extras"
rm -rf "$TARGET"
pip_ install -q --no-index --no-deps --no-build-isolation --target "$TARGET" .whl/*.whl . || exit 1
if [ ! -f "$EXTRAS/.complete" ]; then  # what the test-only packages need beyond the venv, nothing it already has
  rm -rf "$EXTRAS"
  pip_ install -q --dry-run --report "$VENV/test-extras.json" "${TEST_ONLY[@]}" || exit 2
  mapfile -t NEEDED < <("$VENV/bin/python" - "$VENV/test-extras.json" <<'EOF'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(f"{item['metadata']['name']}=={item['metadata']['version']}")
EOF
)
  pip_ install -q --no-deps --target "$EXTRAS" "${NEEDED[@]}" || exit 2
  touch "$EXTRAS/.complete"
fi
echo "test-only packages (pytest stages only): $(ls "$EXTRAS" | grep dist-info | sed 's/.dist-info//' | tr '\n' ' ')"

declare -A RESULT
stage() {  # stage NAME CMD...: run, record pass/fail with the pytest summary line
  local name="$1"; shift
  echo; echo "== $name: ${*//$ROOT\//}"
  local t0=$SECONDS
  "$@" 2>&1 | tee /tmp/compat-lane-stage.$$ | grep -v "^WARNING: Location"
  local rc=${PIPESTATUS[0]}
  local line; line="$(grep -E "(passed|failed|error)" /tmp/compat-lane-stage.$$ | grep -E " in [0-9.]+s" | tail -1)"
  RESULT[$name]="$([ "$rc" = 0 ] && echo PASS || echo "FAIL (exit $rc)") ${line:+- $line} ($((SECONDS - t0)) s)"
  rm -f /tmp/compat-lane-stage.$$
}
export OMP_NUM_THREADS=1
PYTEST=("$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider)
stage kernel-tests-interpreted env TRITON_INTERPRET=1 PYTHONPATH="$TARGET:$EXTRAS" "${PYTEST[@]}" "${KERNEL_TESTS[@]}"
stage backend-parity env PYTHONPATH="$TARGET:$EXTRAS" "${PYTEST[@]}" "${PARITY_TESTS[@]}"
CHECK_OUT="$(mktemp -d)"
stage gpu-check-cpu-smoke env PYTHONPATH="$TARGET" OUT="$CHECK_OUT" timeout $((DEADLINE_S + 60)) \
  "$VENV/bin/python" benchmarks/gpu_check.py --device cpu --vit tiny --deadline-s "$DEADLINE_S"
if [ -s "$CHECK_OUT/gpu-check.json" ]; then
  "$VENV/bin/python" - "$CHECK_OUT/gpu-check.json" <<'EOF'
import collections, json, sys
report = json.load(open(sys.argv[1]))
count = collections.Counter(r["status"] for r in report["rows"])
print(f"gpu-check.json: {len(report['rows'])} rows, " + ", ".join(f"{n} {k}" for k, n in sorted(count.items())))
EOF
fi
rm -rf "$CHECK_OUT"

echo; echo "== compat lane summary ($((SECONDS - START)) s)"
STATUS=0
for name in kernel-tests-interpreted backend-parity gpu-check-cpu-smoke; do
  echo "$name: ${RESULT[$name]}"
  [[ "${RESULT[$name]}" == PASS* ]] || STATUS=1
done
exit $STATUS
