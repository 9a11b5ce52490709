"""Greater-than: the end year follows the start year (after Hanna et al.'s greater-than task).

"The war lasted from the year 1732 to the year 17" -> a decade digit of an end year after 1732.
SmolLM2's tokenizer writes every digit as its own token, so the next token is the end year's tens
digit. With the start year's tens digit ``d``, ``answer`` is ``d + 1`` (a later decade, valid) and
``wrong_answer`` is ``d - 1`` (an earlier one, invalid): they sit symmetrically around ``d``, so copying
the start's digit does not decide the sign, only knowing that the end comes later does. The noise
prompt starts a decade earlier (tens digit ``d - 1``, the same units), where ``d - 1`` is the nearest
valid decade and the preference flips; the pair differs at that one digit.
"""

import random
from typing import Any

from atpframework.tasks.base import Pair, Task, Tokenize, single_tokens

NOUNS = ("war", "reign", "expedition", "drought", "siege", "project", "contract", "journey", "dynasty", "famine", "trial", "strike")
"""Things that last, each one token with a leading space for SmolLM2's tokenizer."""

CENTURIES = tuple(range(11, 19))
"""The first two digits of both years."""

TEMPLATES = {
    "lasted": "The {noun} lasted from the year {start} to the year {century}",
    "started-ended": "The {noun} started in the year {start} and ended in the year {century}",
    "ran": "The {noun} ran from {start} to {century}",
}
"""Template key -> text (``start``: four digits; ``century``: the end year's first two)."""


class GreaterThan(Task):
    """Greater-than over decades (module docstring)."""

    name = "greater_than"
    description = "years: 'The war lasted from the year 1732 to the year 17' -> '4' over '2'; noise starts in 172x"

    def prepare(self, tokenize: Tokenize | None) -> Any:
        return single_tokens(NOUNS, tokenize, "greater_than nouns", 1)

    def draw(self, rng: random.Random, material: Any) -> Pair | None:
        key = rng.choice(sorted(TEMPLATES))
        noun, century = rng.choice(material), rng.choice(CENTURIES)
        tens, units = rng.randint(1, 8), rng.randint(0, 9)

        def prompt(decade: int) -> str:
            return TEMPLATES[key].format(noun=noun, start=f"{century}{decade}{units}", century=century)

        return Pair(prompt(tens), prompt(tens - 1), str(tens + 1), str(tens - 1), key)
