"""The embedded demo task: describe a topic under a verifiable instruction, and its gold checker.

Prompts read "Describe <topic>. <instruction>". The gold checker plays the paper's human
annotators: it labels the reward model's training pairs and scores the evaluation; the loop never
ranks with it. An answer passes only when it follows the instruction AND answers the prompt:

- `real_answer`: at least 4 words, mostly letters (no emoji or symbol soup), not a bare echo of
  the instruction;
- `no_repetition`: no content word more than max(3, words/8) times, no word three times in a row,
  no repeated 4-word phrase (a cpu-stack.md trial saw a 135M policy learn "Banana Banana Banana
  Banana");
- `on_topic`: names the topic asked about;
- the instruction's own check.

So a policy cannot win by saying less or by repeating the keyword: the checks are reported one by
one beside the mean length, and the instruction-free prompts of the alignment-tax panel show what
the policy does when nobody asks for a constraint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lite_rlhf.evaluate import Gold

# Each topic: (how the prompt names it, words that count as naming it in an answer).
TOPICS: list[tuple[str, tuple[str, ...]]] = [
    (t, tuple(k.split("|")))
    for t, k in [
        ("the ocean", "ocean|sea"),
        ("a cat", "cat"),
        ("a dog", "dog|pupp"),
        ("the moon", "moon|lunar"),
        ("a volcano", "volcan|lava"),
        ("a library", "librar|book"),
        ("a forest", "forest|tree|wood"),
        ("the sun", "sun|solar"),
        ("a bicycle", "bicycl|bike"),
        ("a piano", "piano"),
        ("a river", "river|stream"),
        ("a mountain", "mountain|peak"),
        ("a desert", "desert|sand"),
        ("rain", "rain"),
        ("snow", "snow"),
        ("a train", "train|rail"),
        ("an airport", "airport|plane|flight"),
        ("a garden", "garden|flower|plant"),
        ("coffee", "coffee"),
        ("bread", "bread|bak"),
        ("a bridge", "bridge"),
        ("a castle", "castle"),
        ("the wind", "wind|breez"),
        ("a school", "school|student|teach"),
        ("a hospital", "hospital|patient|doctor"),
        ("a city park", "park"),
        ("a lighthouse", "lighthouse|light"),
        ("a honeybee", "bee|honey"),
        ("an elephant", "elephant"),
        ("a penguin", "penguin"),
        ("a spider", "spider|web"),
        ("an owl", "owl"),
        ("a whale", "whale"),
        ("a butterfly", "butterfl"),
        ("a tiger", "tiger"),
        ("a horse", "horse"),
        ("a rainbow", "rainbow|colou|color"),
        ("a thunderstorm", "storm|thunder|lightning"),
        ("autumn", "autumn|fall"),
        ("winter", "winter|cold|snow"),
        ("summer", "summer|hot|warm"),
        ("spring", "spring|bloom"),
        ("a clock", "clock|time"),
        ("a candle", "candle|flame|wax"),
        ("a kite", "kite"),
        ("a map", "map"),
        ("a telescope", "telescop|star"),
        ("a computer", "computer"),
        ("a smartphone", "phone"),
        ("a museum", "museum|art"),
        ("a market", "market|sell|buy"),
        ("a kitchen", "kitchen|cook"),
        ("soup", "soup"),
        ("cheese", "cheese"),
        ("an apple", "apple"),
        ("chocolate", "chocolate|cocoa"),
        ("tea", "tea"),
        ("a farm", "farm|crop|animal"),
        ("a village", "village"),
        ("an island", "island"),
        ("a cave", "cave"),
        ("a glacier", "glacier|ice"),
        ("a waterfall", "waterfall|water"),
        ("a lake", "lake"),
        ("the stars", "star"),
        ("a comet", "comet"),
        ("the planet Mars", "mars|planet"),
        ("a robot", "robot"),
        ("a rocket", "rocket|space"),
        ("a football match", "football|soccer|match|game"),
        ("a marathon", "marathon|run"),
        ("a chess game", "chess"),
        ("a violin", "violin"),
        ("a drum", "drum"),
        ("a painting", "painting|paint"),
        ("a poem", "poem|poet"),
        ("a birthday party", "birthday|party|cake"),
        ("a wedding", "wedding|marri"),
        ("a newspaper", "newspaper|news"),
        ("a letter", "letter|mail"),
        ("a friendship", "friend"),
        ("a teacher", "teacher|teach"),
        ("a firefighter", "firefight|fire"),
        ("a farmer", "farmer|farm"),
        ("a pilot", "pilot|fly|plane"),
        ("a nurse", "nurse|patient"),
        ("a bakery", "baker|bread|cake"),
        ("a zoo", "zoo|animal"),
        ("a beach", "beach|sand|sea"),
        ("a harbor", "harbo|boat|ship"),
        ("a sailboat", "boat|sail"),
        ("a tree", "tree"),
        ("a rose", "rose|flower"),
        ("a mushroom", "mushroom|fung"),
        ("an ant colony", "ant"),
        ("a frog", "frog"),
        ("a shark", "shark"),
        ("a dolphin", "dolphin"),
        ("a parrot", "parrot|bird"),
        ("a cow", "cow|milk"),
        ("a sheep", "sheep|wool"),
        ("a wolf", "wolf|wolves"),
    ]
]

KEYWORDS = ["banana", "purple", "happy", "music", "golden", "gentle"]
WORD_LIMITS = [15, 20]

_STOP = set(
    "a an the and or but of to in on at for with from by is are was were be been it its this that these those "
    "as can will has have had not no you your they them their there what which who very also into over under "
    "than then some many more most such about just like".split()
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


@dataclass(frozen=True)
class Constraint:
    kind: str  # "max_words" | "keyword"
    value: str | int

    @property
    def instruction(self) -> str:
        if self.kind == "max_words":
            return f"Answer in fewer than {self.value} words."
        if self.kind == "keyword":
            return f"Use the word '{self.value}' somewhere in your answer."
        raise ValueError(self.kind)

    @property
    def name(self) -> str:
        return "max_words" if self.kind == "max_words" else "keyword"

    def satisfied(self, text: str) -> bool:
        words = _WORD.findall(text)
        if self.kind == "max_words":
            return len(words) < int(self.value)
        return any(w.lower().strip("'-") == self.value for w in words)


def words(text: str) -> list[str]:
    return [w.lower().strip("'-") for w in _WORD.findall(text)]


def quality_checks(text: str, topic_keys: tuple[str, ...], instruction: str = "") -> dict[str, bool]:
    """The checks that make an answer an answer, whatever the instruction."""
    ws = words(text)
    letters = sum(c.isalpha() for c in text)
    visible = sum(not c.isspace() for c in text)
    content = [w for w in ws if w not in _STOP and len(w) > 2]
    counts: dict[str, int] = {}
    for w in content:
        counts[w] = counts.get(w, 0) + 1
    fourgrams = [tuple(ws[i : i + 4]) for i in range(len(ws) - 3)]
    instr = set(words(instruction))
    echo = bool(ws) and sum(w in instr for w in ws) / len(ws) > 0.6
    return {
        "real_answer": len(ws) >= 4 and visible > 0 and letters / visible >= 0.75 and not echo,
        "no_repetition": max(counts.values(), default=0) <= max(3, len(ws) // 8)
        and not any(ws[i] == ws[i + 1] == ws[i + 2] for i in range(len(ws) - 2))
        and len(set(fourgrams)) == len(fourgrams),
        "on_topic": any(w.startswith(k) for w in ws for k in topic_keys),
    }


def gold_check(meta: dict, text: str) -> dict[str, bool]:
    """All checks for one answer to a demo prompt; `passed` is their conjunction."""
    constraint = Constraint(meta["constraint"], meta["value"]) if meta.get("constraint") else None
    checks = quality_checks(text, tuple(meta["topic_keys"]), constraint.instruction if constraint else "")
    if constraint is not None:
        checks["instruction"] = constraint.satisfied(text)
    checks["passed"] = all(checks.values())
    return checks


def checker_reward(prompts, completions, topic_keys, constraint, value, **kwargs) -> list[float]:
    """The gold checker as a verifiable reward function (TRL's signature; the prompt rows' columns come as keyword
    arguments): the share of its checks an answer passes, 1.0 when it passes them all. For GRPO or RLOO on the
    training prompts (`reward.kind=functions reward.functions=lite_rlhf.demo.task:checker_reward`); evaluation then
    reports gold on test prompts the policy never trained on."""
    out = []
    for text, keys, kind, val in zip(completions, topic_keys, constraint, value, strict=True):
        checks = gold_check({"topic_keys": keys, "constraint": kind, "value": val}, text)
        checks.pop("passed")
        out.append(sum(checks.values()) / len(checks))
    return out


def tax_check(meta: dict, text: str) -> dict:
    """An instruction-free answer (the alignment-tax panel): its length in words and the quality checks."""
    return {"words": len(words(text)), **quality_checks(text, tuple(meta.get("topic_keys", ())), "")}


# The demo's gold checker, plugged into evaluation by `lite_rlhf.task` (generic code never imports the demo).
GOLD = Gold(applies=lambda meta: "topic_keys" in meta, check=gold_check, tax=tax_check)


def make_prompts() -> list[dict]:
    """Every demo prompt, in a fixed order, with its gold-check fields: three per topic (a word
    limit and two keywords, rotating) and the instruction-free version for the alignment-tax panel."""
    rows = []
    for i, (topic, keys) in enumerate(TOPICS):
        picks = [
            Constraint("max_words", WORD_LIMITS[i % len(WORD_LIMITS)]),
            Constraint("keyword", KEYWORDS[i % len(KEYWORDS)]),
            Constraint("keyword", KEYWORDS[(i + 3) % len(KEYWORDS)]),
        ]
        for j, c in enumerate(picks):
            rows.append(
                {
                    "id": f"t{i:03d}-{j}",
                    "prompt": f"Describe {topic}. {c.instruction}",
                    "plain": f"Describe {topic}.",
                    "topic": topic,
                    "topic_keys": list(keys),
                    "constraint": c.kind,
                    "value": c.value,
                }
            )
    return rows


# Topic ranges of the splits (by topic, so no topic is in two splits).
SPLITS = {
    "rm_prompts": range(0, 25),  # π0 samples labelled by the gold checker: the reward model's pairs
    "rm_eval_prompts": range(25, 32),  # held-out pairs for reward accuracy
    "prompts": range(32, 72),  # the loop's prompts, sliced over the iterations
    "val_prompts": range(72, 80),  # choose the best iteration
    "test_prompts": range(80, 100),  # the reported figures
}


def split_prompts() -> dict[str, list[dict]]:
    rows = make_prompts()
    return {name: [r for r in rows if int(r["id"][1:4]) in topics] for name, topics in SPLITS.items()}
