"""One model load per workflow (``af.Session``, ``atpf run --verify N --diagnose``) against the separate calls,
which load the model each time and are the reference; and progress bars on stderr, silenced by
``progress=False`` / ``--quiet``."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_plan, tiny_model

import atpframework as af
from atpframework.analysis.compare import compare
from atpframework.analysis.verify import diagnose, verified_effects, verify
from atpframework.backends.transformer_lens import TransformerLensBackend
from atpframework.cli import main

BAR = "%|"
"""What every tqdm bar line holds (the percentage before the bar)."""


@pytest.fixture
def loads(monkeypatch):
    """Counts ``TransformerLensBackend.load`` calls (each one a model load from ``model.source``)."""
    calls = []
    original = TransformerLensBackend.load.__func__

    def counted(cls, source, **kwargs):
        calls.append(source)
        return original(cls, source, **kwargs)

    monkeypatch.setattr(TransformerLensBackend, "load", classmethod(counted))
    return calls


@pytest.fixture
def plan_file(tmp_path, hf_dir):
    plan = make_plan([{"kind": "attn_head"}, {"kind": "mlp_neuron", "positions": [-1]}], method="atp_star",
                     model={"source": str(hf_dir)}, output="separate.safetensors")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def assert_same_scores(a, b):
    assert set(a.nodes) == set(b.nodes)
    for name in a.nodes:
        assert torch.equal(a[name].per_pair, b[name].per_pair), name
    assert torch.equal(a.metric_clean, b.metric_clean) and torch.equal(a.metric_noise, b.metric_noise)


def assert_same_verification(a, b):
    for x, y in zip(verified_effects(a), verified_effects(b)):
        assert torch.equal(x, y)


# ------------------------------------------------------------------ Session
def test_session_loads_once_and_gives_the_numbers_of_the_separate_calls(plan_file, tmp_path, loads):
    separate = af.run(plan_file, progress=False)
    separate = verify(tmp_path / "separate.safetensors", budget=7, progress=False)
    separate, separate_diagnosis = diagnose(separate, verified_top=10, samples=[16, 40], progress=False)
    assert len(loads) == 3  # the reference loads the model for every step

    loads.clear()
    session = af.Session(plan_file, progress=False)
    assert session.loads == 0 and not loads  # lazy: nothing loaded before the first call needs the model
    result = session.run(output=tmp_path / "session.safetensors")
    result = session.verify(result, budget=7)
    result, diagnosis = session.diagnose(result, verified_top=10, samples=[16, 40])
    assert len(loads) == 1 and session.loads == 1

    assert_same_scores(result, separate)
    assert len(verified_effects(result)[0]) == 10  # 7 verified, 3 more for the diagnostic's top 10
    assert_same_verification(result, separate)
    assert diagnosis.bounds == separate_diagnosis.bounds and diagnosis.worst_node == separate_diagnosis.worst_node
    assert torch.equal(diagnosis.verified_effects, separate_diagnosis.verified_effects)
    assert af.load_result(tmp_path / "session.safetensors").method == "atp_star"


def test_session_compare_reuses_the_model_and_matches_compare(plan_file, loads):
    reference = compare(plan_file, ["atp", "atp_star"], k_max=5, progress=False)
    loads.clear()
    session = af.Session(plan_file, progress=False)
    session.run(output=plan_file.parent / "first.safetensors")
    comparison = session.compare(["atp", "atp_star"], k_max=5)
    assert len(loads) == 1
    for ours, theirs in zip([comparison.ground_truth, *comparison.runs], [reference.ground_truth, *reference.runs]):
        assert ours.name == theirs.name and ours.cost == theirs.cost
        assert_same_scores(ours.result, theirs.result)
    assert [c.costs.tolist() for c in comparison.curves] == [c.costs.tolist() for c in reference.curves]


def test_session_with_a_model_object_equals_the_calls_given_that_model():
    model = tiny_model()
    plan = make_plan([{"kind": "attn_head"}], method="atp")
    session = af.Session(plan, model=model, progress=False)
    result = session.verify(session.run(), budget=5)
    assert session.loads == 1
    reference = verify(af.run(plan, model=model, progress=False), budget=5, model=model, progress=False)
    assert_same_scores(result, reference)
    assert_same_verification(result, reference)


def test_session_with_a_model_object_that_picks_its_backend_verifies_its_own_results(hf_dir):
    """A plan without model.backend runs on the backend the object picks (huggingface here), and its results
    record that backend: the session must take them as its own model's (it refused them before)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    plan = make_plan([{"kind": "attn_head"}], method="atp")
    assert "backend" not in plan["model"]
    session = af.Session(plan, model=model, progress=False)
    estimate = session.run()
    assert estimate.plan["model"]["backend"] == "huggingface"
    result = session.verify(estimate, budget=5)
    assert session.loads == 1
    reference = verify(af.run(plan, model=model, progress=False), budget=5, model=model, progress=False)
    assert_same_scores(result, reference)
    assert_same_verification(result, reference)
    tl_plan = dict(plan, model={"source": "in_memory", "backend": "transformer_lens"})
    with pytest.raises(af.PlanError, match="model.backend"):  # a plan naming another backend is still refused
        session.run(tl_plan)


def test_session_refuses_a_plan_or_result_of_another_model(plan_file, tmp_path, hf_dir, loads):
    session = af.Session(plan_file, progress=False)
    result = session.run(output=tmp_path / "a.safetensors")
    other = make_plan([{"kind": "attn_head"}], model={"source": str(hf_dir), "dtype": "float64"})
    with pytest.raises(af.PlanError, match=r"model: this Session holds model .*float32.* the plan names .*float64"):
        session.run(other)
    foreign = af.run(other, progress=False)
    with pytest.raises(af.PlanError, match="one Session serves one model"):
        session.verify(foreign, budget=3)
    assert len(loads) == 2  # the session's model, and the reference's float64 one: never a second for the session
    assert session.verify(result, budget=3).verification["verified"] == 3  # the session still works


def test_session_without_a_plan_says_what_to_pass():
    session = af.Session(progress=False)
    with pytest.raises(af.PlanError, match="no plan"):
        session.run()
    with pytest.raises(af.PlanError, match="model object or a backend, not both"):
        af.Session(model=tiny_model(), backend=object())


# ------------------------------------------------------------------ progress bars
def test_run_draws_a_bar_on_stderr_and_progress_false_silences_it(capsys):
    model = tiny_model()
    plan = make_plan([{"kind": "attn_head"}], method="atp", batch_size=1)
    shown = af.run(plan, model=model)
    out, err = capsys.readouterr()
    assert out == ""
    assert "atp: prompt pairs" in err and "2/2" in err and BAR in err
    assert "6 passes" in err  # AtP: a noise and a clean forward and one backward per batch, 2 batches
    quiet = af.run(plan, model=model, progress=False)
    out, err = capsys.readouterr()
    assert BAR not in err and "prompt pairs" not in err
    steps = []
    counted = af.run(plan, model=model, progress=steps.append)  # a callable: called per batch, no bar
    assert steps == [1, 1] and BAR not in capsys.readouterr().err
    assert_same_scores(shown, quiet)
    assert_same_scores(shown, counted)
    with pytest.raises(TypeError, match="progress: expected True, False or a callable"):
        af.run(plan, model=model, progress="yes")


def test_verify_diagnose_and_compare_draw_bars_saying_what_runs(capsys):
    model = tiny_model()
    plan = make_plan([{"kind": "attn_head"}], method="atp")
    result = af.run(plan, model=model, progress=False)
    verified = verify(result, budget=5, model=model)
    err = capsys.readouterr().err
    assert "verify: patching nodes" in err and "5/5" in err
    diagnose(verified, verified_top=8, samples=[20], model=model)
    err = capsys.readouterr().err
    assert "diagnose: verifying the top 8" in err and "3/3" in err  # the 3 of the top 8 not verified yet
    assert "diagnose: random subsets (M=20)" in err and "20/20" in err
    compare(plan, ["atp"], k_max=3, model=model)
    err = capsys.readouterr().err
    assert "compare: activation_patching (ground truth)" in err and "compare: atp" in err
    verify(result, budget=5, model=model, progress=False)
    diagnose(verified, verified_top=8, samples=[20], model=model, progress=False)
    compare(plan, ["atp"], k_max=3, model=model, progress=False)
    assert BAR not in capsys.readouterr().err


# ------------------------------------------------------------------ atpf run --verify --diagnose
def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_workflow_loads_once_and_writes_what_the_separate_commands_write(plan_file, tmp_path, loads):
    for args in (["run", plan_file, "-o", tmp_path / "separate.safetensors"],
                 ["verify", tmp_path / "separate.safetensors", "--budget", "7"],
                 ["diagnose", tmp_path / "separate.safetensors", "--verified-top", "7", "--samples", "16,40",
                  "--json", tmp_path / "separate.json"]):
        done = invoke(*args)
        assert done.exit_code == 0, (done.output, done.stderr)
    assert len(loads) == 3

    loads.clear()
    both = invoke("run", plan_file, "-o", tmp_path / "combined.safetensors", "--verify", "7", "--diagnose",
                  "--samples", "16,40", "--diagnose-json", tmp_path / "combined.json", "--report", tmp_path / "combined.html")
    assert both.exit_code == 0, (both.output, both.stderr)
    assert len(loads) == 1
    for desc in ("atp_star: prompt pairs", "verify: patching nodes", "diagnose: random subsets (M=40)"):
        assert desc in both.stderr and desc not in both.stdout
    assert "verified 7 of" in both.stdout and "bound@0.9" in both.stdout

    combined, separate = af.load_result(tmp_path / "combined.safetensors"), af.load_result(tmp_path / "separate.safetensors")
    assert_same_scores(combined, separate)
    assert_same_verification(combined, separate)
    assert json.loads((tmp_path / "combined.json").read_text()) == json.loads((tmp_path / "separate.json").read_text())
    # the page --report wrote is the one `atpf report` makes from the separate commands' files (bar the creation time)
    done = invoke("report", tmp_path / "separate.safetensors", "--diagnosis", tmp_path / "separate.json", "-o", tmp_path / "separate.html")
    assert done.exit_code == 0, (done.output, done.stderr)
    pages = [_page_data(tmp_path / f"{which}.html") for which in ("combined", "separate")]
    assert pages[0]["diagnosis"] is not None and pages[0]["verification"] is not None
    assert pages[0] == pages[1]

    quiet = invoke("run", plan_file, "-o", tmp_path / "quiet.safetensors", "--verify", "3", "--quiet")
    assert quiet.exit_code == 0 and BAR not in quiet.stderr and "verified 3 of" in quiet.stdout


def _page_data(path):
    """The data blob of a report page, without the fields that name the file or the time it was made."""
    text = path.read_text()
    start = text.index('<script type="application/json"')
    blob = json.loads(text[text.index(">", start) + 1 : text.index("</script>", start)])
    blob["summary"].pop("created", None)
    blob["verification"]["info"].pop("created", None)
    return blob


@pytest.mark.parametrize("args, fragments", [
    (["--report", "{out}"], ["--report:", "is the result file itself"]),
    (["--report", "r.html", "--dry-run"], ["--report: not with --dry-run"]),
    (["--diagnose"], ["--diagnose: give --verify N", "--verified-top K"]),
    (["--samples", "100"], ["--samples: only with --diagnose"]),
    (["--diagnose-json", "d.json", "--verified-top", "3"], ["--verified-top, --diagnose-json: only with --diagnose"]),
    (["--verify", "5", "--dry-run"], ["--verify: not with --dry-run"]),
    (["--verify", "5", "--diagnose", "--samples", "20,x"], ["--samples: expected comma-separated numbers"]),
    (["--verify", "5", "--diagnose", "--samples", "2,100"], ["--samples: each sample budget must be at least 4"]),
])
def test_cli_workflow_refuses_options_that_do_not_fit(plan_file, tmp_path, args, fragments, loads):
    out = tmp_path / "out.safetensors"
    done = invoke("run", plan_file, "-o", out, *[str(out) if a == "{out}" else a for a in args])
    assert done.exit_code == 2, (done.output, done.stderr)
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr
    assert not loads and not (tmp_path / "out.safetensors").exists()  # refused before the model loads


def test_cli_verify_diagnose_and_compare_are_silenced_by_quiet(plan_file, tmp_path):
    assert invoke("run", plan_file, "-o", tmp_path / "r.safetensors", "-q").exit_code == 0
    for args, desc in ((["verify", tmp_path / "r.safetensors", "--budget", "3"], "verify: patching nodes"),
                       (["diagnose", tmp_path / "r.safetensors", "--verified-top", "3", "--samples", "8"], "diagnose: random subsets"),
                       (["compare", plan_file, "--methods", "atp", "--k-max", "3", "--out", tmp_path / "cmp"], "compare: atp")):
        loud, quiet = invoke(*args), invoke(*args, "--quiet")
        assert loud.exit_code == 0 and quiet.exit_code == 0, (loud.stderr, quiet.stderr)
        assert desc in loud.stderr and BAR in loud.stderr
        assert BAR not in quiet.stderr and desc not in quiet.stderr
        assert desc not in loud.stdout
