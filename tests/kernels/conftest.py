import sys
from pathlib import Path

import pytest
import torch

# kernel_checks.py (the shared case table) sits beside the tests; make it importable whatever pytest's
# import mode. This directory has no __init__.py on purpose: it would make it a top-level package
# named `kernels`, the import name owned by Hugging Face's `kernels` package.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _one_thread():
    # The kernel tests use tiny shapes: on 2 cores shared with other jobs, two OpenMP threads spend
    # far longer waiting at barriers than computing (a 16x64 @ 64x128 matmul took ~30 ms instead of
    # microseconds). One thread, restored afterwards so other tests keep the default.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
