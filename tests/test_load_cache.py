"""The TransformerLens backend's converted-weights cache (``backends/tl_cache.py``, used for bundled models) and its
one-call weight loading, on tiny GPT-2 directories: a cached load is bit-identical to TransformerLens's own
``load_and_process_state_dict`` path, skips the Hugging Face model, follows changed weights and survives a
broken entry."""

import dataclasses
import os

import pytest
import torch
import transformers
from conftest import D_VOCAB, save_tiny_gpt2

from atpframework import BackendError
from atpframework.backends import transformer_lens as tl_backend
from atpframework.backends.transformer_lens import TransformerLensBackend
from atpframework.model.bundled import file_digest

TOKENS = torch.tensor([[1, 5, 9, 2, 7, 3]])


def load(path, cache):
    return TransformerLensBackend._from_hf_dir(path, "tiny", torch.float32, "cpu", "hooked_transformer", prepend_bos=False, cache=cache)


def tl_reference(path, monkeypatch):
    """The model as TransformerLens's ``load_and_process_state_dict`` (one ``load_state_dict`` per key) builds it."""
    def processed(model, state):
        model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                          fold_value_biases=False)

    with monkeypatch.context() as patch:
        patch.setattr(tl_backend, "_load_unprocessed", processed)
        return load(path, cache=False)


def assert_identical(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    # tokenizer_name: the temporary directory the conversion read, another one each load
    assert dataclasses.replace(a.model.cfg, tokenizer_name=None) == dataclasses.replace(b.model.cfg, tokenizer_name=None)
    with torch.no_grad():
        assert torch.equal(a.forward(TOKENS, {}), b.forward(TOKENS, {}))


def entries(path):
    return sorted((path / "transformer_lens").glob("*.safetensors"))


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny_gpt2(tmp_path / "gpt2")


def test_a_cached_load_equals_transformer_lens_own_path_and_skips_the_hugging_face_model(model_dir, monkeypatch):
    reference = tl_reference(model_dir, monkeypatch)
    first = load(model_dir, cache=True)  # converts, and stores the entry
    assert len(entries(model_dir)) == 1
    assert_identical(first, reference)

    def no_hf_model(*args, **kwargs):
        raise AssertionError("a cached load must not load the Hugging Face model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_hf_model)
    cached = load(model_dir, cache=True)
    assert_identical(cached, reference)
    with pytest.raises(BackendError, match="must not load"):
        load(model_dir, cache=False)  # the uncached path does load it (so the check above means something)


def test_changed_weights_get_a_new_entry_not_the_stale_one(model_dir, monkeypatch, tmp_path):
    load(model_dir, cache=True)
    old_digest = file_digest(model_dir / "model.safetensors")
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=D_VOCAB, n_positions=32)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(model_dir)  # other weights, same file size
    assert file_digest(model_dir / "model.safetensors") != old_digest
    reloaded = load(model_dir, cache=True)
    assert len(entries(model_dir)) == 2
    assert_identical(reloaded, tl_reference(model_dir, monkeypatch))
    assert_identical(load(model_dir, cache=True), reloaded)


def test_a_broken_entry_is_ignored_and_rewritten(model_dir, monkeypatch):
    reference = load(model_dir, cache=True)
    (entry,) = entries(model_dir)
    entry.write_bytes(b"not a safetensors file")
    assert_identical(load(model_dir, cache=True), reference)
    assert entry.stat().st_size > 1000  # rewritten whole
    assert_identical(load(model_dir, cache=True), reference)


def test_the_file_digest_is_remembered_and_recomputed_when_the_file_changes(tmp_path):
    import hashlib

    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    assert file_digest(path) == hashlib.sha256(b"abc").hexdigest()
    memo = tmp_path / "w.bin.sha256.json"
    assert memo.exists()
    stamp = path.stat().st_mtime_ns
    path.write_bytes(b"abd")  # same size; the clock may not have ticked since the first write, so move it on
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    assert file_digest(path) == hashlib.sha256(b"abd").hexdigest()
