"""No silent wrong results: where outputs may go and what they may replace, finite numbers, the
metric contract, checks that come before any work, and the CLI's one error path.

Each test is a regression test of a defect found by probing the edges (each failed on the old code).
"""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import make_plan, save_tiny_gpt2, tiny_model

import atpframework as af
from atpframework.engine.checkpoint import sidecar_path
from atpframework.errors import NonFiniteError, PlanError
from atpframework.io.results import load_result

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
HEADS = [{"kind": "attn_head"}]


def _atpf(*args, cwd):
    return subprocess.run([sys.executable, "-m", "atpframework", *map(str, args)], cwd=cwd, capture_output=True, text=True, env=ENV)


def _hf_plan(model_dir, **extra):
    return make_plan(HEADS, model={"source": str(model_dir), "backend": "huggingface"}, **extra)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


# ------------------------------------------------------------------ outputs
def test_a_plan_cannot_write_outside_its_folder_or_the_working_directory(tmp_path, gpt2_dir):
    (tmp_path / "plans").mkdir()
    (tmp_path / "work").mkdir()
    victim = tmp_path / "victim.safetensors"
    (tmp_path / "plans" / "p.json").write_text(json.dumps(_hf_plan(gpt2_dir, output="../victim.safetensors")))
    done = _atpf("../plans/p.json", cwd=tmp_path / "work")
    assert done.returncode == 2 and "output:" in done.stderr and "outside" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not victim.exists()
    with pytest.raises(PlanError, match="output: .* outside"):
        af.run(tmp_path / "plans" / "p.json")
    # the same path on the command line is the user's own choice
    done = _atpf("../plans/p.json", "-o", victim, cwd=tmp_path / "work")
    assert done.returncode == 0, done.stderr
    assert load_result(victim).method == "atp"


def test_a_symlink_does_not_let_a_plan_escape(tmp_path, gpt2_dir):
    (tmp_path / "plans").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "plans" / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "plans" / "p.json").write_text(json.dumps(_hf_plan(gpt2_dir, output="link/r.safetensors")))
    done = _atpf("p.json", "--dry-run", cwd=tmp_path / "plans")
    assert done.returncode == 2 and "outside" in done.stderr, done.stderr
    assert not (tmp_path / "elsewhere" / "r.safetensors").exists()


def test_a_plans_output_is_relative_to_the_plan_file(tmp_path, gpt2_dir):
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "p.json").write_text(json.dumps(_hf_plan(gpt2_dir, output="r.safetensors")))
    done = _atpf("plans/p.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "plans" / "r.safetensors").exists() and not (tmp_path / "r.safetensors").exists()


def test_an_existing_file_is_replaced_only_if_it_is_a_result(tmp_path, gpt2_dir):
    precious = tmp_path / "notes.safetensors"
    precious.write_text("my notes")
    plan = _hf_plan(gpt2_dir)
    (tmp_path / "p.json").write_text(json.dumps(plan))
    done = _atpf("p.json", "-o", precious.name, cwd=tmp_path)
    assert done.returncode == 2 and "not an atpframework result" in done.stderr and "--overwrite" in done.stderr
    assert precious.read_text() == "my notes"
    with pytest.raises(PlanError, match="not an atpframework result"):
        af.run(plan, output=precious)
    assert precious.read_text() == "my notes"
    first = af.run(plan, output=tmp_path / "r.safetensors")  # a result is replaced as before
    assert af.run(plan, output=tmp_path / "r.safetensors").plan_json == first.plan_json
    done = _atpf("p.json", "-o", precious.name, "--overwrite", cwd=tmp_path)
    assert done.returncode == 0 and load_result(precious).method == "atp"


def test_a_folder_or_an_empty_path_is_no_output(tmp_path, gpt2_dir):
    (tmp_path / "out.safetensors").mkdir()
    (tmp_path / "p.json").write_text(json.dumps(_hf_plan(gpt2_dir, output="out.safetensors")))
    done = _atpf("p.json", "--dry-run", cwd=tmp_path)
    assert done.returncode == 2 and "is a folder" in done.stderr
    (tmp_path / "q.json").write_text(json.dumps(_hf_plan(gpt2_dir, output="")))
    done = _atpf("q.json", "--dry-run", cwd=tmp_path)
    assert done.returncode == 2 and "output" in done.stderr and "Traceback" not in done.stderr
    assert "loaded" not in done.stderr  # refused before the model loads


def test_a_checkpoint_folder_with_foreign_files_is_neither_used_nor_removed(tmp_path, gpt2_dir):
    out = tmp_path / "r.safetensors"
    side = sidecar_path(out)
    side.mkdir()
    (side / "thesis.tex").write_text("years of work")
    with pytest.raises(PlanError, match="did not write"):
        af.run(_hf_plan(gpt2_dir), output=out)
    assert (side / "thesis.tex").read_text() == "years of work" and not out.exists()


def test_long_paths_are_cut_in_messages(tmp_path, gpt2_dir):
    plan = _hf_plan(gpt2_dir, output="../" + "x" * 100_000 + ".safetensors")
    (tmp_path / "p.json").write_text(json.dumps(plan))
    done = _atpf("p.json", "--dry-run", cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr) < 2500, len(done.stderr)


# ------------------------------------------------------------------ checks before any work
def test_problems_found_before_loading_are_reported_together(tmp_path, gpt2_dir):
    plan = _hf_plan(gpt2_dir, output="/outside/r.safetensors")
    plan["model"]["device"] = "cuda:7"
    (tmp_path / "p.json").write_text(json.dumps(plan))
    done = _atpf("p.json", "--dry-run", cwd=tmp_path)
    assert done.returncode == 2 and "and 1 more problem(s) before the run" in done.stderr
    assert "output:" in done.stderr and "model.device: 'cuda:7' is not available" in done.stderr


def test_the_cli_refuses_a_custom_metric_before_loading(tmp_path, gpt2_dir):
    plan = _hf_plan(gpt2_dir, metric="custom", output="r.safetensors")
    (tmp_path / "p.json").write_text(json.dumps(plan))
    done = _atpf("p.json", "--dry-run", cwd=tmp_path)  # the old code passed the dry run
    assert done.returncode == 2 and "metric.name: 'custom' needs a metric callable" in done.stderr, done.stderr


@pytest.mark.parametrize("command", ["run", "show"])
def test_a_negative_top_is_a_usage_error(tmp_path, command):
    done = _atpf(command, "x.json", "--top", "-1", cwd=tmp_path)
    assert done.returncode == 2 and "--top" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_prompt_problems_are_reported_together_at_compile_time(tmp_path, gpt2_dir):
    long = list(range(1, 41))  # the tiny GPT-2 has 32 positions
    prompts = [
        {"clean": long, "noise": long[::-1], "answer": 3, "wrong_answer": 4},
        {"clean": [1, 2, 3], "noise": [1, 2], "answer": 3, "wrong_answer": 4},
        {"clean": [1, 2, 3], "noise": [1, 2, 4], "answer": 3, "wrong_answer": 4},
    ]
    (tmp_path / "p.json").write_text(json.dumps(_hf_plan(gpt2_dir, prompts=prompts, output="r.safetensors")))
    done = _atpf("p.json", "--dry-run", cwd=tmp_path)  # the old code passed the dry run and failed mid-run
    assert done.returncode == 2, done.stderr
    assert "prompts[0]: 40 tokens, longer than the model's context of 32 tokens" in done.stderr
    assert "prompts[1]: the clean prompt is 3 tokens and the noise prompt 2" in done.stderr


def test_cross_entropy_refuses_one_token_prompts(gpt2_dir):
    plan = _hf_plan(gpt2_dir, metric="cross_entropy", prompts=[{"clean": [5], "noise": [6]}])
    with pytest.raises(PlanError, match=r"prompts\[0\]: cross_entropy needs at least 2 tokens"):
        af.compile(plan)


def test_text_prompts_on_a_model_without_tokenizer_say_so(gpt2_dir):
    plan = _hf_plan(gpt2_dir, prompts=[{"clean": "hello there", "noise": "hello where", "answer": 3, "wrong_answer": 4}])
    with pytest.raises(PlanError, match="no tokenizer.*token ids"):
        af.compile(plan)


# ------------------------------------------------------------------ finite numbers
def _poisoned(kind):
    model = tiny_model()
    with torch.no_grad():
        if kind == "scaled":
            for p in model.parameters():
                p.mul_(1e30)
        else:
            model.blocks[1].attn.W_V[0, 0, 0] = float(kind)
    return model


@pytest.mark.parametrize("method", ["atp", "atp_star", "activation_patching"])
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_a_non_finite_weight_is_an_error_naming_its_site(tmp_path, method, kind):
    out = tmp_path / "r.safetensors"
    with pytest.raises(NonFiniteError, match="site attn_v at layer 1"):
        af.run(make_plan(HEADS, method=method), model=_poisoned(kind), output=out)
    assert not out.exists()


@pytest.mark.parametrize("method", ["atp", "activation_patching"])
def test_overflowing_weights_are_an_error_not_all_zero_scores(method):
    with pytest.raises(NonFiniteError, match="logits, which are equal for every token"):
        af.run(make_plan(HEADS, method=method), model=_poisoned("scaled"))


def test_all_zero_scores_of_a_healthy_model_are_accepted():
    """Noise prompts equal to the clean ones: every effect is 0, and that is a finding, not an error."""
    same = [{"clean": [1, 2, 3, 4], "noise": [1, 2, 3, 4], "answer": 3, "wrong_answer": 4}]
    result = af.run(make_plan(HEADS, method="activation_patching", prompts=same), model=tiny_model())
    assert not result["attn_head"].per_pair.any()


# ------------------------------------------------------------------ the metric contract
def _logit_diff(logits, inputs):
    final = logits[:, inputs.position]
    return final.gather(1, inputs.answer[:, None])[:, 0] - final.gather(1, inputs.wrong_answer[:, None])[:, 0]


BAD_METRICS = {
    "batch mean": (lambda logits, inputs: _logit_diff(logits, inputs).mean(), r"shape \(\).*batch mean"),
    "two columns": (lambda logits, inputs: torch.stack([_logit_diff(logits, inputs)] * 2, 1), r"shape \(2, 2\)"),
    "python float": (lambda logits, inputs: float(_logit_diff(logits, inputs).sum()), "returned a float"),
    "constant": (lambda logits, inputs: torch.ones(logits.shape[0]), "does not depend on the logits"),
    "integer": (lambda logits, inputs: logits[:, -1].argmax(-1), "dtype torch.int64"),
    "mixes pairs": (lambda logits, inputs: _logit_diff(logits, inputs).mean().expand(logits.shape[0]), "other pairs"),
    "raises": (lambda logits, inputs: logits[:, :, 10**6], "the metric failed"),
}


@pytest.mark.parametrize("method", ["atp", "activation_patching"])
@pytest.mark.parametrize("name", sorted(BAD_METRICS))
def test_a_custom_metric_that_breaks_the_contract_is_a_plan_error(name, method):
    metric, message = BAD_METRICS[name]
    with pytest.raises(PlanError, match=f"metric: .*{message}"):
        af.run(make_plan(HEADS, method=method, metric="custom"), model=tiny_model(), metric=metric)


def test_a_custom_metric_honouring_the_contract_equals_the_built_in():
    model = tiny_model()
    custom = af.run(make_plan(HEADS, metric="custom"), model=model, metric=_logit_diff)
    builtin = af.run(make_plan(HEADS), model=model)
    torch.testing.assert_close(custom["attn_head"].per_pair, builtin["attn_head"].per_pair, rtol=0, atol=0)


# ------------------------------------------------------------------ received files
def test_verify_says_which_model_it_loads_and_takes_another(tmp_path, gpt2_dir):
    plan = _hf_plan(gpt2_dir)
    result = af.run(plan, output=tmp_path / "r.safetensors")
    moved = tmp_path / "moved"
    save_tiny_gpt2(moved)  # the same seeded weights, at another path
    data = json.loads(result.plan_json)
    data["model"]["source"] = str(tmp_path / "gone")  # a file naming a model that is not here
    af.AttributionResult(**{**result.__dict__, "plan_json": json.dumps(data)}).save(tmp_path / "r.safetensors")
    done = _atpf("verify", "r.safetensors", "--budget", "3", cwd=tmp_path)
    assert done.returncode in (1, 2) and f"loading model '{tmp_path / 'gone'}'" in done.stderr
    assert "--model SOURCE loads another" in done.stderr and "Traceback" not in done.stderr
    done = _atpf("verify", "r.safetensors", "--budget", "3", "--model", moved, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"loading model '{moved}'" in done.stderr and "(--model)" in done.stderr
    verified = load_result(tmp_path / "r.safetensors").verified["attn_head"]
    heads = result["attn_head"].per_pair.flatten(1)  # exact patching: atp on this model differs, so compare
    reference = af.run(make_plan(HEADS, method="activation_patching", model={"source": str(moved), "backend": "huggingface"}))
    torch.testing.assert_close(verified.effects, reference["attn_head"].per_pair.flatten(1)[:, verified.index], rtol=1e-5, atol=1e-6)
    assert heads.shape[1] == reference["attn_head"].per_pair.flatten(1).shape[1]


def test_verify_refuses_a_model_other_than_the_results(tmp_path, gpt2_dir):
    af.run(_hf_plan(gpt2_dir), output=tmp_path / "r.safetensors")
    before = (tmp_path / "r.safetensors").read_bytes()
    other = tmp_path / "other"
    save_tiny_gpt2(other)
    weights = other / "model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    tensors["transformer.h.1.mlp.c_fc.weight"] = tensors["transformer.h.1.mlp.c_fc.weight"] * 3  # another model
    save_file(tensors, weights, metadata={"format": "pt"})
    done = _atpf("verify", "r.safetensors", "--budget", "3", "--model", other, cwd=tmp_path)
    assert done.returncode == 2 and "is not the model this result was computed with" in done.stderr, done.stderr
    assert (tmp_path / "r.safetensors").read_bytes() == before  # nothing stored (the old code stored its effects)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_sae_loading_refuses_pickled_objects_whatever_the_environment(tmp_path, monkeypatch, capsys):
    from atpframework.model.sae import weights_only_loading

    path = tmp_path / "sae.pt"
    torch.save({"W_enc": _Payload()}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.load(path, weights_only=False)  # outside: the pickle runs code, as sae_lens's loaders would let it
    assert "code ran while loading" in capsys.readouterr().out
    with weights_only_loading(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=False)
    assert "code ran" not in capsys.readouterr().out
    assert torch.load.__module__ == "torch.serialization"  # restored


# ------------------------------------------------------------------ the CLI's one error path
def test_unexpected_failures_are_one_line_without_exception_types():
    from atpframework.cli import _classify

    code, message = _classify(ValueError("first line\nsecond line " + "y" * 10_000))
    assert code == 1 and "ValueError" not in message and "second line" not in message and len(message) < 400
    code, message = _classify(FileNotFoundError(2, "No such file or directory", "/x/y"))
    assert code == 1 and message == "cannot access '/x/y': No such file or directory"
    assert _classify(PlanError("nodes[0].kind: bad"))[0] == 2
    assert _classify(NonFiniteError("a score is NaN"))[0] == 1


def test_built_in_metrics_without_their_answers_are_plan_errors_not_asserts():
    from atpframework.plans.metrics import MetricInputs, logit_diff, logprob

    inputs = MetricInputs(tokens=torch.zeros(2, 3, dtype=torch.long), answer=None, wrong_answer=None, position=-1)
    for metric, needs in ((logit_diff, "answer and a wrong_answer"), (logprob, "answer token")):
        with pytest.raises(PlanError, match=f"metric: {metric.__name__} needs an {needs}"):
            metric(torch.zeros(2, 3, 5), inputs)


def test_a_node_selection_of_the_wrong_type_is_a_plan_error():
    from atpframework.model.node import resolve_axis

    for bad in ("some", 3, [1, "x"], [True]):
        with pytest.raises(PlanError, match=r"nodes\[0\]\.heads: allowed: 'each', 'all' or a list of head indices"):
            resolve_axis(bad, "head", 4, "nodes[0].heads", allow_negative=False)
