"""benchmarks/_model.py: the --model / --dtype options the comparison benchmarks share. Another model or dtype must
write files of its own (the committed 135M tables are never overwritten), and every variant gets the same model."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _model  # noqa: E402


def parse(*argv):
    parser = argparse.ArgumentParser()
    _model.add_model_args(parser)
    return parser.parse_args(list(argv))


def test_the_default_is_the_embedded_model_in_float32_and_keeps_the_file_names():
    spec = _model.model_spec(parse())
    assert spec == {"model": "smollm2-135m-instruct", "dtype": "float32"}
    assert _model.results_stem("bench_dpo_step", spec) == "bench_dpo_step"
    assert _model.config_overrides(spec) == ["model.name=smollm2-135m-instruct", "model.dtype=float32",
                                             "generation.dtype=float32"]  # fmt: skip


@pytest.mark.parametrize(
    ("model", "dtype", "stem"),
    [
        ("scale/qwen2.5-1.5b", "bfloat16", "bench_pipeline_qwen2.5-1.5b_bfloat16"),
        ("scale/qwen2.5-1.5b", "float32", "bench_pipeline_qwen2.5-1.5b"),
        ("smollm2-135m-instruct", "bfloat16", "bench_pipeline_bfloat16"),
    ],
)
def test_another_model_or_dtype_gets_files_of_its_own(model, dtype, stem):
    assert _model.results_stem("bench_pipeline", {"model": model, "dtype": dtype}) == stem


def test_a_model_directory_is_made_absolute_and_checked(tmp_path, monkeypatch):
    from lite_rlhf.models import make_tiny_model

    make_tiny_model(tmp_path / "m", family="qwen2")
    monkeypatch.chdir(tmp_path)
    spec = _model.model_spec(parse("--model", "m", "--dtype", "bfloat16"))
    assert spec == {"model": str(tmp_path / "m"), "dtype": "bfloat16"}
    assert f"model.name={tmp_path / 'm'}" in _model.config_overrides(spec)
    assert "generation.dtype=bfloat16" in _model.config_overrides(spec)
    assert _model.describe_model(spec).startswith("m (0.0")  # parameters from its config.json
    with pytest.raises(Exception, match="is not a model directory"):  # said before any worker starts
        _model.model_spec(parse("--model", str(tmp_path / "absent")))
