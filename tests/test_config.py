"""Config loading: precedence, validation messages, every shipped YAML."""

from pathlib import Path

import pytest

from lite_rlhf.config import Config, ConfigError, load_config, to_yaml

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_follow_the_paper():
    cfg = Config()
    assert (cfg.dpo.beta, cfg.generation.n, cfg.dpo.epochs, cfg.dpo.warmup_ratio) == (0.1, 8, 2.0, 0.03)
    assert cfg.pairs.length_penalty == 0.0 and cfg.pairs.length_unit == "chars"


def test_precedence_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dpo:\n  beta: 0.3\n  lr: 1e-5\ngeneration:\n  n: 4\n")
    cfg = load_config(f, ["dpo.beta=0.5", "lora.target_modules=q_proj,v_proj", "reward.adapter=null"])
    assert cfg.dpo.beta == 0.5 and cfg.dpo.lr == 1e-5 and cfg.generation.n == 4
    assert cfg.lora.target_modules == ("q_proj", "v_proj") and cfg.reward.adapter is None
    assert isinstance(cfg.dpo.beta, float)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dpo.bta=0.2"], "unknown config key 'dpo.bta' (command line); did you mean 'dpo.beta'?"),
        (["genration.n=4"], "did you mean 'generation.n'?"),
        (["dpo.beta=abc"], "config key 'dpo.beta' must be float, got 'abc'"),
        (["dpo.loss_type=kto"], "config key 'dpo.loss_type' must be a list of 'sigmoid', 'ipo', 'hinge', 'robust',"),
        (["dpo.loss_type=sigmoid,sft", "dpo.loss_weights=1"], "'dpo.loss_weights': 1 weight(s) for the 2 loss(es)"),
        (["dpo.loss_type=sigmoid,sft", "dpo.rpo_alpha=1"], "config key 'dpo.rpo_alpha' adds the sft term"),
        (["dpo.loss_type=ipo,ipo"], "config key 'dpo.loss_type' names a loss twice: ipo, ipo"),
        (["loop.algorithm=ppo", "ppo.ptx_coef=0.1"], "config keys 'ppo.ptx_coef' and 'data.ptx' go together"),
        (["loop.algorithm=ppo", "reward.kind=functions", "reward.functions=m:f", "ppo.value_init=reward"],
         "config key 'ppo.value_init': reward copies our reward adapter"),
        (["generation.n=0"], "config key 'generation.n' must be in [1, 16384], got 0"),
        (["generation.top_p=1.5"], "config key 'generation.top_p' must be in (0, 1], got 1.5"),
        (["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"], "applies to loss_type sigmoid, robust, exo_pair"),
        (["dpo.loss_type=exo_pair"], "config key 'dpo.label_smoothing' must be > 0 with loss_type exo_pair"),
        (["beta"], "not of the form section.key=value"),
        (["model.gradient_checkpointing=sometimes"], "config key 'model.gradient_checkpointing' must be bool or int "
                                                     "or one of 'auto', got 'sometimes'"),
        (["model.gradient_checkpointing=-2"], "config key 'model.gradient_checkpointing' must be true, false, auto"),
        (["model.memory_budget=lots"], "config key 'model.memory_budget': 'lots' is not a size such as 24GB"),
        (["model.memory_budget=0GiB"], "config key 'model.memory_budget': '0GiB' must be a positive size"),
        (["generation.temperature=0"], "config key 'generation.temperature': 0 is greedy, so the 8 answers"),
        (["generation.n=16385"], "config key 'generation.n' must be in [1, 16384], got 16385"),
        (["dpo.beta=0"], "config key 'dpo.beta' must be in (0, inf), got 0"),  # an open end at infinity: never inf]
        (["pairs.length_penalty=-1"], "config key 'pairs.length_penalty' must be in [0, inf), got -1"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_dpo_losses_are_one_name_or_a_weighted_list(tmp_path):
    one = tmp_path / "one.yaml"
    one.write_text("dpo:\n  loss_type: simpo\n")
    assert load_config(one).dpo.loss_type == ("simpo",)
    cfg = load_config(None, ["dpo.loss_type=robust,bco_pair", "dpo.loss_weights=0.8,0.2", "dpo.label_smoothing=0.1"])
    assert (cfg.dpo.loss_type, cfg.dpo.loss_weights) == (("robust", "bco_pair"), (0.8, 0.2))  # robust reads eps


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dpo:\n  beta: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+' is not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("dpo:\n  betta: 0.1\n")
    with pytest.raises(ConfigError, match=r"'dpo.betta' in .*typo.yaml; did you mean 'dpo.beta'"):
        load_config(typo)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["dpo.beta=0.25", "generation.n=3"])
    f = tmp_path / "resolved.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config(f) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    load_config(path)
    assert path.read_text().startswith("#"), "a config starts with a header comment showing how to run it"


def test_configs_are_shipped():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


def test_every_field_has_a_comment():
    """Every config field says what it does: a comment on its line or on the line above, in the class
    that defines it (a section's own class, or the trainers' common base)."""
    import dataclasses
    import inspect

    from lite_rlhf import config

    silent = []
    for section in dataclasses.fields(config.Config):
        cls = section.default_factory
        for f in dataclasses.fields(cls):
            for klass in cls.__mro__:  # the nearest class whose body defines the field
                source = inspect.getsource(klass).splitlines()
                found = [i for i, x in enumerate(source) if x.startswith(f"    {f.name}: ")]
                if found:
                    break
            line = found[0]
            if "#" not in source[line] and not source[line - 1].strip().startswith("#"):
                silent.append(f"{section.name}.{f.name}")
    assert not silent, silent


def test_gradient_checkpointing_takes_a_switch_a_count_or_auto():
    assert load_config().model.gradient_checkpointing == "auto" and load_config().model.memory_budget is None
    for text, value in (("true", True), ("false", False), ("3", 3), ("auto", "auto"), ("0", 0)):
        assert load_config(None, [f"model.gradient_checkpointing={text}"]).model.gradient_checkpointing == value
    assert load_config(None, ["model.memory_budget=2GiB"]).model.memory_budget == "2GiB"


def test_the_algorithm_key_lists_the_algorithm_modules():
    import typing

    from lite_rlhf import algorithms
    from lite_rlhf.config import LoopConfig

    assert typing.get_args(typing.get_type_hints(LoopConfig)["algorithm"]) == algorithms.NAMES
    for name in algorithms.NAMES:
        module = algorithms.get(name)
        assert callable(module.start) and callable(module.iteration), name


def test_generation_n_is_bounded_by_the_installed_vllms_limit():
    """The bound is vLLM's default VLLM_MAX_N_SEQUENCES, read from the installed package's source (importing vllm
    takes seconds) so that a new vllm with another limit fails here."""
    import dataclasses
    import importlib.util
    import re
    from pathlib import Path

    from lite_rlhf.config import GenerationConfig

    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.skip("vllm is not installed")
    source = (Path(spec.submodule_search_locations[0]) / "envs.py").read_text()
    limit = int(re.search(r'"VLLM_MAX_N_SEQUENCES", "(\d+)"', source).group(1))
    assert {f.name: f for f in dataclasses.fields(GenerationConfig)}["n"].metadata["hi"] == limit


def test_identity_leaves_out_keys_that_change_no_artifact():
    from lite_rlhf.config import identity

    plain = identity(load_config(None, []))
    fixed = ["generation.kv_cache_gib=3", "generation.gpu_memory_utilization=0.8", "reward.function_timeout=600",
             "run.quiet=true", "reward.allow_weak=true"]  # fmt: skip
    assert identity(load_config(None, fixed)) == plain
    assert identity(load_config(None, ["generation.max_new_tokens=7"])) != plain  # one that changes the samples


def test_lora_targets_for_peft_keep_the_all_linear_shorthand_a_string():
    """peft reads all-linear as its shorthand only as a string: in a list it is a module name that matches nothing."""
    assert load_config(None, []).lora.peft_target_modules == "all-linear"
    assert load_config(None, ["lora.target_modules=q_proj,v_proj"]).lora.peft_target_modules == ["q_proj", "v_proj"]
