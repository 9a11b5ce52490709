"""IOI: indirect object identification, as the AtP* paper's IOI-PP prompt pairs.

"When Mary and John went to the store, John gave a drink to" -> " Mary": the model names the
indirect object, the one of two names not repeated. The noise prompt replaces the second mention of
the subject (S2) by the indirect object ("..., Mary gave a drink to"), so the repeated name, and the
answer, flip; the pair differs at that one token. ``answer`` is the clean indirect object,
``wrong_answer`` the subject (the noise run's answer). Templates put the two names in either order
(ABBA and BABA).
"""

import random
from typing import Any

from atpframework.tasks.base import Pair, Task, Tokenize, single_tokens

NAMES = (
    "Mary", "John", "Tom", "James", "Anna", "Sarah", "Michael", "David", "Robert", "William", "Richard", "Joseph",
    "Thomas", "Charles", "Daniel", "Matthew", "Anthony", "Mark", "Paul", "Steven", "Andrew", "Kevin", "Brian",
    "George", "Edward", "Jason", "Ryan", "Jacob", "Eric", "Scott", "Samuel", "Frank", "Patrick", "Jack", "Adam",
    "Henry", "Nathan", "Peter", "Alan", "Louis", "Arthur", "Albert", "Carl", "Roger", "Walter", "Harold", "Bruce",
    "Ralph", "Vincent", "Philip", "Linda", "Elizabeth", "Susan", "Jessica", "Karen", "Nancy", "Lisa", "Emily",
    "Laura", "Amy", "Helen", "Emma", "Rachel", "Maria", "Julie", "Kelly", "Alice", "Grace", "Lucy", "Kate", "Jane",
    "Lily", "Olivia", "Victoria", "Hannah", "Sophia", "Charlotte", "Rose", "Diana", "Julia", "Rebecca", "Michelle",
    "Sandra", "Margaret", "Catherine", "Nicole", "Christine", "Martha", "Ruth", "Judy", "Ann",
)
"""First names, each one token with a leading space for SmolLM2's tokenizer."""

PLACES = ("store", "park", "office", "school", "beach", "restaurant", "library", "hospital", "market", "station", "garden", "museum")
OBJECTS = ("drink", "ball", "letter", "book", "gift", "ring", "key", "bag", "pen", "phone", "flower", "cake")

TEMPLATES = {
    "when-went": "When {A} and {B} went to the {place}, {S2} gave a {object} to",
    "when-went-baba": "When {B} and {A} went to the {place}, {S2} gave a {object} to",
    "after-went": "After {A} and {B} went to the {place}, {S2} gave a {object} to",
    "while-working": "While {A} and {B} were working at the {place}, {S2} gave a {object} to",
    "then-went": "Then, {A} and {B} went to the {place}. {S2} gave a {object} to",
    "got-decided": "When {A} and {B} got a {object} at the {place}, {S2} decided to give it to",
    "argument": "Then, {A} and {B} had a long argument. Afterwards {S2} said to",
    "place-busy": "The {place} where {A} and {B} worked was busy. {S2} gave a {object} to",
}
"""Template key -> text: ``{A}`` is the indirect object (the answer), ``{B}`` the subject, ``{S2}`` its
second mention (``B`` in the clean prompt, ``A`` in the noise). Each clean pair is performed (clean
logit diff > 0, noise below it) on SmolLM2-135M-Instruct for at least 15 of 16 random pairs; two
templates that were not ("Friends {A} and {B} found a {object} at the {place}. {S2} gave it to": 4 of 16;
"{A} and {B} went to the {place}, and {S2} handed a {object} to": 6 of 16) are left out."""


class Ioi(Task):
    """IOI-PP: the noise prompt repeats the other name, so the indirect object flips (module docstring)."""

    name = "ioi"
    description = "indirect object: 'When A and B went to the store, B gave a drink to' -> A; noise repeats A instead"

    def prepare(self, tokenize: Tokenize | None) -> Any:
        return (single_tokens(NAMES, tokenize, "ioi names"), single_tokens(PLACES, tokenize, "ioi places", 1),
                single_tokens(OBJECTS, tokenize, "ioi objects", 1))

    def draw(self, rng: random.Random, material: Any) -> Pair | None:
        names, places, objects = material
        key = rng.choice(sorted(TEMPLATES))
        a, b = rng.sample(names, 2)
        fill = {"A": a, "B": b, "place": rng.choice(places), "object": rng.choice(objects)}
        template = TEMPLATES[key]
        clean, noise = template.format(S2=b, **fill), template.format(S2=a, **fill)
        return Pair(clean, noise, " " + a, " " + b, key)
