"""Hugging Face tokenizer helpers the built-in backends share (both tokenize with a ``transformers`` tokenizer)."""

from collections.abc import Sequence
from typing import Any

from atpframework.errors import PlanError


def usable_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer``, or None when it has no vocabulary (transformers builds an empty one for a
    directory without tokenizer files, which would turn every text prompt into no tokens)."""
    try:
        return tokenizer if tokenizer is not None and len(tokenizer) > 1 else None
    except TypeError:
        return tokenizer


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether a Hugging Face tokenizer puts its BOS token in front by itself."""
    if tokenizer is None or tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def decode_each(tokenizer: Any, ids: Sequence[int]) -> list[str] | None:
    """Each token id decoded on its own (``" Mary"``; a piece of a multi-byte character decodes to ``"\ufffd"``),
    or None without a tokenizer or for an id outside its vocabulary."""
    if tokenizer is None or any(not 0 <= i < len(tokenizer) for i in ids):
        return None
    return list(tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False))


def tokenize_text(tokenizer: Any, text: str, prepend_bos: bool) -> list[int]:
    """Token ids of ``text`` with a Hugging Face tokenizer, BOS prepended on request (never twice)."""
    if tokenizer is None:
        raise PlanError(
            "prompts: this model has no tokenizer; give prompts as token ids (and answer, wrong_answer too). "
            "Its directory has no tokenizer files, or the model object carries none"
        )
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise PlanError("prepend_bos: the tokenizer has no BOS token")
        ids = [tokenizer.bos_token_id] + ids
    return ids
