"""Fixtures shared by the test modules that build tiny models in-process."""

import pytest
import torch

from lite_rlhf.models import make_tiny_model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one thread is fastest, and on a shared 2-core machine several spin-wait for each other.
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with a ChatML tokenizer (hidden 64: bitsandbytes' CPU path needs in_features >= 64)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))
