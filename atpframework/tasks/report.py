"""How well a model performs a task, and the rule that keeps only what it performs.

A pair is *performed* when the model gets the clean prompt right and the noise prompt moves it the
expected way: clean ``logit_diff`` > 0 (the answer beats the wrong answer) and noise ``logit_diff`` below
the clean one. A task's accuracy is the fraction of performed pairs; it is *kept* when its accuracy is
at least ``THRESHOLD``. Within a kept task, ``TaskReport.kept`` keeps only the performed pairs (and says
how many were dropped), and ``performed_pairs`` draws until it has enough of them, so attributions
explain a behaviour the model shows. ``logit_diff`` is read as a plan's metric reads it: at the last
position, with the text prompts tokenized as ``af.run`` tokenizes them.
"""

import math
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from atpframework.errors import PlanError
from atpframework.io.tables import render_table, text_table
from atpframework.model.backend import AbstractBackend
from atpframework.tasks.base import Pair, Task, check_count, tokenizer_of
from atpframework.tasks.forward import final_logits

THRESHOLD = 0.8
"""Least accuracy of a task the model is said to perform."""


@dataclass(frozen=True)
class TaskReport:
    """One task's pairs on one model, their clean and noise ``logit_diff``, and what follows from them."""

    task: str
    pairs: list[Pair]
    clean: list[float]
    """Clean ``logit_diff`` per pair."""
    noise: list[float]
    """Noise ``logit_diff`` per pair."""
    threshold: float = THRESHOLD

    @property
    def performed(self) -> list[bool]:
        """Per pair: clean > 0 and noise < clean (module docstring)."""
        return [c > 0 and z < c for c, z in zip(self.clean, self.noise)]

    @property
    def accuracy(self) -> float:
        """Fraction of pairs performed."""
        return sum(self.performed) / len(self.pairs)

    @property
    def flipped(self) -> float:
        """Fraction of pairs whose noise ``logit_diff`` is negative: the noise run prefers the wrong answer."""
        return sum(z < 0 for z in self.noise) / len(self.pairs)

    @property
    def performs(self) -> bool:
        """Whether the task is kept: accuracy >= ``threshold``."""
        return self.accuracy >= self.threshold

    @property
    def kept(self) -> list[dict[str, Any]]:
        """The performed pairs, as plan prompt dicts."""
        return [p.prompt() for p, ok in zip(self.pairs, self.performed) if ok]

    @property
    def dropped(self) -> int:
        """How many pairs the model does not perform."""
        return len(self.pairs) - sum(self.performed)

    @property
    def by_group(self) -> dict[str, tuple[int, int]]:
        """Template (or other group) -> (pairs performed, pairs)."""
        counts: dict[str, tuple[int, int]] = {}
        for pair, ok in zip(self.pairs, self.performed):
            done, total = counts.get(pair.group, (0, 0))
            counts[pair.group] = (done + ok, total + 1)
        return dict(sorted(counts.items()))

    def summary(self) -> dict[str, Any]:
        """The numbers of the report as plain JSON values."""
        return {"task": self.task, "pairs": len(self.pairs), "accuracy": self.accuracy, "flipped": self.flipped,
                "clean_mean": _mean(self.clean), "clean_std": _std(self.clean), "noise_mean": _mean(self.noise),
                "noise_std": _std(self.noise), "dropped": self.dropped, "performs": self.performs,
                "by_group": {k: list(v) for k, v in self.by_group.items()}}


def logit_diffs(backend: AbstractBackend, pairs: list[Pair]) -> tuple[Tensor, Tensor]:
    """Clean and noise ``logit_diff`` (answer minus wrong answer, last position) of each pair."""
    tokenize = tokenizer_of(backend)

    def token(answer: str | int | None, field: str) -> int:
        if isinstance(answer, int):
            return answer
        ids = tokenize(answer) if isinstance(answer, str) else []
        if len(ids) != 1:
            raise PlanError(f"{field}: expected one token, got {answer!r} ({len(ids)} tokens)")
        return ids[0]

    answers = torch.tensor([token(p.answer, "answer") for p in pairs])
    wrong = torch.tensor([token(p.wrong_answer, "wrong_answer") for p in pairs])
    logits = final_logits(backend, [p.clean for p in pairs] + [p.noise for p in pairs])
    rows = torch.arange(len(pairs))
    clean, noise = logits[: len(pairs)], logits[len(pairs) :]
    return clean[rows, answers] - clean[rows, wrong], noise[rows, answers] - noise[rows, wrong]


def task_report(task: Task, backend: AbstractBackend, n_pairs: int = 64, seed: int = 0,
                threshold: float = THRESHOLD) -> TaskReport:
    """Run the model on ``n_pairs`` pairs of ``task`` (seeded) and report how well it performs them."""
    pairs = task.labelled_pairs(n_pairs, seed, backend=backend)
    clean, noise = logit_diffs(backend, pairs)
    return TaskReport(task.name, pairs, clean.tolist(), noise.tolist(), threshold)


def performed_pairs(task: Task, backend: AbstractBackend, n_pairs: int, seed: int = 0, max_factor: int = 8) -> list[Pair]:
    """The first ``n_pairs`` performed pairs of ``task`` for ``seed``: draws ``n_pairs``, then twice as many,
    and so on up to ``max_factor`` times; a ``PlanError`` if even then too few are performed."""
    check_count(n_pairs, "n_pairs")
    drawn = n_pairs
    while True:
        report = task_report(task, backend, drawn, seed)
        kept = [p for p, ok in zip(report.pairs, report.performed) if ok]
        if len(kept) >= n_pairs:
            return kept[:n_pairs]
        if drawn >= max_factor * n_pairs:
            raise PlanError(f"n_pairs: the model performs only {len(kept)} of {drawn} pairs of task {task.name!r} "
                            f"(accuracy {report.accuracy:.2f}); ask for fewer pairs")
        drawn = min(2 * drawn, max_factor * n_pairs)


def report_table(reports: list[TaskReport]) -> str:
    """One line per task: pairs, accuracy, noise flips, clean and noise ``logit_diff`` (mean +- std), dropped, kept."""
    table = text_table("<task", "pairs", "performed", "noise < 0", "clean logit diff", "noise logit diff", "dropped", "<kept")
    for r in reports:
        table.add_row(r.task, str(len(r.pairs)), f"{r.accuracy:.2f}", f"{r.flipped:.2f}",
                      f"{_mean(r.clean):+.2f} +- {_std(r.clean):.2f}", f"{_mean(r.noise):+.2f} +- {_std(r.noise):.2f}",
                      str(r.dropped), "yes" if r.performs else "no")
    return render_table(table)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan
