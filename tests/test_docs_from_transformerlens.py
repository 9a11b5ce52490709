"""docs/from-transformerlens.md runs as written: its Python blocks execute in order, in one namespace, with a
tiny random HookedTransformer (and a word-level tokenizer built from the page's own words) in place of GPT-2
small. The blocks' own ``assert_close`` lines compare atpframework's scores with ``transformer_lens.patching``
(noising and denoising) and with attribution patching written by hand with TransformerLens hooks."""

import re
import warnings
from pathlib import Path

import torch
from conftest import tiny_config

PAGE = Path(__file__).resolve().parents[1] / "docs" / "from-transformerlens.md"
LOAD = 'HookedTransformer.from_pretrained("gpt2-small")'
WORD = r" ?[A-Za-z0-9_'.,!?]+"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def word_tokenizer(text: str, folder: Path):
    """A word-level tokenizer (each word with its leading space is one token, as " Mary" is in GPT-2), saved and
    reloaded from ``folder`` so that TransformerLens can rebuild it with a BOS token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = sorted(set(re.findall(WORD, text)))
    vocab = {w: i for i, w in enumerate(["<bos>", "<unk>", "<pad>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(WORD), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", unk_token="<unk>", pad_token="<pad>").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tiny_model_with_tokenizer(tokenizer):
    """Like conftest.tiny_model (two heads: transformer_lens.patching runs one pass per head and position), with
    ``tokenizer`` and its vocabulary; left in training mode, as from_pretrained leaves it."""
    from transformer_lens import HookedTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(tiny_config(d_vocab=len(tokenizer), n_ctx=64, n_heads=2, d_head=16), tokenizer=tokenizer)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def test_the_pages_python_runs_and_its_checks_pass(tmp_path, monkeypatch):
    text = PAGE.read_text()
    blocks = python_blocks(text)
    assert len(blocks) >= 6
    code = "\n".join(blocks)
    assert code.count(LOAD) == 1
    tokenizer = word_tokenizer(text, tmp_path / "tokenizer")
    namespace = {"__name__": "from_transformerlens", "_tiny_gpt2": lambda: tiny_model_with_tokenizer(tokenizer)}
    monkeypatch.chdir(tmp_path)  # the page saves a result file
    exec(compile(code.replace(LOAD, "_tiny_gpt2()"), str(PAGE), "exec"), namespace)

    # the page's checks compared something: the effects are not all zero, and the tokens are real words
    assert namespace["model"].to_str_tokens(namespace["clean_tokens"])[1:4] == ["When", " Mary", " and"]
    assert "<unk>" not in namespace["model"].to_str_tokens(namespace["corrupted_tokens"])
    for name in ("effects", "by_hand", "recovered"):
        assert namespace[name].abs().max() > 1e-3, name
    assert (tmp_path / "ioi_heads.safetensors").exists()
    assert namespace["result"].plan["model"]["backend"] == "transformer_lens"
    assert namespace["result"].plan["nodes"][0]["kind"] == "attn_head"
    assert namespace["by_prob"]["attn_head"].per_pair.abs().max() > 0


def test_a_wrong_claim_on_the_page_would_fail(tmp_path, monkeypatch):
    """The page's checks can fail: with the denoising baseline taken from the wrong prompt they do."""
    text = PAGE.read_text()
    blocks = python_blocks(text)
    code = "\n".join(blocks[: next(i for i, b in enumerate(blocks) if "corrupted_baseline" in b) + 1])
    broken = code.replace("corrupted_baseline = logit_diff(model(corrupted_tokens))", "corrupted_baseline = logit_diff(model(clean_tokens))")
    assert broken != code
    tokenizer = word_tokenizer(text, tmp_path / "tokenizer")
    namespace = {"__name__": "from_transformerlens", "_tiny_gpt2": lambda: tiny_model_with_tokenizer(tokenizer)}
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(broken.replace(LOAD, "_tiny_gpt2()"), str(PAGE), "exec"), namespace)
    except AssertionError:
        return
    raise AssertionError("the page's denoising check passed with the wrong baseline")
