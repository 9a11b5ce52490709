"""Counting: continue a run of consecutive two-digit numbers.

"23, 24, 25, 2" -> "6": the model continues the count. SmolLM2's tokenizer writes every digit as its
own token, so the prompt stops after the next number's tens digit and the answer is its units digit.
The noise prompt is a count of the same length from another start whose next units digit differs;
``answer`` is the clean run's units digit, ``wrong_answer`` the noise run's.
"""

import random
from typing import Any

from atpframework.tasks.base import Pair, Task, Tokenize

LENGTHS = (3, 4, 5)
"""How many numbers each prompt lists before the one to complete."""


def count_prompt(start: int, length: int) -> tuple[str, str]:
    """The prompt counting ``length`` numbers from ``start`` up to the next one's tens digit, and its units digit."""
    nxt = str(start + length)
    return ", ".join(str(start + i) for i in range(length)) + ", " + nxt[:-1], nxt[-1]


class Counting(Task):
    """Counting with two-digit numbers (module docstring)."""

    name = "counting"
    description = "numbers: '23, 24, 25, 2' -> '6'; noise counts from another start"

    def prepare(self, tokenize: Tokenize | None) -> Any:
        return None

    def draw(self, rng: random.Random, material: Any) -> Pair | None:
        length = rng.choice(LENGTHS)
        start, other = rng.randint(10, 99 - length), rng.randint(10, 99 - length)
        clean, answer = count_prompt(start, length)
        noise, wrong = count_prompt(other, length)
        return Pair(clean, noise, answer, wrong, f"length-{length}")
