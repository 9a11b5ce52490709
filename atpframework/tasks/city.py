"""City: factual recall in the spirit of the AtP* paper's CITY-PP.

"The city of Paris is located in the country of" -> " France": the model recalls where a city is. The
noise prompt swaps the subject for a city of another country ("The city of Tokyo ..."), so the pair
differs at the city's one token. ``answer`` is the clean city's country, ``wrong_answer`` the noise
city's country (the noise run's answer).
"""

import random
from typing import Any

from atpframework.errors import PlanError
from atpframework.tasks.base import Pair, Task, Tokenize

FACTS = (
    "Paris France, Lyon France, London England, Manchester England, Liverpool England, "
    "Berlin Germany, Munich Germany, Hamburg Germany, Frankfurt Germany, Cologne Germany, Madrid Spain, "
    "Barcelona Spain, Rome Italy, Milan Italy, Venice Italy, Florence Italy, Naples Italy, Tokyo Japan, "
    "Kyoto Japan, Moscow Russia, Beijing China, Shanghai China, Cairo Egypt, Athens Greece, Vienna Austria, "
    "Dublin Ireland, Lisbon Portugal, Oslo Norway, Stockholm Sweden, Warsaw Poland, Budapest Hungary, "
    "Amsterdam Netherlands, Brussels Belgium, Copenhagen Denmark, Helsinki Finland, Istanbul Turkey, "
    "Toronto Canada, Montreal Canada, Vancouver Canada, Sydney Australia, Melbourne Australia, Perth Australia, "
    "Brisbane Australia, Mumbai India, Delhi India, Calcutta India, Seoul Korea, Tehran Iran, Baghdad Iraq, "
    "Jerusalem Israel, Kabul Afghanistan, Zurich Switzerland, Geneva Switzerland, Kiev Ukraine, Sofia Bulgaria, "
    "Havana Cuba, Lima Peru, Santiago Chile, Nairobi Kenya, Manila Philippines, Edinburgh Scotland, "
    "Glasgow Scotland, Rio Brazil"
)
"""(city, country) facts, both one token with a leading space for SmolLM2's tokenizer, that
SmolLM2-135M-Instruct knows: in "The city of {city} is located in the country of" its country's logit
beats every other country of the list. Of the 66 single-token candidates tried, "Auckland" -> " Zealand"
failed; "Dubai" -> " UAE" and "Prague" -> " Czech" passed but are left out (not the countries' usual names)."""

TEMPLATES = {
    "located-in": "The city of {city} is located in the country of",
    "lies-in": "The city of {city} lies in the country of",
    "found-in": "The city of {city} can be found in the country of",
}
"""Template key -> text."""


def facts() -> tuple[tuple[str, str], ...]:
    """``FACTS`` as (city, country) pairs."""
    return tuple((city, country) for city, country in (fact.split() for fact in FACTS.split(", ")))


class City(Task):
    """CITY-PP: the noise swaps the city for one of another country (module docstring)."""

    name = "city"
    description = "factual recall: 'The city of Paris is located in the country of' -> France; noise swaps the city"

    def prepare(self, tokenize: Tokenize | None) -> Any:
        known = facts()
        if tokenize is not None:
            known = tuple((c, k) for c, k in known if len(tokenize(" " + c)) == len(tokenize(" " + k)) == 1)
        if len({country for _, country in known}) < 2:
            raise PlanError(f"tokenize: only {len(known)} of {len(facts())} city facts are one token each for this "
                            "tokenizer (facts of at least 2 countries needed)")
        return known

    def draw(self, rng: random.Random, material: Any) -> Pair | None:
        key = rng.choice(sorted(TEMPLATES))
        (city, country), (other, other_country) = rng.sample(material, 2)
        if country == other_country:
            return None
        template = TEMPLATES[key]
        return Pair(template.format(city=city), template.format(city=other), " " + country, " " + other_country, key)
