"""The task's prompt files: ids carry their split, never collide across files or with the loop's own
ids, and a prompt shared by training and evaluation is reported."""

import json

import pytest

from lite_rlhf.config import load_config
from lite_rlhf.data import DataError
from lite_rlhf.task import load_task


def files(tmp_path, prompts, val, test, offline=None):
    paths = {}
    for name, rows in (("prompts", prompts), ("val_prompts", val), ("test_prompts", test), ("offline_pairs", offline)):
        if rows is not None:
            paths[name] = tmp_path / f"{name}.jsonl"
            paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_config(None, [f"data.{k}={v}" for k, v in paths.items()]).data


def test_ids_without_id_carry_their_split(tmp_path):
    task = load_task(files(tmp_path, [{"prompt": "a"}, {"prompt": "b"}], [{"prompt": "c"}], [{"prompt": "d"}]))
    assert [p.id for p in task.all_prompts] == ["prompts:1", "prompts:2", "val:1", "test:1"]
    assert task.warnings == []


def test_a_held_out_prompt_in_training_is_reported_with_its_count(tmp_path):
    task = load_task(files(tmp_path, [{"prompt": "a"}, {"prompt": "c"}], [{"prompt": "c"}], [{"prompt": "a"}]))
    assert len(task.warnings) == 1 and task.warnings[0].startswith("2 prompt text(s)"), task.warnings


def test_a_user_id_equal_to_an_offline_pair_id_is_refused(tmp_path):
    offline = [{"prompt": "x", "chosen": "good", "rejected": "bad"}]
    d = files(tmp_path, [{"id": "offline:0", "prompt": "a"}], [{"prompt": "c"}], [{"prompt": "d"}], offline)
    with pytest.raises(DataError, match="prompt id 'offline:0' is used in data.prompts .* and data.offline_pairs"):
        load_task(d)


def test_slices_use_every_prompt_and_refuse_an_empty_iteration():
    from lite_rlhf.config import ConfigError
    from lite_rlhf.data import Prompt
    from lite_rlhf.task import Task

    task = Task([Prompt(f"p{i}", [{"role": "user", "content": str(i)}]) for i in range(7)], [], [], [], [])
    parts = [task.slice(t, 3, 0) for t in (1, 2, 3)]
    assert [len(p) for p in parts] == [2, 2, 3] and sum(parts, []) == task.prompts  # 7 // 3 left one out before
    assert task.check_slices(3, 0) is None and "uses 4 of the 7" in task.check_slices(2, 2)
    for iterations, per in ((8, 0), (3, 4)):
        with pytest.raises(ConfigError, match="too few for loop.iterations"):
            task.check_slices(iterations, per)


def test_balance_by_length_keeps_as_many_chosen_longer_as_chosen_shorter():
    from lite_rlhf.data import PreferencePair
    from lite_rlhf.task import balance_by_length

    msgs = [{"role": "user", "content": "q"}]
    shorter = [PreferencePair(msgs, f"ok{i}", "too long answer") for i in range(5)]
    pairs = [PreferencePair(msgs, "long answer", "no")] * 2 + shorter + [PreferencePair(msgs, "ab", "cd")]
    kept = balance_by_length(pairs, seed=0)
    longer = sum(len(p.chosen) > len(p.rejected) for p in kept)
    shorter = sum(len(p.chosen) < len(p.rejected) for p in kept)
    assert (longer, shorter, len(kept)) == (2, 2, 5) and kept == [p for p in pairs if p in kept]  # order kept
    assert balance_by_length(pairs, seed=0) == kept and balance_by_length(pairs, seed=1) != kept  # seeded
