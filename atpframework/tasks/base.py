"""What a task is: a named, seeded generator of equal-length prompt pairs with answers.

A task owns its word lists and templates; this module owns drawing from it. ``Task.labelled_pairs``
draws candidate pairs from ``random.Random(seed)`` one after another and keeps each one that passes the
checks: not a duplicate, clean and noise different, and, given a tokenizer (``tokenize`` or a backend),
clean and noise of the same token length and answers of exactly one token (tokenized without BOS,
as plans read them). A pair failing a check is skipped, never repaired, so the pairs are a
deterministic function of the seed (and, for tasks that read the model, of the model). The word lists
of the built-in tasks are single tokens with a leading space for SmolLM2's tokenizer (a test holds
them to it); given a tokenizer, a task first drops the words that are not.
"""

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from atpframework.errors import PlanError, shorten
from atpframework.model.backend import AbstractBackend

Tokenize = Callable[[str], list[int]]
"""Token ids of a text, without BOS (``tokenizer_of(backend)``, or a Hugging Face tokenizer's
``lambda t: tok.encode(t, add_special_tokens=False)``)."""

TRIES_PER_PAIR = 50
"""Candidates drawn per pair asked for before a task gives up (and says why its candidates failed)."""

COMPLETE_CHUNK = 16
"""Candidates a task that reads the model (``Task.complete``) completes per forward pass: fixed, so that
the first ``n`` pairs do not depend on how many were asked for."""


@dataclass(frozen=True)
class Pair:
    """One prompt pair with its answers and the group it was drawn from (a template, or the task itself)."""

    clean: str
    noise: str
    answer: str | int | None
    """The clean run's correct next token: text of one token, or a token id."""
    wrong_answer: str | int | None
    """The competing token: the noise run's answer."""
    group: str

    def prompt(self) -> dict[str, Any]:
        """The plan's prompt dict: ``{"clean", "noise", "answer", "wrong_answer"}``."""
        return {"clean": self.clean, "noise": self.noise, "answer": self.answer, "wrong_answer": self.wrong_answer}


def tokenizer_of(backend: AbstractBackend) -> Tokenize:
    """The backend's tokenizer as a ``Tokenize`` (no BOS: lengths then compare as a plan's would)."""
    return lambda text: backend.tokenize(text, False)


def single_tokens(words: Sequence[str], tokenize: Tokenize | None, what: str, minimum: int = 2) -> tuple[str, ...]:
    """The words that are one token with a leading space (all of them without a tokenizer); a ``PlanError``
    naming ``what`` when fewer than ``minimum`` are."""
    kept = tuple(words) if tokenize is None else tuple(w for w in words if len(tokenize(" " + w)) == 1)
    if len(kept) < minimum:
        raise PlanError(f"tokenize: only {len(kept)} of {len(words)} {what} are one token for this tokenizer "
                        f"(at least {minimum} needed)")
    return kept


def check_count(value: Any, field: str) -> int:
    """``value`` as an int >= 1; a ``PlanError`` naming ``field`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{field}: expected an integer >= 1, got {shorten(value)}")
    return value


def check_seed(value: Any) -> int:
    """``value`` as an int seed; a ``PlanError`` at ``seed`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"seed: expected an integer, got {shorten(value)}")
    return value


class Task(ABC):
    """A behaviour as prompt pairs: subclasses set ``name`` and ``description`` and draw candidates."""

    name: ClassVar[str]
    """Registry name (``get_task``)."""
    description: ClassVar[str]
    """One line: the behaviour, the noise, the answers."""
    needs_backend: ClassVar[bool] = False
    """Whether drawing needs the model (its answers are the model's own predictions)."""

    @abstractmethod
    def prepare(self, tokenize: Tokenize | None) -> Any:
        """What ``draw`` draws from (word lists, facts), restricted to single tokens when ``tokenize`` is given."""

    @abstractmethod
    def draw(self, rng: random.Random, material: Any) -> Pair | None:
        """One candidate pair (None: this draw failed; the next one is tried)."""

    def complete(self, pairs: list[Pair], backend: Any) -> list[Pair | None]:
        """The candidates with what only the model knows filled in (None: a candidate to skip). Default: as drawn."""
        return list(pairs)

    def labelled_pairs(self, n_pairs: int, seed: int = 0, *, tokenize: Tokenize | None = None,
                       backend: AbstractBackend | None = None) -> list[Pair]:
        """``n_pairs`` checked pairs (module docstring), the same ones for the same seed (and model).

        ``backend`` supplies the tokenizer when ``tokenize`` is not given, and the model for tasks that
        need it. A ``PlanError`` when arguments are bad or too few candidates pass the checks."""
        n_pairs, seed = check_count(n_pairs, "n_pairs"), check_seed(seed)
        if self.needs_backend and backend is None:
            raise PlanError(f"backend: task {self.name!r} reads its answers off the model; pass backend=")
        if tokenize is None and backend is not None:
            tokenize = tokenizer_of(backend)
        material = self.prepare(tokenize)
        rng = random.Random(seed)
        chunk = COMPLETE_CHUNK if self.needs_backend else 1
        kept: list[Pair] = []
        pending: list[Pair] = []
        seen: set[tuple[str, str]] = set()
        skipped: dict[str, int] = {}
        for _ in range(TRIES_PER_PAIR * n_pairs):
            pair = self.draw(rng, material)
            reason = None if pair is None else self._problem(pair, tokenize, seen)
            if pair is None or reason is not None:
                skipped[reason or "draw failed"] = skipped.get(reason or "draw failed", 0) + 1
                continue
            seen.add((pair.clean, pair.noise))
            pending.append(pair)
            if len(pending) == chunk:
                kept.extend(self._completed(pending, backend, tokenize, skipped))
                pending = []
            if len(kept) >= n_pairs:
                return kept[:n_pairs]
        kept.extend(self._completed(pending, backend, tokenize, skipped) if pending else [])
        if len(kept) >= n_pairs:
            return kept[:n_pairs]
        why = ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items())) or "none drawn"
        raise PlanError(f"n_pairs: task {self.name!r} found only {len(kept)} of {n_pairs} pairs in "
                        f"{TRIES_PER_PAIR * n_pairs} draws (skipped: {why})")

    def pairs(self, n_pairs: int, seed: int = 0, *, tokenize: Tokenize | None = None,
              backend: AbstractBackend | None = None) -> list[dict[str, Any]]:
        """``labelled_pairs`` as plan prompt dicts."""
        return [p.prompt() for p in self.labelled_pairs(n_pairs, seed, tokenize=tokenize, backend=backend)]

    def _completed(self, pending: list[Pair], backend: Any, tokenize: Tokenize | None, skipped: dict[str, int]) -> list[Pair]:
        """The pending candidates, completed (``complete``) and with their answers checked."""
        done = []
        for pair in self.complete(pending, backend):
            reason = "dropped after the model run" if pair is None else self._answer_problem(pair, tokenize)
            if reason is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
            elif pair is not None:
                done.append(pair)
        return done

    def _problem(self, pair: Pair, tokenize: Tokenize | None, seen: set[tuple[str, str]]) -> str | None:
        if pair.clean == pair.noise:
            return "noise equals clean"
        if (pair.clean, pair.noise) in seen:
            return "duplicate"
        if tokenize is not None and len(tokenize(pair.clean)) != len(tokenize(pair.noise)):
            return "clean and noise lengths differ"
        return None

    @staticmethod
    def _answer_problem(pair: Pair, tokenize: Tokenize | None) -> str | None:
        if pair.answer == pair.wrong_answer:
            return "answer equals wrong_answer"
        if tokenize is not None:
            for answer in (pair.answer, pair.wrong_answer):
                if isinstance(answer, str) and len(tokenize(answer)) != 1:
                    return "answer not one token"
        return None


def with_answers(pair: Pair, answer: str | int, wrong_answer: str | int) -> Pair:
    """``pair`` with its answers set (for ``Task.complete``)."""
    return replace(pair, answer=answer, wrong_answer=wrong_answer)
