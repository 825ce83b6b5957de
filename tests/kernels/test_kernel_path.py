"""Which path runs, and that importing the package needs no Triton."""

import os
import subprocess
import sys

import torch
from lite_rlhf.kernels import kernel_path


def _run(code: str, **env_overrides) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_cpu_without_interpreter_is_chunked():
    assert kernel_path("cpu") == "chunked-torch"
    assert kernel_path(torch.device("cpu")) == "chunked-torch"
    assert kernel_path() in ("triton", "chunked-torch")


def test_import_does_not_import_triton():
    proc = _run(
        "import sys, torch\n"
        "import lite_rlhf.kernels as k\n"
        "h = torch.randn(2, 3, 8); w = torch.randn(20, 8); t = torch.randint(0, 20, (2, 3))\n"
        "k.linear_logprobs(h, w, t)\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
        "print(k.kernel_path('cpu'))\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "chunked-torch"


def test_works_when_triton_cannot_be_imported():
    # sys.modules['triton'] = None makes `import triton` raise ImportError, as when it is not installed;
    # even with TRITON_INTERPRET=1 the package must import and fall back to the chunked path.
    proc = _run(
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "import torch\n"
        "import lite_rlhf.kernels as k\n"
        "assert not k.triton_available()\n"
        "assert k.kernel_path('cpu') == 'chunked-torch', k.kernel_path('cpu')\n"
        "h = torch.randn(2, 3, 8, requires_grad=True); w = torch.randn(20, 8); t = torch.randint(0, 20, (2, 3))\n"
        "loss = k.fused_dpo_loss(h, w, t, torch.zeros(1), torch.zeros(1), beta=0.1)[0]\n"
        "loss.backward()\n"
        "print('ok')\n",
        TRITON_INTERPRET="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_interpreter_requested_by_environment():
    proc = _run("import lite_rlhf.kernels as k; print(k.kernel_path('cpu'))", TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "triton-interpreter"
