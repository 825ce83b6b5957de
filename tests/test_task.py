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
