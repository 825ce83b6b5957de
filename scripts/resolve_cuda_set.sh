#!/usr/bin/env bash
# Does the CUDA branch of setup.sh resolve? A dry run of pip's resolver for Linux x86-64 CUDA wheels, from
# any machine (no GPU needed, nothing installed): torch as setup.sh pins it, pyproject.toml's dependencies and
# `gpu` extra, and scripts/constraints.txt. Prints the chosen versions of the packages that matter; the full
# report is written to ${1:-/tmp/lite-rlhf-cuda-set.json}. Takes a few minutes (metadata of ~200 packages).
#
#   bash scripts/resolve_cuda_set.sh
set -euo pipefail
cd "$(dirname "$0")/.."
report=${1:-/tmp/lite-rlhf-cuda-set.json}
torch=$(sed -n 's/^TORCH_VERSION=//p' scripts/setup.sh)
mapfile -t reqs < <(python3 -c '
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(r for r in p["dependencies"] + p["optional-dependencies"]["gpu"] if not r.startswith("torch")))')
platforms=()
for n in $(seq 5 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
# --isolated: only PyPI, none of this machine's pip settings (local wheels, caps); a throwaway --target, so
# that pip resolves for the platform asked for and not for this machine.
PIP_CONSTRAINT= python3 -m pip install --isolated --dry-run --ignore-installed --quiet --only-binary=:all: \
  --target "$(mktemp -d)" --python-version 3.11 --implementation cp "${platforms[@]}" \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64 \
  "torch==$torch" "${reqs[@]}" -c scripts/constraints.txt --report "$report"
python3 - "$report" <<'PYEOF'
import json, sys
chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
keys = ["torch", "vllm", "bitsandbytes", "transformers", "peft", "triton", "nvidia-nccl-cu13", "flashinfer-python"]
print(f"resolved {len(chosen)} packages: " + ", ".join(f"{k} {chosen.get(k, '-')}" for k in keys))
PYEOF
