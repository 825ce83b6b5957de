"""Fixtures shared by the test modules that build tiny models in-process, and the two test tiers.

Tiers (docs/development.md): a plain `pytest` runs the quick tier, every test not marked `slow`;
`RUN_SLOW=1 pytest` runs the whole suite (CI's run). A marker expression that names `slow` (`-m slow`)
is obeyed as written."""

import pytest
import torch
from tier import RUN_SLOW

from lite_rlhf.models import make_tiny_model


def _marker_expression_names_slow(config) -> bool:
    return "slow" in (config.option.markexpr or "")


def pytest_report_header(config):
    if RUN_SLOW or _marker_expression_names_slow(config):
        return "tier: whole suite (RUN_SLOW=1, or a marker expression naming 'slow')"
    return "tier: quick (tests marked slow are deselected; RUN_SLOW=1 runs the whole suite)"


def pytest_collection_modifyitems(config, items):
    """The quick tier: tests marked slow are deselected (counted in pytest's 'deselected' line)."""
    if RUN_SLOW or _marker_expression_names_slow(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


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
