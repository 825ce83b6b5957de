"""Data files: formats, line-numbered errors, skipping, and the truncation rule."""

import json

import pytest

from lite_rlhf.data import DataError, encode, load_preferences, load_prompts


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_strings_and_chat_messages(tmp_path):
    f = write(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
                    "rejected": [{"role": "assistant", "content": "b"}]}),
    ])  # fmt: skip
    pairs, skipped = load_preferences(f)
    assert skipped == 0 and pairs[0] == pairs[1]
    assert pairs[0].prompt == [{"role": "user", "content": "hi"}] and pairs[0].chosen == "a"


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"prompt": "hi", "chosen": "a"}), "missing field 'rejected'"),
        (json.dumps({"prompt": "hi", "chosen": "  ", "rejected": "b"}), "'chosen' is empty"),
        (json.dumps({"prompt": 3, "chosen": "a", "rejected": "b"}), "'prompt' must be a non-empty string"),
        (json.dumps([1, 2]), "expected a JSON object"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"})
    f = write(tmp_path / "pairs.jsonl", [good, "", good, line, good])
    with pytest.raises(DataError) as info:
        load_preferences(f)
    assert f"pairs.jsonl:4: {message}" in str(info.value), str(info.value)
    pairs, skipped = load_preferences(f, skip_invalid=True)
    assert (len(pairs), skipped) == (3, 1)


def test_other_formats_through_datasets(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("prompt,chosen,rejected\nhi,a,b\nyo,c,d\n")
    pairs, _ = load_preferences(f)
    assert [p.chosen for p in pairs] == ["a", "c"]


def test_prompts_keep_extra_fields(tmp_path):
    f = write(tmp_path / "q.jsonl", [json.dumps({"id": "x1", "prompt": "Describe a cat.", "topic": "a cat"})])
    prompts, _ = load_prompts(f)
    assert prompts[0].id == "x1" and prompts[0].meta == {"topic": "a cat"} and prompts[0].text == "Describe a cat."
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")


def test_truncation_keeps_prompt_end_and_response_start():
    prompt, response = list(range(10)), list(range(100, 120))
    assert encode(prompt, response, 64) == (prompt + response, 10)
    ids, n_prompt = encode(prompt, response, 16)
    assert len(ids) == 16 and ids[:n_prompt] == prompt[-n_prompt:] and ids[n_prompt:] == response[: 16 - n_prompt]
    assert n_prompt == 8  # the response keeps half the budget or all that the prompt leaves
    assert encode(prompt, response, 16, "drop") is None


def hub_layout(root, splits: dict[str, list[dict]]):
    """A directory laid out as a hub dataset repository: one parquet file per split under data/."""
    import datasets

    (root / "data").mkdir(parents=True)
    for split, rows in splits.items():
        datasets.Dataset.from_list(rows).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_a_hub_layout_directory_with_its_own_column_names(tmp_path):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    d = hub_layout(tmp_path / "set", {
        "train": [{"qid": "a", "context_messages": conv, "answer": "red"},
                  {"qid": "b", "context_messages": [{"role": "user", "content": "2+2?"}], "answer": "4"}],
        "test": [{"qid": "c", "context_messages": [{"role": "user", "content": "Name a fruit."}], "answer": "fig"},
                 {"qid": "d", "context_messages": [], "answer": "?"}],
    })  # fmt: skip
    fields = {"id": "qid", "prompt": "context_messages"}
    prompts, _ = load_prompts(d, fields=fields)
    assert [p.id for p in prompts] == ["a", "b"] and prompts[0].messages == conv
    assert prompts[0].meta == {"answer": "red"}  # every other column travels with the prompt
    with pytest.raises(DataError) as info:  # the split, then a bad row named by its number
        load_prompts(f"{d}:test", fields=fields)
    assert str(info.value).startswith(f"{d}:test row 2: 'prompt' must be a non-empty string"), str(info.value)
    prompts, skipped = load_prompts(f"{d}:test", skip_invalid=True, fields=fields)
    assert [p.id for p in prompts] == ["c"] and skipped == 1
    with pytest.raises(DataError, match=r"missing field 'question' \(data.prompt_field\)"):
        load_prompts(d, fields={"prompt": "question"})
    with pytest.raises(DataError, match=r":valid.*cannot be loaded as a dataset: .*split"):
        load_prompts(f"{d}:valid")
    with pytest.raises(DataError, match="expected NAME, NAME:SPLIT or NAME:CONFIG:SPLIT"):
        load_prompts(f"{d}:a:b:c")


def test_one_mapping_serves_sources_named_either_way(tmp_path):
    theirs = write(tmp_path / "theirs.jsonl", [json.dumps({"instruction": "hi", "good": "a", "bad": "b"})])
    ours = write(tmp_path / "ours.jsonl", [json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"})])
    fields = {"prompt": "instruction", "chosen": "good", "rejected": "bad"}
    assert load_preferences(theirs, fields=fields)[0] == load_preferences(ours, fields=fields)[0]
    with pytest.raises(DataError, match=r"theirs.jsonl:1: missing field 'prompt'"):
        load_preferences(theirs)


def test_a_hub_name_out_of_reach_is_one_line_at_once(monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        load_prompts("RLHFlow/prompt-collection-v0.1:train")
    message = str(info.value)
    assert time.monotonic() - start < 10 and "\n" not in message
    assert "'RLHFlow/prompt-collection-v0.1:train' is neither a local file or directory nor reachable" in message
    assert "hf download RLHFlow/prompt-collection-v0.1 --repo-type dataset --local-dir DIR" in message
    with pytest.raises(DataError, match="'missing/prompts.jsonl' does not exist"):  # a file name is never a hub name
        load_prompts("missing/prompts.jsonl")
