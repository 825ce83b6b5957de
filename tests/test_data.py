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
