"""Running the model on task prompts: final-position logits of many text prompts, batched by length."""

from collections.abc import Sequence

import torch
from torch import Tensor

from atpframework.model.backend import AbstractBackend
from atpframework.model.interventions import Intervention

BATCH_SIZE = 16
"""Prompts per forward pass."""


def final_logits(backend: AbstractBackend, prompts: Sequence[str], batch_size: int = BATCH_SIZE) -> Tensor:
    """Logits ``prompt vocab`` at the last position of each prompt, tokenized as a plan's text prompts are
    (``prepend_bos`` left to the model's default), in float32 on the CPU. Prompts of one length share a pass."""
    tokens = [backend.tokenize(text, None) for text in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(tokens):
        by_length.setdefault(len(ids), []).append(i)
    rows: dict[int, Tensor] = {}
    with torch.no_grad():
        for length in sorted(by_length):
            members = by_length[length]
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                batch = torch.tensor([tokens[i] for i in chunk], device=backend.device)
                last = Intervention().run(backend, batch)[:, -1].float().cpu()
                rows.update(zip(chunk, last))
    return torch.stack([rows[i] for i in range(len(prompts))])
