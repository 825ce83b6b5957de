"""Reward functions (lite_rlhf/functions.py): TRL's signature and TRL's own functions unchanged, None handled,
every broken function one line, and the combined reward the ranking sees."""

import textwrap
from collections import Counter
from types import SimpleNamespace

import pytest

from lite_rlhf.config import ConfigError, PairsConfig
from lite_rlhf.data import Prompt
from lite_rlhf.functions import RewardFunctionError, call, combine, load_function, load_functions
from lite_rlhf.pairs import select_pairs, select_winners

CHAT = Prompt("c1", [{"role": "system", "content": "Think first."}, {"role": "user", "content": "2+2?"}],
              {"solution": "4"}, chat=True)  # fmt: skip
PLAIN = Prompt("p1", [{"role": "user", "content": "Name a colour."}], {"solution": "red", "level": 2})


def sample(pid, index, text):
    return SimpleNamespace(prompt_id=pid, index=index, text=text, token_ids=[1, 2, 3][: len(text) % 3 + 1],
                           finish_reason="stop", n_tokens=3)  # fmt: skip


def test_trl_own_reward_function_runs_unchanged():
    (f,) = load_functions(["trl.rewards:think_format_reward"], (), "reward.functions")
    texts = ["<think>\nadd them\n</think>\n4", "4"]
    assert call(f, [CHAT, CHAT], texts, [[1], [2]]) == [1.0, 0.0]  # conversational: completions as messages


def test_a_file_function_gets_the_data_columns(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent('''
        def exact(prompts, completions, solution, **kwargs):
            assert kwargs["level"] == [2, 2] and kwargs["completion_ids"][0] == [1, 2]
            assert prompts == ["Name a colour.", "Name a colour."]
            return [1.0 if c.strip() == s else 0.0 for c, s in zip(completions, solution)]

        def named_only(completions, solution):  # no **kwargs: only what it names is passed
            return [len(c) for c in completions]
    '''))  # fmt: skip
    f = load_functions([f"{path}:exact"], (2.0,), "reward.functions")[0]
    assert f.weight == 2.0 and call(f, [PLAIN, PLAIN], ["red", "blue"], [[1, 2], [3]]) == [1.0, 0.0]
    g = load_functions([f"{path}:named_only"], (), "reward.functions")[0]
    assert call(g, [PLAIN], ["abc"], [[1]]) == [3.0]


def test_none_is_no_score_not_zero():
    assert combine([(1.0, [1.0, None, None]), (0.5, [2.0, 4.0, None])]) == [2.0, 2.0, None]
    samples = [sample("a", 0, "x"), sample("a", 1, "yy"), sample("a", 2, "zzz"), sample("b", 0, "w"),
               sample("b", 1, "v")]  # fmt: skip
    rewards = [None, 1.0, 3.0, None, None]  # a's unscored sample is never chosen nor rejected; b has no score
    pairs, dropped = select_pairs(samples, rewards, PairsConfig())
    assert [(p.chosen_text, p.rejected_text) for p in pairs] == [("zzz", "yy")] and dropped == Counter(unscored=1)
    won, dropped = select_winners(samples, rewards, 0.0)
    assert [w.text for w in won] == ["zzz"] and dropped == Counter(unscored=1)


def broken(tmp_path, body: str):
    path = tmp_path / "broken.py"
    path.write_text("import math\n\ndef f(prompts, completions, **kwargs):\n" + textwrap.indent(body, "    ") + "\n")
    return load_functions([f"{path}:f"], (), "reward.functions")[0]


@pytest.mark.parametrize(
    "body, message",
    [
        ("raise KeyError('answer')", "raised KeyError: 'answer' (on prompt 'p1'; nothing committed was lost)"),
        ("return [1.0]", "returned 1 score(s) for 2 completion(s)"),
        ("return 1.0", "returned float, not a list of scores"),
        ("return ['good', 1.0]", "returned str 'good' for prompt 'p1', not a number or None"),
        ("return [math.nan, 1.0]", "returned nan for prompt 'p1' (None means no score)"),
        ("return [True, 1.0]", "returned bool True for prompt 'p1'"),
    ],
)
def test_a_broken_function_is_one_line(tmp_path, body, message):
    f = broken(tmp_path, body)
    with pytest.raises(RewardFunctionError) as info:
        call(f, [PLAIN, PLAIN], ["a", "b"], [[1], [2]])
    text = str(info.value)
    assert message in text and "\n" not in text and f"reward function '{tmp_path}/broken.py:f'" in text, text


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", "is not module:function or path/to/file.py:function"),
        ("missing.py:f", "'missing.py' does not exist"),
        ("json:no_such_function", "'json' has no function 'no_such_function'"),
        ("no_such_module_xyz:f", "loading 'no_such_module_xyz' failed: ModuleNotFoundError"),
    ],
)
def test_a_bad_spec_names_the_key(spec, message):
    with pytest.raises(ConfigError) as info:
        load_function(spec, "reward.functions")
    assert str(info.value).startswith("config key 'reward.functions': ") and message in str(info.value)


def test_a_file_that_fails_to_import_is_one_line(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("import no_such_module_xyz\n")
    with pytest.raises(ConfigError, match=r"loading '.*bad.py' failed: ModuleNotFoundError: No module named"):
        load_function(f"{path}:f", "eval.functions")


def test_numpy_and_torch_numbers_are_numbers(tmp_path):
    f = broken(tmp_path, "import numpy, torch\nreturn [numpy.float32(0.5), torch.tensor(2)]")
    assert call(f, [PLAIN, PLAIN], ["a", "b"], [[1], [2]]) == [0.5, 2.0]


def test_a_call_past_its_time_limit_names_the_function_and_the_prompt(tmp_path):
    import time

    path = tmp_path / "slow.py"
    path.write_text("import time\n\ndef stuck(prompts, completions, **kwargs):\n    time.sleep(30)\n")
    (f,) = load_functions([f"{path}:stuck"], (), "reward.functions", timeout=0.3)
    start = time.monotonic()
    with pytest.raises(RewardFunctionError) as info:
        call(f, [PLAIN, PLAIN], ["red", "blue"], [[1], [2]])
    assert time.monotonic() - start < 5  # stopped at the limit, not when the call ends
    message = str(info.value)
    assert "reward function 'stuck'" in message and "reward.function_timeout=0.3 s on prompt 'p1'" in message
    assert "nothing committed was lost" in message and "\n" not in message
    path.write_text("def quick(prompts, completions, **kwargs):\n    raise KeyError('answer')\n")
    (quick,) = load_functions([f"{path}:quick"], (), "reward.functions", timeout=5)
    with pytest.raises(RewardFunctionError, match="raised KeyError: 'answer' \\(on prompt 'p1'"):
        call(quick, [PLAIN], ["red"], [[1]])  # its own error comes through the limit unchanged
