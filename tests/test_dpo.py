"""DPO on the shared model: `dpo.kernel` is honoured (the fused chunked path and the full-logits
reference train the same), and Triton is refused where it cannot run."""

import os

import pytest
import torch

from lite_rlhf.config import ConfigError, load_config
from lite_rlhf.data import prompt_ids, response_ids
from lite_rlhf.dpo import add_reference_logps, dpo_loss_fn, train_dpo
from lite_rlhf.models import make_tiny_model
from lite_rlhf.pairs import Pair
from lite_rlhf.roles import SharedModel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def train(tiny, kernel: str) -> list[dict]:
    cfg = load_config(None, [f"model.name={tiny}", "lora.r=4", f"dpo.kernel={kernel}", "dpo.micro_batch=2",
                             "dpo.grad_accum=1", "dpo.lr=1e-2", "dpo.epochs=2"])  # fmt: skip
    model = SharedModel(cfg)
    tok = model.tokenizer
    ids = {str(i): prompt_ids(tok, [{"role": "user", "content": f"describe the {w}."}])
           for i, w in enumerate(("sun", "sea", "fox", "dog"))}  # fmt: skip
    pairs = [Pair(pid, response_ids(tok, "the sun is a star."), response_ids(tok, "no no"), "", "", 1.0, 0.0)
             for pid in ids]  # fmt: skip
    pairs = add_reference_logps(model, pairs, ids, cfg.data, cfg.dpo.micro_batch)
    records = []
    train_dpo(model, pairs, ids, cfg.dpo, cfg.data, seed=0, quiet=True, on_step=records.append)
    return records


def test_chunked_kernel_trains_like_the_full_logits_reference(tiny):
    fused, reference = train(tiny, "chunked"), train(tiny, "reference")
    assert len(fused) == len(reference) == 4
    for a, b in zip(fused, reference, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    assert fused[-1]["loss"] < fused[0]["loss"], "DPO should lower the loss on a learnable preference"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs Triton on CPU")
def test_triton_is_refused_without_cuda_or_the_interpreter():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ConfigError, match="dpo.kernel"):
        dpo_loss_fn(load_config(None, ["dpo.kernel=triton"]).dpo, "cpu")
