"""The demo's gold checker: it must pass real answers and fail the ways a policy games it."""

from lite_rlhf.data import Prompt
from lite_rlhf.demo.task import GOLD, gold_check, make_prompts, split_prompts
from lite_rlhf.evaluate import bootstrap_diff, gold_figures, gold_rows, tax_figures, win_rate

KEYWORD = {"constraint": "keyword", "value": "banana", "topic_keys": ["ocean", "sea"]}
LIMIT = {"constraint": "max_words", "value": 15, "topic_keys": ["cat"]}


def test_passes_a_real_answer():
    assert gold_check(KEYWORD, "The ocean is vast and blue, and a banana boat floats on it.")["passed"]
    assert gold_check(LIMIT, "A cat is a small furry animal that purrs.")["passed"]


def test_fails_each_way_of_gaming_it():
    cases = {
        "Banana Banana Banana Banana": "no_repetition",  # the collapse seen in cpu-stack.md
        "banana ocean banana ocean banana ocean banana ocean": "no_repetition",
        "The sky is blue and a banana is yellow.": "on_topic",
        "ocean banana": "real_answer",  # too short to be an answer
        "🌊🌊🌊 ocean 🍌🍌 banana 🌊🌊": "real_answer",
        "Use the word banana somewhere in your answer ocean": "real_answer",  # an echo of the instruction
        "The ocean is deep, blue and full of fish.": "instruction",
    }
    for text, failing in cases.items():
        checks = gold_check(KEYWORD, text)
        assert not checks["passed"] and not checks[failing], (text, checks)
    long = "A cat is a small animal that likes to sleep in the sun all day long and purr."
    assert not gold_check(LIMIT, long)["instruction"]


def test_prompt_splits_are_disjoint_by_topic():
    splits = split_prompts()
    topics = [{r["topic"] for r in rows} for rows in splits.values()]
    for i, a in enumerate(topics):
        for b in topics[i + 1 :]:
            assert not a & b
    assert len({r["id"] for r in make_prompts()}) == len(make_prompts())
    assert len(splits["prompts"]) % 3 == 0  # sliced evenly over 3 iterations


class S:
    def __init__(self, pid, text, index=0):
        self.prompt_id, self.text, self.index = pid, text, index


def test_figures():
    p = Prompt("k", [{"role": "user", "content": "Describe the ocean. Use the word 'banana'."}], KEYWORD)
    q = Prompt("m", [{"role": "user", "content": "Describe a cat. Answer in fewer than 15 words."}], LIMIT)
    samples = [
        S("k", "The ocean is vast and blue, and a banana boat floats on it."),
        S("k", "Banana Banana Banana"),
        S("m", "A cat is a small furry animal that purrs."),
    ]
    figs = gold_figures(gold_rows(GOLD, [p, q], samples))
    assert figs["gold"] == 2 / 3 and figs["gold_keyword"] == 0.5 and figs["gold_max_words"] == 1.0
    tax = tax_figures(GOLD, [p], [S("k", "The ocean is big."), S("k", "sea sea sea sea")])
    assert tax["tax_words"] == 4.0 and tax["tax_no_repetition"] == 0.5
    assert win_rate({("a", 0): 1.0, ("a", 1): 0.0, ("b", 0): 2.0}, {("a", 0): 0.0, ("a", 1): 0.0, ("b", 0): 3.0}) == 0.5
    lo, hi = bootstrap_diff({"a": 1.0, "b": 1.0, "c": 0.0}, {"a": 0.0, "b": 0.0, "c": 0.0})
    assert 0.0 <= lo <= 2 / 3 <= hi <= 1.0


def test_demo_sft_set_is_gold_passing_answers_on_reward_model_topics_only():
    """data.sft=demo: π0's gold-passing answers on the reward-model prompts, as scripts/make_demo_sft.py
    writes them; none of their topics is a loop, validation or test topic."""
    import importlib.util
    import json
    from pathlib import Path

    from lite_rlhf.config import load_config
    from lite_rlhf.data import load_conversations
    from lite_rlhf.task import data_path

    path = data_path(load_config(None, ["data.sft=demo"]).data, "sft")
    script = Path(__file__).resolve().parent.parent / "scripts" / "make_demo_sft.py"
    spec = importlib.util.spec_from_file_location("make_demo_sft", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == module.sft_rows(2)
    assert len(load_conversations(path)[0]) == len(rows) > 50
    splits = split_prompts()
    by_id = {r["id"]: r for r in splits["rm_prompts"]}
    held = {r["topic"] for name in ("prompts", "val_prompts", "test_prompts") for r in splits[name]}
    for row in rows:
        meta = by_id[row["prompt_id"]]
        assert meta["prompt"] == row["prompt"] and meta["topic"] not in held
        assert gold_check(meta, row["completion"])["passed"], row


def test_checker_reward_is_the_share_of_gold_checks_through_the_reward_function_path():
    """The verifiable reward GRPO/RLOO can train on (reward.functions=lite_rlhf.demo.task:checker_reward), called
    as the loop calls every reward function: the prompt rows' columns as keyword arguments."""
    from lite_rlhf.config import load_config
    from lite_rlhf.functions import call, load_functions
    from lite_rlhf.task import load_task

    task = load_task(load_config(None, []).data)
    prompts = [p for p in task.prompts if p.meta.get("constraint") == "max_words"][:1]
    prompts += [p for p in task.prompts if p.meta.get("constraint") == "keyword"][:1]
    topic = prompts[0].meta["topic_keys"][0]
    texts = [f"The {topic} is calm and wide today.", "no no no no no no no no"]
    (f,) = load_functions(["lite_rlhf.demo.task:checker_reward"], [], "reward.functions")
    got = call(f, prompts, texts, [[1]] * 2)
    want = []
    for p, text in zip(prompts, texts, strict=True):
        checks = gold_check(p.meta, text)
        want.append(sum(v for k, v in checks.items() if k != "passed") / (len(checks) - 1))
    assert got == want and got[0] == 1.0 and got[1] < 0.5
