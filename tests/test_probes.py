"""Bad input and faults as a new user meets them: each probe runs the command line and expects an exit
code and the words of a one-line message naming the place (file:line, config key or path), with no
traceback. `LITE_RLHF_PROBE_SOURCE=<checkout>` runs the probes against another checkout's code (the
before/after table of the closing note).

Two ways to run the command line, one set of probes: each probe calls `lite_rlhf.cli.main` in this process
(the imports of torch, transformers and peft are paid once, not once per command: 1.5-1.8 s a command on the
idle 2-core machine; output captured, an escaping exception printed as the interpreter would, environment, working
directory, signal handler and run-directory locks restored after each call), and the whole suite
(`RUN_SLOW=1`) also runs `AS_PROCESSES`, one probe of each command and kind of failure, as a process of its
own, exactly as a user's shell runs it (the console script's exit code, what the interpreter prints at exit).
`LITE_RLHF_PROBE_PROCESS=1` runs every probe as a process. Probes about processes themselves (SIGTERM, a
dropped capability) and about what a library keeps for a process's life (wandb's settings, which an earlier
wandb test in the same process would decide) start one always."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lite_rlhf.models import make_tiny_model

SOURCE = os.environ.get("LITE_RLHF_PROBE_SOURCE")
IN_PROCESS = not (SOURCE or os.environ.get("LITE_RLHF_PROBE_PROCESS"))


def cli(*args, cwd=None, process=False):
    """`lite-rlhf ARGS`, as its own process where `process` (a probe of what a library keeps for the life of a
    process: wandb's settings) or where the tier asks for processes, else in this one."""
    if IN_PROCESS and not process:
        return cli_in_process(*args, cwd=cwd)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITE_RLHF_KILL") and k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    if SOURCE:  # `python -m` puts the working directory first on the path: run from there too
        env["PYTHONPATH"], cwd = SOURCE, cwd or SOURCE
    cmd = [sys.executable, "-m", "lite_rlhf.cli", *map(str, args)]
    try:  # a probe answers in seconds; one still running after PROBE_SECONDS went on with bad input
        return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=PROBE_SECONDS)
    except subprocess.TimeoutExpired as err:
        return subprocess.CompletedProcess(cmd, "timeout", _text(err.stdout), _text(err.stderr) + "\n(still running)")


PROBE_SECONDS = 180


def cli_in_process(*args, cwd=None) -> subprocess.CompletedProcess:
    """`lite-rlhf ARGS` run by `lite_rlhf.cli.main` in this process, as `cli` runs it in a new one: the same
    environment (no kill points, no Triton interpreter, warnings off), its stdout and stderr captured, an
    exception that escapes `main` printed as the interpreter prints it (exit 1), `SystemExit` taken as the exit
    code. What a command changes in the process (environment, working directory, SIGTERM's handler, torch's
    threads, the run directories it locked: a process's end releases those) is put back."""
    from lite_rlhf import cli as lite_cli
    from lite_rlhf import runstate

    env, where, held = dict(os.environ), os.getcwd(), set(runstate._HELD)
    handler, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        for name in [k for k in os.environ if k.startswith("LITE_RLHF_KILL") or k == "TRITON_INTERPRET"]:
            del os.environ[name]
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = lite_cli.main([str(a) for a in args])
            except SystemExit as stop:  # argparse, and anything that calls sys.exit
                code = stop.code if isinstance(stop.code, int) else (print(stop.code, file=sys.stderr) or 1)
            except BaseException:  # noqa: BLE001 - what the interpreter does with an exception nobody catches
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(where)
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGTERM, handler)
        torch.set_num_threads(threads)
        for root in set(runstate._HELD) - held:
            os.close(runstate._HELD.pop(root))
    return subprocess.CompletedProcess(["lite-rlhf", *map(str, args)], code, out.getvalue(), err.getvalue())


def _text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


PAIR = {"prompt": "Describe the sea.", "chosen": "The sea is wide and blue.", "rejected": "no"}


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A workspace: a tiny model, good files, and a writer for bad ones."""
    root = tmp_path_factory.mktemp("probes")
    model = make_tiny_model(root / "tiny")
    good = jsonl(root / "pairs.jsonl", [PAIR | {"prompt": f"Describe thing {i}."} for i in range(6)])
    base = [f"model.name={model}", "model.dtype=float32", "lora.r=4", "reward.micro_batch=2", "reward.grad_accum=1"]
    loop = [*base, f"data.preferences={good}", "generation.backend=hf", "generation.n=2", "generation.max_new_tokens=4",
            "loop.iterations=1", "dpo.micro_batch=1", "dpo.grad_accum=1"]  # fmt: skip
    return {"root": root, "model": model, "pairs": good, "rm": ["train-rm", *base, f"data.preferences={good}"],
            "loop": loop, "adapter": make_adapter(model, root / "adapter")}  # fmt: skip


def make_adapter(model: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=4, target_modules=["q_proj"]))
    peft.save_pretrained(out)
    return out


def export(w, *args):
    return cli("export", f"model.name={w['model']}", "model.dtype=float32", *args)


def probe_duplicate_id(w, tmp):
    f = jsonl(tmp / "p.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}])
    v = jsonl(tmp / "v.jsonl", [{"prompt": "v"}])
    return cli("run", *w["loop"], f"data.prompts={f}", f"data.val_prompts={v}", f"data.test_prompts={v}",
               f"run.out_dir={tmp / 'r'}")  # fmt: skip


def probe_id_in_two_splits(w, tmp):
    p = jsonl(tmp / "p.jsonl", [{"id": "q1", "prompt": "x"}])
    v = jsonl(tmp / "v.jsonl", [{"id": "q1", "prompt": "y"}])
    t = jsonl(tmp / "t.jsonl", [{"prompt": "z"}])
    return cli("run", *w["loop"], f"data.prompts={p}", f"data.val_prompts={v}", f"data.test_prompts={t}",
               f"run.out_dir={tmp}/r")  # fmt: skip


def probe_invalid_utf8(w, tmp):
    f = tmp / "pairs.jsonl"
    f.write_bytes(json.dumps(PAIR).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    return cli(*w["rm"], f"data.preferences={f}", f"run.out_dir={tmp}/r")


def probe_invalid_utf8_skipped(w, tmp):
    f = tmp / "pairs.jsonl"
    lines = [json.dumps(PAIR | {"prompt": f"Describe thing {i}."}).encode() for i in range(6)]
    f.write_bytes(b"\n".join(lines) + b'\n{"prompt": "caf\xe9"}\n')
    return cli(*w["rm"], f"data.preferences={f}", "data.skip_invalid=true", f"run.out_dir={tmp}/r")


def probe_malformed_json_array(w, tmp):
    f = tmp / "pairs.json"
    f.write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": ')
    return cli(*w["rm"], f"data.preferences={f}", f"run.out_dir={tmp}/r")


def probe_csv_line_number(w, tmp):
    f = tmp / "pairs.csv"
    f.write_text('prompt,chosen,rejected\nhello,"a good answer",bad\nhello," ",bad\n')
    return cli(*w["rm"], f"data.preferences={f}", f"run.out_dir={tmp}/r")


def probe_directory_as_data_file(w, tmp):
    return cli(*w["rm"], f"data.preferences={tmp}", f"run.out_dir={tmp}/r")


def probe_chosen_equals_rejected(w, tmp):
    f = jsonl(tmp / "pairs.jsonl", [PAIR, PAIR | {"rejected": PAIR["chosen"]}])
    return cli(*w["rm"], f"data.preferences={f}", f"run.out_dir={tmp}/r")


def probe_model_config_not_json(w, tmp):
    bad = tmp / "model"
    shutil.copytree(w["model"], bad)
    (bad / "config.json").write_text("{not json")
    return cli(*w["rm"], f"model.name={bad}", f"run.out_dir={tmp}/r")


def probe_adapter_config_not_json(w, tmp):
    adapter = tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{oops")
    p = jsonl(tmp / "p.jsonl", [{"prompt": "x"}])
    return cli("generate", f"model.name={w['model']}", "generation.backend=hf", f"generation.adapter={adapter}",
               "generation.max_new_tokens=8", f"data.prompts={p}", f"generation.output={tmp}/o.jsonl")  # fmt: skip


def probe_out_dir_is_a_file(w, tmp):
    (tmp / "file").write_text("x")
    return cli(*w["rm"], f"run.out_dir={tmp / 'file'}")


def probe_out_dir_read_only(w, tmp):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITE_RLHF_KILL")} | {"PYTHONWARNINGS": "ignore"}
    if SOURCE:
        env["PYTHONPATH"] = SOURCE
    cmd = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search",
           sys.executable, "-m", "lite_rlhf.cli", *w["rm"], f"run.out_dir={ro / 'run'}"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def probe_full_disk(w, tmp):
    disk = tmp / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        return cli(*w["rm"], f"run.out_dir={disk / 'run'}")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def probe_empty_out_dir(w, tmp):
    return cli(*w["rm"], "run.out_dir=", cwd=tmp)


def probe_train_rm_refuses_another_config(w, tmp):
    first = cli(*w["rm"], f"run.out_dir={tmp}/r", "--quiet")
    assert first.returncode == 0, first.stderr[-2000:]
    return cli(*w["rm"], f"run.out_dir={tmp}/r", "reward.lr=0.5")


def probe_quiet_is_not_identity(w, tmp):
    first = cli(*w["rm"], f"run.out_dir={tmp}/r", "--quiet")
    assert first.returncode == 0, first.stderr[-2000:]
    return cli(*w["rm"], f"run.out_dir={tmp}/r")


def probe_failed_run_pins_nothing(w, tmp):
    first = cli(*w["rm"], f"run.out_dir={tmp}/r", f"model.name={tmp}/no-model")
    assert first.returncode == 2, first.stderr[-2000:]
    return cli(*w["rm"], f"run.out_dir={tmp}/r", "reward.lr=0.01", "--quiet")


def probe_empty_config_file(w, tmp):
    (tmp / "empty.yaml").write_text("# nothing here\n")
    return cli("run", tmp / "empty.yaml", "--dry-run")


def probe_flag_between_config_and_overrides(w, tmp):
    (tmp / "c.yaml").write_text(yaml.safe_dump({"dpo": {"beta": 0.1}}))
    return cli("run", tmp / "c.yaml", "--dry-run", "dpo.beta=0.2")


def probe_plan_flag_before_override(w, tmp):
    config = Path(__file__).resolve().parents[1] / "configs" / "llama3-8b_qlora_24gb.yaml"
    return cli("plan", config, "--gpu-mem", "24GB", "model.quantization=none")


def probe_dpo_kernel_triton_on_cpu(w, tmp):
    return cli("run", "dpo.kernel=triton", f"run.out_dir={tmp / 'r'}")


def probe_label_smoothing_half(w, tmp):
    return cli("run", "--dry-run", "dpo.label_smoothing=0.5")


def probe_key_given_twice(w, tmp):
    (tmp / "c.yaml").write_text("dpo:\n  lr: 1.0e-4\n  beta: 0.1\n  lr: 2.0e-4\n")
    return cli("run", tmp / "c.yaml", "--dry-run")


def probe_false_looking_section(w, tmp):
    (tmp / "c.yaml").write_text("dpo: 0\n")
    return cli("run", tmp / "c.yaml", "--dry-run")


def probe_lr_nan(w, tmp):
    return cli("run", "--dry-run", "dpo.lr=nan")


def probe_epochs_inf(w, tmp):
    return cli("run", "--dry-run", "dpo.epochs=inf")


def probe_temperature_nan(w, tmp):
    return cli("run", "--dry-run", "generation.temperature=nan")


def probe_lr_1e38(w, tmp):
    return cli("run", "--dry-run", "reward.lr=1e38")


def probe_sigterm_says_how_to_resume(w, tmp):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITE_RLHF_KILL")} | {"PYTHONWARNINGS": "ignore"}
    if SOURCE:
        env["PYTHONPATH"] = SOURCE
    cmd = [sys.executable, "-m", "lite_rlhf.cli", "run", *w["loop"], f"run.out_dir={tmp / 'r'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=SOURCE)
    deadline = time.time() + PROBE_SECONDS
    while proc.poll() is None and time.time() < deadline and not (tmp / "r" / "state.json").exists():
        time.sleep(0.05)  # the run has opened its directory: past the imports, into the work
    proc.terminate()
    out, err = proc.communicate(timeout=PROBE_SECONDS)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def probe_fewer_prompts_than_iterations(w, tmp):
    p = jsonl(tmp / "p.jsonl", [{"prompt": "Describe the sea."}])
    v = jsonl(tmp / "v.jsonl", [{"prompt": "Describe a cat."}])
    return cli("run", *w["loop"], "loop.iterations=3", f"data.prompts={p}", f"data.val_prompts={v}",
               f"data.test_prompts={v}", f"run.out_dir={tmp / 'r'}")  # fmt: skip


def probe_reward_model_below_chance(w, tmp):
    short = [{"prompt": f"Describe thing {i}.", "chosen": "no", "rejected": "It is a fine thing."} for i in range(8)]
    held = [{"prompt": f"Describe item {i}.", "chosen": "It is a fine item.", "rejected": "no"} for i in range(4)]
    train, held_out = jsonl(tmp / "train.jsonl", short), jsonl(tmp / "held.jsonl", held)
    p = jsonl(tmp / "p.jsonl", [{"prompt": "Describe the sea."}])
    return cli("run", *w["loop"], f"data.preferences={train}", f"data.eval_preferences={held_out}", "reward.lr=1e-2",
               "reward.epochs=3", f"data.prompts={p}", f"data.val_prompts={p}", f"data.test_prompts={p}",
               f"run.out_dir={tmp / 'r'}")  # fmt: skip


def probe_diverged_iteration_is_never_best(w, tmp):
    p = jsonl(tmp / "p.jsonl", [{"prompt": f"Describe thing {i}."} for i in range(3)])
    run = tmp / "r"
    out = cli("run", *w["loop"], "eval.max_kl_per_token=1e-9", "pairs.allow_truncated=true", "dpo.lr=1e-2",
              f"data.prompts={p}", f"data.val_prompts={p}", f"data.test_prompts={p}", f"run.out_dir={run}")  # fmt: skip
    if out.returncode == 0:
        assert os.readlink(run / "best") == "iter_000/policy"
        assert "above eval.max_kl_per_token" in json.loads((run / "iter_001" / "eval.json").read_text())["diverged"]
    return out


def probe_pair_answers_other_user_turns(w, tmp):
    ask = [{"role": "user", "content": "Describe the sea."}]
    other = [{"role": "user", "content": "Describe a cat."}, {"role": "assistant", "content": "no"}]
    row = {"prompt": ask, "chosen": [*ask, {"role": "assistant", "content": "It is wide."}], "rejected": other}
    f = jsonl(tmp / "pairs.jsonl", [PAIR, row])
    return cli(*w["rm"], f"data.preferences={f}", f"run.out_dir={tmp}/r")


def probe_pair_with_two_assistant_turns(w, tmp):
    two = [{"role": "assistant", "content": "It is wide."}, {"role": "assistant", "content": "And blue."}]
    f = jsonl(tmp / "pairs.jsonl", [PAIR, PAIR | {"chosen": two}])
    return cli(*w["rm"], f"data.preferences={f}", f"run.out_dir={tmp}/r")


def probe_prompt_ends_with_the_assistant(w, tmp):
    turns = [{"role": "user", "content": "Describe the sea."}, {"role": "assistant", "content": "It is wide."}]
    p = jsonl(tmp / "p.jsonl", [{"prompt": "Describe a cat."}, {"prompt": turns}])
    return cli("run", *w["loop"], f"data.prompts={p}", f"run.out_dir={tmp / 'r'}")


def probe_preference_kind_given_a_reward_directory(w, tmp):
    first = cli(*w["rm"], f"run.out_dir={tmp / 'rm'}", "--quiet")
    assert first.returncode == 0, first.stderr[-2000:]
    return cli("run", *w["loop"], "reward.kind=preference", f"reward.adapter={tmp / 'rm' / 'reward'}",
               f"run.out_dir={tmp / 'r'}")  # fmt: skip


def probe_state_json_corrupt(w, tmp):
    first = cli(*w["rm"], f"run.out_dir={tmp / 'r'}", "--quiet")
    assert first.returncode == 0, first.stderr[-2000:]
    (tmp / "r" / "state.json").write_text('{"done": ["rew')
    return cli(*w["rm"], f"run.out_dir={tmp / 'r'}")


def probe_state_json_empty(w, tmp):
    first = cli(*w["rm"], f"run.out_dir={tmp / 'r'}", "--quiet")
    assert first.returncode == 0, first.stderr[-2000:]
    (tmp / "r" / "state.json").write_text("")
    return cli(*w["rm"], f"run.out_dir={tmp / 'r'}")


def probe_wandb_without_credentials(w, tmp):
    if importlib.util.find_spec("wandb") is None or os.environ.get("WANDB_API_KEY"):
        pytest.skip("wandb is not installed, or this machine has its credentials")
    return cli("run", *w["loop"], "run.logger=wandb", f"run.out_dir={tmp / 'r'}", cwd=tmp, process=True)


def probe_wandb_out_of_reach(w, tmp):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed")
    os.environ["WANDB_API_KEY"], key = "0" * 40, os.environ.get("WANDB_API_KEY")  # a key, and no server to take it
    os.environ["WANDB_BASE_URL"], url = "http://127.0.0.1:9", os.environ.get("WANDB_BASE_URL")  # nothing listens
    try:
        return cli("run", *w["loop"], "run.logger=wandb", f"run.out_dir={tmp / 'r'}", cwd=tmp, process=True)
    finally:
        for name, old in (("WANDB_API_KEY", key), ("WANDB_BASE_URL", url)):
            os.environ.pop(name) if old is None else os.environ.__setitem__(name, old)


def edited_model(w, tmp, edit) -> Path:
    model = tmp / "model"
    shutil.copytree(w["model"], model)
    edit(model)
    return model


def probe_model_needs_remote_code(w, tmp):
    def edit(m):
        cfg = json.loads((m / "config.json").read_text())
        (m / "config.json").write_text(json.dumps(cfg | {"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}))

    return cli("run", *w["loop"], f"model.name={edited_model(w, tmp, edit)}", f"run.out_dir={tmp / 'r'}")


def probe_model_of_unknown_architecture(w, tmp):
    def edit(m):
        cfg = json.loads((m / "config.json").read_text())
        (m / "config.json").write_text(json.dumps(cfg | {"model_type": "brand_new_arch"}))

    return cli("run", *w["loop"], f"model.name={edited_model(w, tmp, edit)}", f"run.out_dir={tmp / 'r'}")


def probe_tokenizer_without_chat_template(w, tmp):
    def edit(m):
        (m / "chat_template.jinja").unlink(missing_ok=True)
        cfg = json.loads((m / "tokenizer_config.json").read_text())
        (m / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "chat_template"}))

    return cli("run", *w["loop"], f"model.name={edited_model(w, tmp, edit)}", f"run.out_dir={tmp / 'r'}")


def probe_max_new_tokens_beyond_context(w, tmp):
    out = cli("run", *w["loop"], "generation.max_new_tokens=100000", f"run.out_dir={tmp / 'r'}")
    assert not (tmp / "r" / "reward").exists() and not (tmp / "r" / "config.yaml").exists()  # nothing trained or pinned
    return out


def probe_generation_output_is_a_directory(w, tmp):
    p = jsonl(tmp / "p.jsonl", [{"prompt": "x"}])
    return cli("generate", f"model.name={w['model']}", "generation.backend=hf", "generation.max_new_tokens=8",
               f"data.prompts={p}", f"generation.output={tmp}")  # fmt: skip


# ---------------------------------------------------------------- nothing the user owns is deleted or cut


def probe_export_into_a_users_folder(w, tmp):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "thesis.tex").write_text("years of work")
    out = export(w, "--adapter", w["adapter"], "--out", tmp / "mine")
    assert (tmp / "mine" / "thesis.tex").read_text() == "years of work"
    return out


def probe_export_onto_its_run_directory(w, tmp):
    run = tmp / "run"
    first = cli(*w["rm"], f"run.out_dir={run}", "--quiet")
    assert first.returncode == 0, first.stderr[-2000:]
    before = sorted(p.name for p in run.iterdir())
    out = export(w, "--adapter", w["adapter"], "--out", run)
    assert sorted(p.name for p in run.iterdir()) == before and (run / "reward" / "head.safetensors").is_file()
    return out


def probe_export_twice_replaces_its_own_export(w, tmp):
    first = export(w, "--adapter", w["adapter"], "--out", tmp / "merged")
    assert first.returncode == 0, first.stderr[-2000:]
    return export(w, "--adapter", w["adapter"], "--out", tmp / "merged")


def probe_export_an_empty_adapter_file(w, tmp):
    shutil.copytree(w["adapter"], tmp / "adapter")
    (tmp / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    return export(w, "--adapter", tmp / "adapter", "--out", tmp / "merged")


def probe_out_dir_holds_the_users_files(w, tmp):
    (tmp / "mine" / "reward").mkdir(parents=True)
    (tmp / "mine" / "metrics.jsonl").write_text("my numbers\n")
    (tmp / "mine" / "reward" / "notes.txt").write_text("keep")
    out = cli(*w["rm"], f"run.out_dir={tmp / 'mine'}")
    assert (tmp / "mine" / "metrics.jsonl").read_text() == "my numbers\n"
    assert (tmp / "mine" / "reward" / "notes.txt").read_text() == "keep"
    return out


# ---------------------------------------------------------------- round two: an output that is an input, a file
# the user put in a committed directory or an earlier export, and the last tracebacks


def generate_cmd(w, *args):
    return cli("generate", f"model.name={w['model']}", "generation.backend=hf", "generation.max_new_tokens=4", *args)


def probe_generate_output_is_its_prompts(w, tmp):
    p = jsonl(tmp / "p.jsonl", [{"prompt": "Describe the sea."}])
    before = p.read_bytes()
    out = generate_cmd(w, f"data.prompts={p}", f"generation.output={tmp}/./p.jsonl")
    assert p.read_bytes() == before
    return out


def probe_generate_output_is_its_config(w, tmp):
    p = jsonl(tmp / "p.jsonl", [{"prompt": "Describe the sea."}])
    config = tmp / "c.yaml"
    config.write_text(yaml.safe_dump({"generation": {"output": str(config), "backend": "hf", "max_new_tokens": 4}}))
    before = config.read_bytes()
    out = cli("generate", config, f"model.name={w['model']}", f"data.prompts={p}")
    assert config.read_bytes() == before
    return out


def probe_generate_output_is_an_adapter_file(w, tmp):
    shutil.copytree(w["adapter"], tmp / "adapter")
    target = tmp / "adapter" / "adapter_config.json"
    before = target.read_bytes()
    p = jsonl(tmp / "p.jsonl", [{"prompt": "Describe the sea."}])
    out = generate_cmd(w, f"data.prompts={p}", f"generation.adapter={tmp / 'adapter'}", f"generation.output={target}")
    assert target.read_bytes() == before
    return out


def probe_export_again_keeps_a_file_added_since(w, tmp):
    first = export(w, "--adapter", w["adapter"], "--out", tmp / "merged")
    assert first.returncode == 0, first.stderr[-2000:]
    (tmp / "merged" / "NOTES.md").write_bytes(b"what I changed\n")
    out = export(w, "--adapter", w["adapter"], "--out", tmp / "merged")
    assert (tmp / "merged" / "NOTES.md").read_bytes() == b"what I changed\n"
    return out


def probe_rerun_stage_keeps_a_users_file(w, tmp):
    first = cli(*w["rm"], f"run.out_dir={tmp / 'r'}", "--quiet")
    assert first.returncode == 0, first.stderr[-2000:]
    (tmp / "r" / "reward" / "NOTES.md").write_bytes(b"my notes\n")
    with (tmp / "r" / "reward" / "metrics.json").open("a") as fh:  # a committed file changed: the stage runs again
        fh.write(" ")
    out = cli(*w["rm"], f"run.out_dir={tmp / 'r'}")
    assert (tmp / "r" / "reward" / "NOTES.md").read_bytes() == b"my notes\n"
    return out


def probe_n_above_the_engines_limit(w, tmp):
    return cli("run", "--dry-run", "generation.n=16385")


def probe_kv_cache_too_small(w, tmp):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    out = cli("run", *w["loop"], "generation.backend=vllm", "generation.kv_cache_gib=1e-6", f"run.out_dir={tmp / 'r'}")
    assert not (tmp / "r" / "reward").exists()  # said before the reward model trains
    return out


def probe_kv_cache_is_not_identity(w, tmp):
    first = cli(*w["rm"], f"run.out_dir={tmp}/r", "generation.kv_cache_gib=0.5", "--quiet")
    assert first.returncode == 0, first.stderr[-2000:]
    return cli(*w["rm"], f"run.out_dir={tmp}/r", "generation.kv_cache_gib=2")


def probe_sft_adapter_damaged(w, tmp):
    shutil.copytree(w["adapter"], tmp / "sft")
    weights = tmp / "sft" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return cli("run", *w["loop"], f"model.sft_adapter={tmp / 'sft'}", f"run.out_dir={tmp / 'r'}")


def probe_reward_head_damaged(w, tmp):
    first = cli(*w["rm"], f"run.out_dir={tmp / 'rm'}", "--quiet")
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.copytree(tmp / "rm" / "reward", tmp / "reward")
    head = tmp / "reward" / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-10])
    return cli("run", *w["loop"], f"reward.adapter={tmp / 'reward'}", f"run.out_dir={tmp / 'r'}")


def probe_plan_gpu_mem_zero(w, tmp):
    return cli("plan", "--gpu-mem", "0GB")


def probe_plan_gpu_mem_negative(w, tmp):
    return cli("plan", "--gpu-mem", "-5GB")


def probe_tokenizer_config_not_json(w, tmp):
    model = edited_model(w, tmp, lambda m: (m / "tokenizer_config.json").write_text("{broken"))
    return cli(*w["rm"], f"model.name={model}", f"run.out_dir={tmp / 'r'}")


REWARD_FUNCTIONS = """
import time

def nothing(prompts, completions, **kwargs):
    return [None] * len(completions)

def blocks(prompts, completions, **kwargs):
    time.sleep(3600)
"""


def probe_reward_function_scores_nothing(w, tmp):
    (tmp / "fns.py").write_text(REWARD_FUNCTIONS)
    return cli("run", *w["loop"], "reward.kind=functions", f"reward.functions=[{tmp / 'fns.py'}:nothing]",
               f"run.out_dir={tmp / 'r'}")  # fmt: skip


def probe_reward_function_blocks(w, tmp):
    (tmp / "fns.py").write_text(REWARD_FUNCTIONS)
    p = jsonl(tmp / "p.jsonl", [{"id": "sea", "prompt": "Describe the sea."}])
    v = jsonl(tmp / "v.jsonl", [{"id": "cat", "prompt": "Describe a cat."}])  # π0's evaluation scores it first
    t = jsonl(tmp / "t.jsonl", [{"id": "dog", "prompt": "Describe a dog."}])

    def run(limit):
        return cli("run", *w["loop"], "reward.kind=functions", f"reward.functions=[{tmp / 'fns.py'}:blocks]",
                   f"reward.function_timeout={limit}", f"data.prompts={p}", f"data.val_prompts={v}",
                   f"data.test_prompts={t}", f"run.out_dir={tmp / 'r'}")  # fmt: skip

    first = run(2)
    assert first.returncode == 2 and "reward.function_timeout=2 s" in first.stderr, first.stderr[-2000:]
    assert (tmp / "r" / "iter_000" / "policy" / "adapter_model.safetensors").is_file()  # committed, and kept
    out = run(3)  # the limit is no part of the run's identity: the same run, resumed with a longer one
    assert "stage 'iter_000/policy'" not in out.stderr  # nothing committed was lost or redone
    return out


def probe_files_keep_the_umask(w, tmp):
    old = os.umask(0o027)
    try:
        out = cli(*w["rm"], f"run.out_dir={tmp / 'r'}", "--quiet")
    finally:
        os.umask(old)
    modes = {str(f.relative_to(tmp)): oct(f.stat().st_mode & 0o777) for f in (tmp / "r").rglob("*") if f.is_file()}
    assert set(modes.values()) == {oct(0o640)}, modes
    return out


def probe_export_before_best_exists(w, tmp):
    first = cli(*w["rm"], f"run.out_dir={tmp / 'r'}", "--quiet")
    assert first.returncode == 0, first.stderr[-2000:]
    return export(w, f"run.out_dir={tmp / 'r'}")


def probe_range_open_at_infinity(w, tmp):
    return cli("run", "--dry-run", "dpo.beta=0")


def probe_hub_name_offline_not_cached(w, tmp):
    os.environ["HF_HUB_OFFLINE"], old = "1", os.environ.get("HF_HUB_OFFLINE")
    try:
        return cli("generate", "data.prompts=nobody-here/no-such-set", f"generation.output={tmp}/o.jsonl")
    finally:
        os.environ.pop("HF_HUB_OFFLINE") if old is None else os.environ.__setitem__("HF_HUB_OFFLINE", old)


def probe_hub_layout_with_another_prompt_column(w, tmp):
    jsonl((tmp / "set").mkdir() or tmp / "set" / "train.jsonl", [{"question": "Describe the sea."}])
    return generate_cmd(w, f"data.prompts={tmp / 'set'}", f"generation.output={tmp}/o.jsonl")


def probe_model_weights_damaged(w, tmp):
    def edit(m):
        weights = m / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])

    return cli(*w["rm"], f"model.name={edited_model(w, tmp, edit)}", f"run.out_dir={tmp / 'r'}")


def probe_greedy_with_several_answers(w, tmp):
    return cli("run", "--dry-run", "generation.temperature=0", "generation.n=4")


def probe_run_help_names_every_algorithm(w, tmp):
    out = cli("run", "--help")
    assert "DPO (or RAFT)" not in out.stdout
    return out


# (probe, expected exit code, words expected in the output, must the message be one line)
PROBES = [
    (probe_duplicate_id, 2, ["p.jsonl:3", "prompt id 'a' is already used on line 1"], True),
    (probe_id_in_two_splits, 2, ["prompt id 'q1' is used in data.prompts", "data.val_prompts"], True),
    (probe_invalid_utf8, 2, ["pairs.jsonl:2", "not valid UTF-8"], True),
    (probe_invalid_utf8_skipped, 0, ["1 lines skipped"], False),
    (probe_malformed_json_array, 2, ["pairs.json", "cannot be read as json"], True),
    (probe_csv_line_number, 2, ["pairs.csv:3:", "'chosen' is empty"], True),
    (probe_directory_as_data_file, 2, ["holds no data file"], True),
    (probe_chosen_equals_rejected, 2, ["pairs.jsonl:2", "the same answer"], True),
    (probe_model_config_not_json, 2, ["config.json is not valid JSON"], True),
    (probe_adapter_config_not_json, 2, ["adapter_config.json is not valid JSON"], True),
    (probe_out_dir_is_a_file, 2, ["is a file"], True),
    (probe_out_dir_read_only, 2, ["not writable"], True),
    (probe_full_disk, 2, ["cannot write", "No space left on device", "runs again"], True),
    (probe_empty_out_dir, 2, ["'run.out_dir' is empty"], True),
    (probe_train_rm_refuses_another_config, 2, ["different config", "reward.lr"], True),
    (probe_quiet_is_not_identity, 0, ["held-out accuracy"], False),
    (probe_failed_run_pins_nothing, 0, [], False),
    (probe_empty_config_file, 2, ["empty.yaml' is empty"], True),
    (probe_flag_between_config_and_overrides, 0, ["beta: 0.2"], False),
    (probe_plan_flag_before_override, 1, ["does NOT fit"], False),  # plan's exit code 1: does not fit
    (probe_dpo_kernel_triton_on_cpu, 2, ["'dpo.kernel': triton runs on CUDA or under TRITON_INTERPRET=1"], True),
    (probe_label_smoothing_half, 2, ["'dpo.label_smoothing' must be in [0, 0.5)"], True),
    (probe_key_given_twice, 2, ["c.yaml:4' is not valid YAML: key 'lr' is given twice"], True),
    (probe_false_looking_section, 2, ["section 'dpo' in", "must be a mapping, got 0"], True),
    (probe_lr_nan, 2, ["'dpo.lr' must be a finite number, got nan"], True),
    (probe_epochs_inf, 2, ["'dpo.epochs' must be a finite number, got inf"], True),
    (probe_temperature_nan, 2, ["'generation.temperature' must be a finite number, got nan"], True),
    (probe_lr_1e38, 2, ["'reward.lr' must be in (0, 1], got 1e+38"], True),
    (probe_sigterm_says_how_to_resume, 143, ["terminated (SIGTERM); run the same command again to resume"], True),
    (probe_fewer_prompts_than_iterations, 2, ["holds 1 prompt(s): too few for loop.iterations=3"], True),
    (probe_reward_model_below_chance, 2, ["held-out accuracy 0.000 is at or below chance", "reward.allow_weak"], True),
    (probe_diverged_iteration_is_never_best, 0, ["iteration(s) 1 diverged, never chosen"], False),
    (probe_pair_answers_other_user_turns, 2, ["pairs.jsonl:2", "'rejected' answers another conversation"], True),
    (probe_pair_with_two_assistant_turns, 2, ["pairs.jsonl:2", "'chosen' answers another conversation"], True),
    (probe_prompt_ends_with_the_assistant, 2, ["p.jsonl:2", "the last turn of 'prompt' is the assistant's"], True),
    (probe_preference_kind_given_a_reward_directory, 2, ["is a Bradley-Terry reward directory", "kind=bt"], True),
    (probe_state_json_corrupt, 2, ["state.json' is damaged", "nothing was changed"], True),
    (probe_state_json_empty, 2, ["state.json' is damaged", "nothing was changed"], True),
    (probe_wandb_without_credentials, 2, ["wandb has no credentials", "WANDB_MODE=offline"], True),
    (probe_wandb_out_of_reach, 2, ["wandb did not start", "WANDB_MODE=offline"], True),
    (probe_model_needs_remote_code, 2, ["needs its own code (config.json auto_map)"], True),
    (probe_model_of_unknown_architecture, 2, ["architecture 'brand_new_arch'"], True),
    (probe_tokenizer_without_chat_template, 2, ["has no chat template"], True),
    (probe_max_new_tokens_beyond_context, 2, ["generation.max_new_tokens=100000 leaves 0 for the prompt"], True),
    (probe_generation_output_is_a_directory, 2, ["generation.output", "is a directory"], True),
    (probe_export_into_a_users_folder, 2, ["mine' holds files that lite-rlhf export did not write"], True),
    (probe_export_onto_its_run_directory, 2, ["holds files that lite-rlhf export did not write"], True),
    (probe_export_twice_replaces_its_own_export, 0, ["merged"], False),
    (probe_export_an_empty_adapter_file, 2, ["adapter_model.safetensors' is damaged (0 bytes"], True),
    (probe_out_dir_holds_the_users_files, 2, ["holds files that are not a lite-rlhf run", "nothing was changed"], True),
    (probe_generate_output_is_its_prompts, 2, ["generation.output", "is data.prompts", "nothing was written"], True),
    (probe_generate_output_is_its_config, 2, ["generation.output", "is the config file"], True),
    (probe_generate_output_is_an_adapter_file, 2, ["generation.output", "generation.adapter"], True),
    (probe_export_again_keeps_a_file_added_since, 2, ["NOTES.md", "lite-rlhf export did not write"], True),
    (probe_rerun_stage_keeps_a_users_file, 2, ["stage 'reward' runs again", "NOTES.md' was not written"], False),
    (probe_n_above_the_engines_limit, 2, ["'generation.n' must be in [1, 16384], got 16385"], True),
    (probe_kv_cache_too_small, 2, ["generation.kv_cache_gib", "needs at least"], True),
    (probe_kv_cache_is_not_identity, 0, ["held-out accuracy"], False),
    (probe_sft_adapter_damaged, 2, ["adapter_model.safetensors' is damaged"], True),
    (probe_reward_head_damaged, 2, ["head.safetensors' is damaged"], True),
    (probe_plan_gpu_mem_zero, 2, ["--gpu-mem '0GB' must be a positive size"], True),
    (probe_plan_gpu_mem_negative, 2, ["--gpu-mem '-5GB' must be a positive size"], True),
    (probe_tokenizer_config_not_json, 2, ["tokenizer_config.json is not valid JSON"], True),
    (probe_files_keep_the_umask, 0, [], False),
    (probe_export_before_best_exists, 2, ["best", "--adapter"], True),
    (probe_range_open_at_infinity, 2, ["'dpo.beta' must be in (0, inf), got 0"], True),
    (probe_hub_name_offline_not_cached, 2, ["nobody-here/no-such-set", "HF_HUB_OFFLINE"], True),
    (probe_hub_layout_with_another_prompt_column, 2, ["'prompt'", "data.prompt_field"], True),
    (probe_run_help_names_every_algorithm, 0, ["grpo"], False),
    (probe_model_weights_damaged, 2, ["model.safetensors' is damaged"], True),
    (probe_greedy_with_several_answers, 2, ["'generation.temperature': 0 is greedy", "generation.n=1"], True),
]


@pytest.mark.parametrize("probe, code, words, one_line", PROBES, ids=[p[0].__name__[6:] for p in PROBES])
def test_probe(w, tmp_path, probe, code, words, one_line):
    out = probe(w, tmp_path)
    text = out.stdout + out.stderr
    print(f"PROBE {probe.__name__[6:]} | exit {out.returncode} | traceback {'Traceback' in text} | "
          f"{(out.stderr.strip().splitlines() or [''])[-1][:160]}")  # fmt: skip
    assert out.returncode == code, f"exit {out.returncode}, want {code}: {text[-2000:]}"
    assert "Traceback" not in text, text[-2000:]
    for word in words:
        assert word in text, f"{word!r} not in: {text[-1500:]}"
    if one_line:  # the message is the last line, and the only one of ours (libraries may log above it)
        ours = [x for x in out.stderr.strip().splitlines() if x.startswith("lite-rlhf:")]
        assert len(ours) == 1 and out.stderr.strip().splitlines()[-1] == ours[0], out.stderr


# Probes that run the loop itself (past the model's loading, into its stages): the slow tier.
SLOW_PROBES = [
    (probe_reward_function_scores_nothing, 2, ["no iteration trained", "returned None"], False),
    (probe_reward_function_blocks, 2, ["'blocks'", "reward.function_timeout=3 s on", "prompts 'cat', 'dog'"], True),
]


@pytest.mark.slow
@pytest.mark.parametrize("probe, code, words, one_line", SLOW_PROBES, ids=[p[0].__name__[6:] for p in SLOW_PROBES])
def test_slow_probe(w, tmp_path, monkeypatch, probe, code, words, one_line):
    monkeypatch.setattr(sys.modules[__name__], "IN_PROCESS", False)  # a blocked call's thread ends with its process
    test_probe(w, tmp_path, probe, code, words, one_line)


# One probe of each command and kind of failure, run again as a process of its own in the whole suite: a config
# error, bad data of `run` and of `train-rm`, a damaged adapter for `generate`, `export` refusing a user's folder,
# `plan`'s flag read from the real argv, and a stop after a model trained.
AS_PROCESSES = ("key_given_twice", "duplicate_id", "invalid_utf8", "adapter_config_not_json",
                "export_into_a_users_folder", "plan_gpu_mem_negative", "reward_model_below_chance")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("probe, code, words, one_line", [p for p in PROBES if p[0].__name__[6:] in AS_PROCESSES],
                         ids=[p[0].__name__[6:] for p in PROBES if p[0].__name__[6:] in AS_PROCESSES])  # fmt: skip
def test_probe_as_its_own_process(w, tmp_path, monkeypatch, probe, code, words, one_line):
    monkeypatch.setattr(sys.modules[__name__], "IN_PROCESS", False)
    test_probe(w, tmp_path, probe, code, words, one_line)
