"""RAND-PP: random prompt pairs, the AtP* paper's behaviour-free setting.

The clean and noise prompts are starts of two different natural sentences of ``SENTENCES``, cut at
word boundaries to the same token length, so the pair differs almost everywhere and no one behaviour
is singled out. The answers are the model's own: ``answer`` is the clean run's top next token,
``wrong_answer`` the noise run's (a pair whose two top tokens agree is skipped), so ``logit_diff`` is
positive on the clean prompt and negative on the noise prompt by construction, and attributions say
what moves the model from one prediction to the other. Drawing therefore needs the model
(``Task.labelled_pairs(..., backend=)``); an answer is text when its token decodes to a text that
tokenizes back to it, else the token id. The pairs depend on the model as well as on the seed.
"""

import random
from typing import Any

from atpframework.errors import PlanError
from atpframework.model.backend import AbstractBackend
from atpframework.tasks.base import Pair, Task, Tokenize, with_answers
from atpframework.tasks.forward import final_logits

SENTENCES = (
    "The old man walked slowly down the hill towards the small village by the river.",
    "She opened the window and let the cold morning air fill the quiet room.",
    "Our team spent three weeks testing the new software before the first release.",
    "The recipe calls for two cups of flour, a pinch of salt and some warm milk.",
    "After the storm had passed, the children ran outside to play in the puddles.",
    "Scientists have discovered a new species of frog in the mountains of Peru.",
    "He could not remember where he had left his keys the night before.",
    "The museum will be closed on Monday for the installation of a new exhibit.",
    "Most students found the final exam much easier than they had expected.",
    "The train to the city leaves every hour from the main platform of the station.",
    "Please remember to water the plants while I am away on holiday next week.",
    "The company reported a sharp rise in profits during the last quarter of the year.",
    "A small boat drifted along the coast as the sun began to set over the sea.",
    "My grandmother used to tell us stories about her childhood on the farm.",
    "The committee decided to postpone the meeting until more information was available.",
    "Heavy rain caused flooding in several towns along the northern coast.",
    "The dog barked loudly at the mail carrier every single morning.",
    "Learning a new language takes patience, practice and a lot of time.",
    "The orchestra played a beautiful piece by a young composer from Vienna.",
    "They built a wooden bridge across the stream behind the old mill.",
    "The doctor advised him to get more sleep and to drink plenty of water.",
    "In the evening, the streets of the town were filled with music and laughter.",
    "The library has thousands of books, maps and old newspapers in its collection.",
    "We watched the birds gather on the lake before flying south for the winter.",
    "The engineer explained how the machine could lift heavy loads with little power.",
    "A thick fog covered the valley, and the road ahead was hard to see.",
    "The new park in the centre of the city has a playground and a large pond.",
    "He wrote a long letter to his brother, who was living abroad at the time.",
    "The price of fresh vegetables went up sharply after the dry summer.",
    "Every year, thousands of visitors come to see the ancient castle on the hill.",
    "The teacher asked the class to read the first chapter of the novel by Friday.",
    "The small shop on the corner sells bread, cheese and fresh coffee.",
    "Snow fell all night, and by morning the whole garden was white.",
    "The players celebrated their victory with a dinner at a local restaurant.",
    "Her favourite hobby is painting landscapes in the countryside near her home.",
    "The government announced new rules for building houses near the coast.",
    "The cat slept on the warm windowsill for most of the afternoon.",
    "A group of volunteers cleaned the beach and collected bags of plastic waste.",
    "The pilot told the passengers that the flight would land twenty minutes early.",
    "The farmer planted potatoes, carrots and beans in the field behind the barn.",
)
"""Plain sentences, written for this task."""

MIN_WORDS = 4
"""Shortest sentence start (in words) used as a prompt."""


class RandPP(Task):
    """Random prompt pairs with the model's own top tokens as answers (module docstring)."""

    name = "rand_pp"
    description = "random prompt pairs: starts of two sentences of equal token length; answers: each run's top token"
    needs_backend = True

    def prepare(self, tokenize: Tokenize | None) -> Any:
        if tokenize is None:
            raise PlanError("tokenize: task 'rand_pp' cuts sentences to equal token lengths and needs a tokenizer")
        starts: dict[int, list[tuple[int, str]]] = {}
        for i, sentence in enumerate(SENTENCES):
            words = sentence.split()
            for n_words in range(MIN_WORDS, len(words)):
                text = " ".join(words[:n_words])
                starts.setdefault(len(tokenize(text)), []).append((i, text))
        return {n: group for n, group in sorted(starts.items()) if len({i for i, _ in group}) > 1}

    def draw(self, rng: random.Random, material: Any) -> Pair | None:
        group = material[rng.choice(sorted(material))]
        (i, clean), (j, noise) = rng.sample(group, 2)
        return None if i == j else Pair(clean, noise, None, None, "sentences")

    def complete(self, pairs: list[Pair], backend: AbstractBackend) -> list[Pair | None]:
        logits = final_logits(backend, [p.clean for p in pairs] + [p.noise for p in pairs])
        tops = logits.argmax(-1).tolist()
        done: list[Pair | None] = []
        for k, pair in enumerate(pairs):
            answer, wrong = tops[k], tops[len(pairs) + k]
            done.append(None if answer == wrong else with_answers(pair, _as_text(backend, answer), _as_text(backend, wrong)))
        return done


def _as_text(backend: AbstractBackend, token: int) -> str | int:
    """The token's text if it tokenizes back to exactly this token, else its id."""
    strings = backend.token_strings([token])
    if strings and backend.tokenize(strings[0], False) == [token]:
        return strings[0]
    return token
