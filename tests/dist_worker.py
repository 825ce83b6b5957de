"""What tests/test_dist.py launches on each rank (under torchrun) or in one process.

    dist_worker.py loop SPY_DIR ARGS...        `lite-rlhf ARGS...`, recording on each rank which prompts its
                                               engine sampled and which pairs its DPO micro-batches held
    dist_worker.py dpo-step OUT MODEL MB ACC   two DPO optimizer steps on five fixed pairs (micro_batch MB,
                                               grad_accum ACC); the adapter to OUT/, this rank's pair ids
                                               to OUT/rank<r>.json
    dist_worker.py ppo-step OUT MODEL MB ACC   PPO's update (policy and value) on five fixed answers
    dist_worker.py grpo-step OUT MODEL MB ACC  two GRPO optimizer steps (token aggregation) on five fixed
                                               answers; the adapter to OUT/, the step records to OUT/rank<r>.json

The spies wrap the real functions and change nothing they return."""

import json
import os
import sys
from pathlib import Path


def record(spy_dir: Path, what: str, ids: list[str]) -> None:
    with (spy_dir / f"rank{os.environ.get('RANK', '0')}.jsonl").open("a") as fh:
        fh.write(json.dumps({"what": what, "ids": ids}) + "\n")


def spy_on_the_loop(spy_dir: Path) -> None:
    from lite_rlhf import generate
    from lite_rlhf.algorithms import dpo

    inner = generate.VllmEngine._generate

    def sampled(self, prompts, *args, **kwargs):
        record(spy_dir, "generate", [p.id for p in prompts])
        return inner(self, prompts, *args, **kwargs)

    generate.VllmEngine._generate = sampled
    train_dpo, optimize = dpo.train_dpo, dpo.optimize

    def spied_train_dpo(model, pairs, *args, **kwargs):
        def spied_optimize(params, sec, steps, micro_loss, *a, **k):
            def loss(indices):
                record(spy_dir, "dpo", [pairs[i].prompt_id for i in indices])
                return micro_loss(indices)

            return optimize(params, sec, steps, loss, *a, **k)

        dpo.optimize = spied_optimize
        try:
            return train_dpo(model, pairs, *args, **kwargs)
        finally:
            dpo.optimize = optimize

    dpo.train_dpo = spied_train_dpo  # the DPO stage looks it up in its module when it runs


def dpo_step(out: Path, model_dir: str, micro_batch: int, grad_accum: int) -> None:
    import torch

    from lite_rlhf import dist
    from lite_rlhf.algorithms.dpo import add_reference_logps, train_dpo
    from lite_rlhf.config import load_config
    from lite_rlhf.data import prompt_ids, response_ids
    from lite_rlhf.pairs import Pair
    from lite_rlhf.roles import SharedModel

    torch.set_num_threads(1)
    dist.start()
    cfg = load_config(None, [f"model.name={model_dir}", "model.dtype=float32", "lora.r=4", "dpo.lr=1e-2",
                             f"dpo.micro_batch={micro_batch}", f"dpo.grad_accum={grad_accum}", "dpo.epochs=2",
                             "dpo.warmup_ratio=0"])  # fmt: skip
    model = SharedModel(cfg)
    tok = model.tokenizer
    words = ("sun", "sea", "fox", "dog", "owl")
    ids = {f"p{i}": prompt_ids(tok, [{"role": "user", "content": f"describe the {w}."}]) for i, w in enumerate(words)}
    pairs = [
        Pair(pid, response_ids(tok, f"the {w} is " + "very " * i + "nice."), response_ids(tok, "no"), "", "", 1.0, 0.0)
        for i, (pid, w) in enumerate(zip(ids, words, strict=True))
    ]  # responses of different lengths: the ranks' shares differ in size and length
    pairs = add_reference_logps(model, pairs, ids, cfg.data, micro_batch)
    seen: list[list[str]] = [[]]  # per optimizer step: the pairs this rank's micro-batches held
    import lite_rlhf.algorithms.dpo as dpo_module

    optimize = dpo_module.optimize

    def spied_optimize(params, sec, steps, micro_loss, *a, **k):
        assert len(steps) == 2, steps  # two optimizer steps (epochs), each over the five pairs

        def loss(indices):
            seen[-1].extend(pairs[i].prompt_id for i in indices)
            return micro_loss(indices)

        return optimize(params, sec, steps, loss, *a, **k)

    dpo_module.optimize = spied_optimize
    records = []
    train_dpo(model, pairs, ids, cfg.dpo, cfg.data, seed=3, quiet=True,
              on_step=lambda rec: (records.append(rec), seen.append([])))  # fmt: skip
    seen.pop()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.rank()}.json").write_text(json.dumps({"ids": seen, "records": records}))
    if dist.is_main():
        model.save_adapter("policy", out / "policy")
    dist.barrier()
    dist.finish()


def grpo_step(out: Path, model_dir: str, micro_batch: int, grad_accum: int) -> None:
    import torch

    from lite_rlhf import dist
    from lite_rlhf.algorithms.grpo import Rollout, token_logps, train_pg
    from lite_rlhf.config import load_config
    from lite_rlhf.data import prompt_ids, response_ids
    from lite_rlhf.roles import SharedModel

    torch.set_num_threads(1)
    dist.start()
    cfg = load_config(None, [f"model.name={model_dir}", "model.dtype=float32", "lora.r=4", "loop.algorithm=grpo",
                             "generation.n=2", "generation.temperature=0.7", "grpo.lr=1e-2", "grpo.epochs=2",
                             f"grpo.micro_batch={micro_batch}", f"grpo.grad_accum={grad_accum}",
                             "grpo.warmup_ratio=0"])  # fmt: skip
    model = SharedModel(cfg)
    tok = model.tokenizer
    words = ("sun", "sea", "fox", "dog", "owl")
    ids = {f"p{i}": prompt_ids(tok, [{"role": "user", "content": f"describe the {w}."}]) for i, w in enumerate(words)}
    answers = [response_ids(tok, f"the {w} is " + "very " * i + "nice.") for i, w in enumerate(words)]
    rows = [(ids[pid], a) for pid, a in zip(ids, answers, strict=True)]  # of different lengths: unequal shares
    old = token_logps(model, "policy", rows, cfg.data, micro_batch, 0.7, quiet=True)
    ref = token_logps(model, "reference", rows, cfg.data, micro_batch, 0.7, quiet=True)
    advantages = (1.0, -0.5, 0.3, -1.2, 0.8)
    batch = [Rollout(pid, 0, a, 0.0, adv, o, r)
             for pid, a, adv, o, r in zip(ids, answers, advantages, old, ref, strict=True)]  # fmt: skip
    records: list[dict] = []
    train_pg(model, batch, ids, cfg, seed=3, quiet=True, on_step=records.append)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.rank()}.json").write_text(json.dumps({"records": records}))
    if dist.is_main():
        model.save_adapter("policy", out / "policy")
    dist.barrier()
    dist.finish()


def ppo_step(out: Path, model_dir: str, micro_batch: int, grad_accum: int) -> None:
    """PPO's update on five fixed answers: the old values (sharded), GAE, two policy and two value steps."""
    from types import SimpleNamespace

    import torch

    from lite_rlhf import dist
    from lite_rlhf.algorithms.grpo import per_token, token_logps
    from lite_rlhf.algorithms.ppo import Rollout, returns, train_policy, train_value
    from lite_rlhf.config import load_config
    from lite_rlhf.data import prompt_ids, response_ids
    from lite_rlhf.roles import SharedModel
    from lite_rlhf.train import plan_steps

    torch.set_num_threads(1)
    dist.start()
    cfg = load_config(None, [f"model.name={model_dir}", "model.dtype=float32", "lora.r=4", "loop.algorithm=ppo",
                             "generation.temperature=0.7", "ppo.lr=1e-2", "ppo.value_lr=1e-2", "ppo.epochs=1",
                             f"ppo.micro_batch={micro_batch}", f"ppo.grad_accum={grad_accum}", "ppo.warmup_ratio=0",
                             "run.quiet=true"])  # fmt: skip
    model = SharedModel(cfg)
    model.add_value(seed=5)
    tok = model.tokenizer
    words = ("sun", "sea", "fox", "dog", "owl")
    ids = {f"p{i}": prompt_ids(tok, [{"role": "user", "content": f"describe the {w}."}]) for i, w in enumerate(words)}
    answers = [response_ids(tok, f"the {w} is " + "very " * i + "nice.") for i, w in enumerate(words)]
    rows = [(ids[pid], a) for pid, a in zip(ids, answers, strict=True)]
    old = token_logps(model, "policy", rows, cfg.data, micro_batch, 0.7, quiet=True)
    ref = token_logps(model, "reference", rows, cfg.data, micro_batch, 0.7, quiet=True)
    scores = (1.0, -0.5, 0.3, -1.2, 0.8)
    batch = [Rollout(pid, 0, a, 0.0, score, o, r)
             for pid, a, score, o, r in zip(ids, answers, scores, old, ref, strict=True)]  # fmt: skip
    values = per_token(model, rows, cfg.data, micro_batch, model.values, "values", quiet=True)
    advantages, targets = returns(cfg, batch, values, lam=0.95)
    ctx = SimpleNamespace(cfg=cfg, model=model, ids=ids)
    steps = plan_steps(len(batch), cfg.ppo, 3)
    records: list[dict] = []
    train_policy(ctx, batch, advantages, steps, records.append)
    train_value(ctx, batch, values, targets, steps, clip=0.15, name="value", on_step=records.append)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.rank()}.json").write_text(json.dumps({"records": records}))
    if dist.is_main():
        model.save_adapter("policy", out / "policy")
        model.save_value(out / "value")
    dist.barrier()
    dist.finish()


if __name__ == "__main__":
    mode, where, *rest = sys.argv[1:]
    if mode == "loop":
        spy_on_the_loop(Path(where))
        from lite_rlhf.cli import main

        sys.exit(main(rest))
    step = {"dpo-step": dpo_step, "grpo-step": grpo_step, "ppo-step": ppo_step}[mode]
    step(Path(where), rest[0], int(rest[1]), int(rest[2]))
