#!/usr/bin/env bash
# Fill the git-ignored .whl/ with the wheels the GPU machine (no package index) lacks, check that the work tree
# plus those wheels fit the 64 MiB that travel with one device call, and print the one `run` command that installs
# them there and runs benchmarks/gpu_check.py with its results in $OUT.
#
#   benchmarks/gpu_wheels.sh            # downloads (network here), sizes, prints the command
#   WHEEL_DIR=/tmp/w benchmarks/gpu_wheels.sh
#
# The GPU machine has no package registry. It has Python 3.12 with torch 2.11, torchvision 0.26, triton 3.6, onnx,
# onnxscript, onnxruntime (CPU build), pytest and their dependencies (numpy, pillow, setuptools, ...). What scc's
# check imports beyond that: open_clip (the CLIP ViT-B/32 model and R-TPT's text tower) with its tokenizer's ftfy,
# wcwidth and regex and its tqdm, and safetensors (the bundled tiny model's weights). Versions are the ones
# benchmarks/compat_lane.sh tests; every wheel is downloaded without dependencies, for CPython 3.12 on
# manylinux x86-64.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WHEEL_DIR="${WHEEL_DIR:-$ROOT/.whl}"
PYTHON="${PYTHON:-python3}"
LIMIT_MIB=64
WHEELS=(
  open_clip_torch==3.3.0
  ftfy==6.3.1
  wcwidth==0.9.5
  regex==2026.12.2
  tqdm==4.70.1
  safetensors==0.8.0
)

mkdir -p "$WHEEL_DIR"
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  --dest "$WHEEL_DIR" "${WHEELS[@]}"

# exactly these wheels: anything else in the folder (an older version, a stray download) would travel and install too
"$PYTHON" - "$WHEEL_DIR" "$ROOT" "$LIMIT_MIB" "${WHEELS[@]}" <<'EOF'
import re
import subprocess
import sys
from pathlib import Path

folder, root, limit_mib, wanted = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
norm = lambda name: re.sub(r"[-_.]+", "_", name).lower()
want = {norm(w.split("==")[0]): w.split("==")[1] for w in wanted}
have = sorted(folder.glob("*.whl"))
stray = [w.name for w in have if (norm(w.name.split("-")[0]), w.name.split("-")[1]) not in want.items()]
missing = [f"{n}=={v}" for n, v in want.items() if not any(norm(w.name.split("-")[0]) == n for w in have)]
if stray or missing:
    sys.exit(f"{folder} must hold exactly {', '.join(wanted)}: remove {stray or 'nothing'}, missing "
             f"{missing or 'nothing'}; delete the folder and run this script again")
files = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, check=True).stdout.decode().split("\0")
tree = sum((root / f).stat().st_size for f in files if f and (root / f).is_file())
wheels = sum(w.stat().st_size for w in have)
mib = lambda n: n / 2**20
print(f"wheels: {len(have)} files, {mib(wheels):.2f} MiB in {folder}")
for w in have:
    print(f"  {w.name}  {mib(w.stat().st_size):.2f} MiB")
print(f"work tree (tracked + untracked, not ignored): {mib(tree):.2f} MiB; with the wheels {mib(tree + wheels):.2f} "
      f"MiB of {limit_mib} MiB")
if tree + wheels > limit_mib * 2**20:
    sys.exit(f"the tree plus the wheels ({mib(tree + wheels):.1f} MiB) exceed the {limit_mib} MiB that travel with "
             "a device call: move large untracked files out of the tree or git-ignore them")
EOF

if [ "$WHEEL_DIR" != "$ROOT/.whl" ]; then
  echo "note: the command below installs from .whl/ in the repository root; copy the wheels there first"
fi
# The command: wheels and scc into a target folder on PYTHONPATH (no registry, no dependency resolution, no build
# isolation: setuptools comes with torch there), then the check under its 540 s deadline, its JSON and full log
# in $OUT. Keep it on one line (the device tool takes at most 2,000 characters).
CMD='set -o pipefail; T=/tmp/scc-py; python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation --target "$T" .whl/*.whl . && PYTHONPATH="$T" python3 benchmarks/gpu_check.py --deadline-s 540 2>&1 | tee "$OUT/gpu-check.log"'
echo
echo "run it with the device tool (carry the git-ignored wheels; ${#CMD} characters):"
echo "  command: $CMD"
echo "  carry:   [\".whl\"]"
echo "  timeout_s: 600"
