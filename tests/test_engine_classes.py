"""What vLLM does to model classes in the shared process must not reach the trainer's model.

vLLM's generic Transformers backend decorates the transformers decoder class of an architecture it has no
implementation of (`support_torch_compile`: a new `__call__`); the trainer's decoder, an instance of the same
class, then died in its next forward. Here the real decorator is applied to a class of the trainer's decoder
(a fresh subclass, so that no other test sees it), without starting an engine; tests/test_engine_families.py
starts vLLM on such a family (Ministral).
"""

from __future__ import annotations

import pytest
import torch

from lite_rlhf.batching import make_batch
from lite_rlhf.config import load_config
from lite_rlhf.generate import GenerationError, check_model_classes, own_decoder_class, start_engine
from lite_rlhf.models import make_tiny_model
from lite_rlhf.roles import SharedModel


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("classes"), hidden_size=64, heads=2, kv_heads=1)
    cfg = load_config(None, [f"model.name={model_dir}", "lora.r=4", "generation.backend=hf"])
    return cfg, SharedModel(cfg)


def logps(model: SharedModel) -> torch.Tensor:
    batch = make_batch([([5, 6, 7], [8, 9, 10, 11])], model.pad_id, 64, "keep_ends")
    with torch.no_grad():
        return model.token_logps(batch)


def as_fresh_class(model: SharedModel) -> type:
    """The trainer's decoder as an instance of a new subclass of its class: what vLLM decorates, without touching
    the class other tests use."""
    decoder = model.peft.get_base_model().get_decoder()
    fresh = type("FreshDecoder", (type(decoder),), {})
    decoder.__class__ = fresh
    return fresh


def vllm_decorates(cls: type) -> None:
    """What vLLM 0.32's Transformers backend does to the decoder class (`_decorate_for_torch_compile`)."""
    from vllm.compilation.decorators import DynamicArgDims, support_torch_compile

    support_torch_compile(dynamic_arg_dims=DynamicArgDims(input_ids=1, inputs_embeds=1, position_ids=-1))(cls)


def test_the_trainer_runs_after_vllm_decorates_its_decoder_class(trainer):
    """The engine's start decorates the decoder's class; the trainer's log-probs after it are the same, bit for bit
    (before the fix: AttributeError 'do_not_compile' from vLLM's `__call__`)."""
    cfg, model = trainer
    want = logps(model)
    fresh = as_fresh_class(model)
    start_engine(model, cfg, lambda share: vllm_decorates(fresh), lambda line: None)
    assert "TorchCompileWithNoGuardsWrapper" in [c.__name__ for c in fresh.__mro__]  # the class was reached
    torch.testing.assert_close(logps(model), want, rtol=0, atol=0)


def test_a_class_change_it_cannot_keep_out_is_refused_at_start(trainer):
    cfg, model = trainer
    decoder = model.peft.get_base_model().get_decoder()
    layer = decoder.layers[0]
    fresh = type("FreshLayer", (type(layer),), {})
    for each in decoder.layers:  # the decoder layers: a class own_decoder_class leaves alone
        each.__class__ = fresh

    def make(share):
        fresh.__call__ = lambda self, *a, **k: None  # what an engine start could do to a class in this process
        return object()

    with pytest.raises(GenerationError, match=r"^model family 'llama': starting the vLLM engine in this process "
                       r"changed the model class FreshLayer the trainer runs"):  # fmt: skip
        start_engine(model, cfg, make, lambda line: None)
    before = own_decoder_class(model.peft)
    check_model_classes(model.peft, before)  # nothing changed since: silent
    for each in decoder.layers:
        each.__class__ = type(layer).__mro__[1]
