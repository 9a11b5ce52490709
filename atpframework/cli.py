"""The ``atpf`` command line.

    atpf PLAN.json [-o OUT] [--dry-run] [--distributed] [--debug]   run a plan (or print its compiled passes)
    atpf show RESULT [--top N] [--aggregate mean_abs|mean]
    atpf verify RESULT (--budget N | --until-stable) [--top K] [--threshold X] [-o OUT]
    atpf diagnose RESULT --verified-top K --samples M[,M2..] [--confidence 0.9,0.99] [--plot PNG]
    atpf compare PLAN.json --methods atp,atp_star,... [--ground-truth RESULT] --out DIR
    atpf circuit RESULT [RESULT...] [--sizes 1,10,100] [--greedy] --out DIR   faithfulness curves of edge circuits
    atpf report RESULT [-o REPORT.html] [--diagnosis DIAG.json] [--title TEXT]
    atpf schema                                     print the plan JSON Schema

Exit codes: 0 success; 2 a bad plan or usage (one-paragraph message); 1 a runtime failure.
No traceback unless ``--debug``.
"""

import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import click

from atpframework.engine.outputs import check_writable
from atpframework.errors import MAX_MESSAGE, AtpfError, PlanError, SchemaError, shorten
from atpframework.io.results import GRADDROP_CONVENTION, SIGN_CONVENTION
from atpframework.io.tables import render_table, text_table


class _PlanFirstGroup(click.Group):
    """A group whose default command is ``run``: ``atpf PLAN.json`` means ``atpf run PLAN.json``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run"] + args
        return super().parse_args(ctx, args)


MODEL_HELP = ("Load this model (a bundled name, a local Hugging Face directory or a hub name) instead of the one the "
              "result file names; the file's choice is printed before anything loads.")


def _say_error(message: str) -> None:
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 40] + f" ... ({len(message)} characters in all)"
    click.echo(f"error: {message}", err=True)


def _guard(debug: bool, action: Callable[[], Any]) -> Any:
    """Run a command's action with the CLI's one error path.

    Exit 2: a bad plan, option or input file (``PlanError``, ``SchemaError``). Exit 1: a failure while
    running (another ``AtpfError``, a file that cannot be read or written, memory), or a bug, reported
    in one line. Exit 130: interrupted. No traceback and no bare exception type unless ``--debug``.
    """
    try:
        return action()
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            traceback.print_exc()
        code, message = _classify(err)
        _say_error(message)
        sys.exit(code)


def _classify(err: Exception) -> tuple[int, str]:
    """Exit code and one-paragraph message of an exception (see ``_guard``)."""
    if isinstance(err, (PlanError, SchemaError)):
        return 2, str(err)
    if isinstance(err, AtpfError):
        return 1, str(err)
    if isinstance(err, OSError):
        where = f" {shorten(os.fspath(err.filename))}" if err.filename else ""
        return 1, f"cannot access{where}: {err.strerror or shorten(str(err))}"
    if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
        return 1, "out of memory; lower batch_size, set max_memory in the plan, or use a smaller dtype"
    first_line = (str(err).strip().splitlines() or [""])[0]
    return 1, f"unexpected failure ({shorten(first_line)}); rerun with --debug for the traceback, and please report it"


@click.group(cls=_PlanFirstGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="atpframework")
def main() -> None:
    """atpframework: which parts of a language model cause a behaviour (AtP, AtP* and activation patching).

    Run a plan with `atpf PLAN.json`; see `atpf run --help`.
    """


QUIET_HELP = "No progress bars on stderr."


@main.command("run")
@click.argument("plan_path", metavar="PLAN.json", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Result file (.safetensors); overrides the plan's output (which stays inside the plan's folder or the working directory).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file even if it is not an atpframework result.")
@click.option("--dry-run", is_flag=True, help="Print the compiled passes and sites, run nothing.")
@click.option("--top", default=10, type=click.IntRange(min=0), show_default=True, help="How many top nodes to print after the run.")
@click.option("--distributed", is_flag=True,
              help="Shard the prompt pairs over the processes of a torchrun launch (the default under torchrun).")
@click.option("--verify", "verify_budget", type=click.IntRange(min=1), metavar="N",
              help="Then exact-patch the N top-scored nodes into the result file (as `atpf verify --budget N`), on the same loaded model.")
@click.option("--diagnose", "run_diagnose", is_flag=True,
              help="Then bound what the unverified nodes could hide (as `atpf diagnose`), on the same loaded model.")
@click.option("--verified-top", type=click.IntRange(min=0), metavar="K",
              help="With --diagnose: how many top nodes count as verified [default: the --verify N].")
@click.option("--samples", default="400", show_default=True, help="With --diagnose: sample budgets, comma-separated.")
@click.option("--diagnose-json", type=click.Path(dir_okay=False), help="With --diagnose: write the diagnosis as JSON.")
@click.option("--diagnose-plot", type=click.Path(dir_okay=False), help="With --diagnose: write a PNG of the bound.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), metavar="REPORT.html",
              help="Last, write the self-contained HTML report (as `atpf report`), with the diagnosis when --diagnose ran.")
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def run_command(plan_path: str, output: str | None, overwrite: bool, dry_run: bool, top: int, distributed: bool,
                verify_budget: int | None, run_diagnose: bool, verified_top: int | None, samples: str,
                diagnose_json: str | None, diagnose_plot: str | None, report_path: str | None, quiet: bool, debug: bool) -> None:
    """Run the attribution plan PLAN.json and write its result file; with --verify, --diagnose and --report, then
    verify, diagnose and report on it with the same loaded model (one model load for the whole workflow)."""
    from atpframework import api
    from atpframework.analysis.session import Session
    from atpframework.engine import distributed as parallel

    def action() -> None:
        ctx = click.get_current_context()
        workflow = _checked_workflow_options(ctx, verify_budget, run_diagnose, verified_top, samples, diagnose_json,
                                             diagnose_plot, dry_run, distributed or parallel.launched())
        if report_path is not None and dry_run:
            raise PlanError("--report: not with --dry-run, which runs nothing")
        plan = api.as_plan(plan_path)
        target = api.preflight(plan, plan_path, output, overwrite)
        if not dry_run and target is None:
            raise PlanError("output: the plan has no 'output' path; give one in the plan or with -o OUT.safetensors")
        page = _report_target(str(target), report_path, option="--report") if report_path is not None else None
        started = time.perf_counter()
        _quiet_model_libraries()
        group = parallel.join(plan.model.device) if (distributed or parallel.launched()) and not dry_run else None
        main_rank = group is None or group.is_main
        device = parallel.device_for_rank(plan.model.device, group) if group is not None else None
        session = Session(plan_path, device=device, progress=not quiet)
        backend = session.backend
        if dry_run:
            click.echo(api.compile(plan, backend=backend).explain())
            return
        if not main_rank:  # one voice: rank 0 reports and writes
            session.run(output=target, overwrite=overwrite, resume=True, distributed=True)
            parallel.leave()
            return
        click.echo(f"loaded {backend.info.source} in {time.perf_counter() - started:.1f}s", err=True)
        result = session.run(output=target, overwrite=overwrite, resume=True, distributed=group is not None)
        if group is not None:
            parallel.leave()  # rank 0 has written the file
        click.echo(_format_top(result, top, "mean_abs"))
        click.echo(f"wrote {target} ({time.perf_counter() - started:.1f}s)")
        assert target is not None
        if workflow.verify is not None:
            step = time.perf_counter()
            result = session.verify(result, budget=workflow.verify)
            result.save(target)
            click.echo(_format_verified(result, top))
            click.echo(f"wrote {target} ({time.perf_counter() - step:.1f}s)")
        diagnosis = None
        if workflow.verified_top is not None:
            step = time.perf_counter()
            updated, diagnosis = session.diagnose(result, verified_top=workflow.verified_top, samples=workflow.samples)
            if updated is not result:
                result = updated
                result.save(target)
            _report_diagnosis(result, diagnosis, step, diagnose_json, diagnose_plot)
        if page is not None:
            from atpframework.analysis.report import write_report

            written = write_report(result, page, diagnosis=diagnosis)
            click.echo(f"wrote {written} ({written.stat().st_size / 1024:.0f} kB)")
        if workflow.verify is not None or diagnosis is not None or page is not None:
            click.echo(f"done in {time.perf_counter() - started:.1f}s")

    _guard(debug, action)


@dataclasses.dataclass(frozen=True)
class _Workflow:
    """What ``atpf run`` does after the run: verify this many nodes, diagnose with this verified top and samples."""

    verify: int | None
    verified_top: int | None
    samples: list[int]


def _checked_workflow_options(ctx: click.Context, verify_budget: int | None, run_diagnose: bool, verified_top: int | None,
                              samples: str, diagnose_json: str | None, diagnose_plot: str | None, dry_run: bool,
                              distributed: bool) -> _Workflow:
    """``atpf run``'s --verify/--diagnose options, refused (``PlanError`` naming the option) where they do not fit."""
    if not run_diagnose:
        given = [name for name, value in (("--verified-top", verified_top), ("--diagnose-json", diagnose_json),
                                          ("--diagnose-plot", diagnose_plot)) if value is not None]
        if ctx.get_parameter_source("samples") is not click.core.ParameterSource.DEFAULT:
            given.append("--samples")
        if given:
            raise PlanError(f"{', '.join(given)}: only with --diagnose")
    steps = [name for name, on in (("--verify", verify_budget is not None), ("--diagnose", run_diagnose)) if on]
    if steps and dry_run:
        raise PlanError(f"{' and '.join(steps)}: not with --dry-run, which runs nothing")
    if steps and distributed:
        raise PlanError(f"{' and '.join(steps)}: not under torchrun (--distributed); run `atpf verify` / `atpf diagnose` "
                        "on the result file afterwards")
    if run_diagnose and verified_top is None and verify_budget is None:
        raise PlanError("--diagnose: give --verify N (the verified top is then those N nodes) or --verified-top K")
    top = (verified_top if verified_top is not None else verify_budget) if run_diagnose else None
    budgets = _ints(samples, "--samples") if run_diagnose else []
    if run_diagnose and (not budgets or min(budgets) < 4):
        raise PlanError(f"--samples: each sample budget must be at least 4 (got {samples!r})")
    return _Workflow(verify_budget, top, budgets)


@main.command("show")
@click.argument("result_path", metavar="RESULT", type=click.Path(dir_okay=False))
@click.option("--top", default=20, type=click.IntRange(min=0), show_default=True, help="How many nodes to list.")
@click.option("--aggregate", type=click.Choice(["mean_abs", "mean"]), default="mean_abs", show_default=True,
              help="Combine pairs by mean |effect| or signed mean.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def show_command(result_path: str, top: int, aggregate: str, debug: bool) -> None:
    """Print a table of the top nodes of a result file."""
    from atpframework.io.results import load_result

    def action() -> None:
        result = load_result(result_path)
        click.echo(_format_top(result, top, aggregate))

    _guard(debug, action)


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PlanError(f"{option}: expected comma-separated numbers, got {text!r}") from None


def _ints(text: str, option: str) -> list[int]:
    values = _floats(text, option)
    if any(v != int(v) for v in values):
        raise PlanError(f"{option}: expected comma-separated whole numbers, got {text!r}")
    return [int(v) for v in values]


@main.command("verify")
@click.argument("result_path", metavar="RESULT", type=click.Path(dir_okay=False))
@click.option("--budget", type=int, help="Verify this many more nodes (in decreasing estimated score).")
@click.option("--until-stable", is_flag=True, help="Verify until the verified top --top stops changing for --patience nodes.")
@click.option("--top", default=20, type=click.IntRange(min=0), show_default=True, help="Size of the top set that --until-stable watches, and of the report.")
@click.option("--patience", type=int, help="Nodes without a change before --until-stable stops [default: max(top, nodes per pass)].")
@click.option("--threshold", type=float, help="Mean |effect| a verified node needs to count as confirmed [default: 5% of |noise - clean|].")
@click.option("--nodes-per-pass", default=64, show_default=True, help="Nodes patched per forward pass.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of updating RESULT in place.")
@click.option("--overwrite", is_flag=True, help="With -o: replace an existing file even if it is not an atpframework result.")
@click.option("--model", "model_source", help=MODEL_HELP)
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def verify_command(result_path: str, budget: int | None, until_stable: bool, top: int, patience: int | None,
                   threshold: float | None, nodes_per_pass: int, output: str | None, overwrite: bool,
                   model_source: str | None, quiet: bool, debug: bool) -> None:
    """Exact-patch the nodes of RESULT in decreasing estimated score and store the verified effects in it."""
    from atpframework.analysis.verify import verify
    from atpframework.io.results import load_result

    def action() -> None:
        result = load_result(result_path)
        target = output or result_path
        check_writable(target, overwrite, field="--output")
        _quiet_model_libraries()
        started = time.perf_counter()
        backend = _result_backend(result, result_path, model_source)
        verified = verify(result, budget=budget, until_stable=until_stable, top=top, patience=patience,
                          threshold=threshold, nodes_per_pass=nodes_per_pass, backend=backend, progress=not quiet)
        check_writable(target, overwrite, field="--output")
        verified.save(target)
        click.echo(_format_verified(verified, top))
        click.echo(f"wrote {target} ({time.perf_counter() - started:.1f}s)")

    _guard(debug, action)


@main.command("diagnose")
@click.argument("result_path", metavar="RESULT", type=click.Path(dir_okay=False))
@click.option("--verified-top", required=True, type=int, help="How many top estimated nodes are (or get) verified.")
@click.option("--samples", required=True, help="Sample budgets, comma-separated (e.g. 100,400,1600); the bound is reported after each.")
@click.option("--confidence", default="0.9,0.99", show_default=True, help="Confidence levels, comma-separated.")
@click.option("--p", "p", default=0.5, show_default=True, help="Probability that a random subset includes a node.")
@click.option("--seed", default=0, show_default=True)
@click.option("--nodes-per-pass", default=64, show_default=True, help="Subsets (or nodes) patched per forward pass.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of the bound against the verified effects.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the diagnosis as JSON.")
@click.option("--model", "model_source", help=MODEL_HELP)
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def diagnose_command(result_path: str, verified_top: int, samples: str, confidence: str, p: float, seed: int,
                     nodes_per_pass: int, plot: str | None, json_path: str | None, model_source: str | None, quiet: bool,
                     debug: bool) -> None:
    """Bound the effect of every node of RESULT outside its verified top (subsampling + Welch tests)."""
    from atpframework.analysis.verify import diagnose
    from atpframework.io.results import load_result

    def action() -> None:
        result = load_result(result_path)
        _quiet_model_libraries()
        started = time.perf_counter()
        backend = _result_backend(result, result_path, model_source)
        updated, diagnosis = diagnose(result, verified_top=verified_top, samples=_ints(samples, "--samples"),
                                      confidences=_floats(confidence, "--confidence"), p=p, seed=seed,
                                      nodes_per_pass=nodes_per_pass, backend=backend, progress=not quiet)
        if updated is not result:
            updated.save(result_path)
        _report_diagnosis(updated, diagnosis, started, json_path, plot)

    _guard(debug, action)


@main.command("compare")
@click.argument("plan_path", metavar="PLAN.json", type=click.Path(dir_okay=False))
@click.option("--methods", required=True,
              help="Comma-separated method names, or a JSON list of method specs (e.g. '[{\"name\": \"blocks\", \"block_size\": 8}]').")
@click.option("--ground-truth", type=click.Path(dir_okay=False), help="A stored activation_patching result of this plan.")
@click.option("--k-max", type=int, help="Largest k of the recall curves [default: min(nodes, 200)].")
@click.option("--faithfulness", "faithfulness_sizes", metavar="SIZES",
              help="Plans of edges: also the faithfulness of each method's circuits of these sizes (comma-separated).")
@click.option("--greedy", is_flag=True, help="With --faithfulness: greedy circuits (dangling edges pruned).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the table, plot and results.")
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def compare_command(plan_path: str, methods: str, ground_truth: str | None, k_max: int | None, faithfulness_sizes: str | None,
                    greedy: bool, out_dir: str, quiet: bool, debug: bool) -> None:
    """Cost of verified recall of several methods on PLAN.json (table, JSON and log-log PNG in --out)."""
    from atpframework.analysis.compare import compare, write_comparison

    def action() -> None:
        text = methods.strip()
        if text.startswith("["):
            try:
                specs = json.loads(text)
            except json.JSONDecodeError as err:
                raise PlanError(f"--methods: not valid JSON ({err})") from None
        else:
            specs = [m.strip() for m in text.split(",") if m.strip()]
        sizes = None
        if faithfulness_sizes is not None:
            try:
                sizes = [int(s) for s in faithfulness_sizes.split(",") if s.strip()]
            except ValueError:
                sizes = []
            if not sizes or min(sizes) < 1:
                raise PlanError(f"--faithfulness: allowed: comma-separated circuit sizes >= 1 (got {faithfulness_sizes!r})")
        elif greedy:
            raise PlanError("--greedy: only with --faithfulness")
        _quiet_model_libraries()
        comparison = compare(plan_path, specs, ground_truth=ground_truth, k_max=k_max, progress=not quiet,
                             faithfulness_sizes=sizes, greedy=greedy)
        written = write_comparison(comparison, out_dir, title=f"cost of verified recall: {plan_path}")
        click.echo(comparison.table())
        click.echo("wrote " + ", ".join(str(p) for p in written))

    _guard(debug, action)


@main.command("circuit")
@click.argument("result_paths", metavar="RESULT...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--sizes", help="Circuit sizes in edges, comma-separated [default: 1, 2, 5, 10, 20, 50, ... and every edge].")
@click.option("--greedy", is_flag=True,
              help="Greedy circuits: the top edges with the dangling ones pruned (every kept edge on a path from the "
                   "embeddings to the logits), instead of the top edges.")
@click.option("--unscored", type=click.Choice(["noise", "clean"]), default="noise", show_default=True,
              help="What the edges a result does not score carry: their noise value (outside every circuit) or their own (kept).")
@click.option("--graph-size", type=click.IntRange(min=1), metavar="N",
              help="Size of the circuit (of the first RESULT) written as circuit_graph.json and circuit.dot "
                   "[default: the largest --sizes; 100 without --sizes].")
@click.option("--circuits-per-pass", default=8, type=click.IntRange(min=1), show_default=True, metavar="N",
              help="Circuits patched per forward pass (memory grows with it).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for circuit.csv, circuit.json, faithfulness.png, circuit_graph.json and circuit.dot.")
@click.option("--model", "model_source", help=MODEL_HELP)
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def circuit_command(result_paths: tuple[str, ...], sizes: str | None, greedy: bool, unscored: str, graph_size: int | None,
                    circuits_per_pass: int, out_dir: str, model_source: str | None, quiet: bool, debug: bool) -> None:
    """Faithfulness of the circuits of edge results over circuit sizes (exact patching), with the areas under the
    curves (CPR, CMD), a plot, and one circuit as a graph (JSON and Graphviz DOT) in --out."""
    from pathlib import Path

    from atpframework.analysis import circuits
    from atpframework.io.results import load_result

    def action() -> None:
        asked = _circuit_sizes(sizes)
        results = [load_result(path) for path in result_paths]
        for path, result in zip(result_paths, results):
            problem = circuits.edge_problem(result)
            if problem:
                raise PlanError(f"RESULT {shorten(path)}: {problem}")
            if model_source is None and result.plan.get("model", {}).get("source") == "in_memory":
                raise PlanError(f"--model: RESULT {shorten(path)} was computed on a model passed in memory (model.source "
                                "'in_memory'), which the file cannot load; name the model with --model SOURCE")
        target = graph_size or (max(asked) if asked else 100)
        wanted = None if asked is None else sorted({*asked, target})
        labels = circuits.curve_labels(results, [Path(p).stem for p in result_paths])
        _quiet_model_libraries()
        started = time.perf_counter()
        backends: dict[str, Any] = {}
        curves = []
        for path, result, label in zip(result_paths, results, labels):
            key = json.dumps(result.plan.get("model"), sort_keys=True)
            if key not in backends:
                backends[key] = _result_backend(result, path, model_source)
            step = time.perf_counter()
            size_list = wanted if wanted is not None else [*circuits.default_sizes(circuits.ResultEdges(result).n_edges), target]
            curve = circuits.circuit_faithfulness(result, size_list, greedy=greedy, unscored=unscored,  # type: ignore[arg-type]
                                                  circuits_per_pass=circuits_per_pass, label=label,
                                                  backend=backends[key], progress=not quiet)
            curves.append(curve)
            click.echo(f"{label}: {curve.n_edges} edges, {curve.passes} patched passes, {time.perf_counter() - step:.1f}s")
        first = curves[0]
        index = first.requested.index(min(target, first.n_edges))
        graph = circuits.describe_graph(first, index, results[0])
        written = circuits.write_circuit_outputs(curves, out_dir, graph=graph, title="circuit faithfulness: " + ", ".join(labels))
        click.echo(_format_circuits(curves))
        click.echo(f"graph: the {'greedy' if greedy else 'top'} circuit of {graph['size']} edges of {first.label} "
                   f"(faithfulness {graph['faithfulness']:.4f}): {len(graph['nodes'])} components, {len(graph['edges'])} edges")
        click.echo("wrote " + ", ".join(str(p) for p in written) + f" ({time.perf_counter() - started:.1f}s)")

    _guard(debug, action)


def _circuit_sizes(text: str | None) -> list[int] | None:
    """``--sizes``: whole numbers >= 1, or None (the default sizes)."""
    if text is None:
        return None
    values = _ints(text, "--sizes")
    if not values or min(values) < 1:
        raise PlanError(f"--sizes: expected comma-separated circuit sizes, whole numbers >= 1 (got {text!r})")
    return values


def _format_circuits(curves: list[Any]) -> str:
    """Faithfulness per size (rows) and curve (columns), then each curve's empty/full check and areas."""
    sizes = sorted({s for c in curves for s in c.requested})
    table = text_table("size", *(c.label for c in curves))
    for size in sizes:
        cells = []
        for c in curves:
            at = min(size, c.n_edges)
            cells.append(f"{float(c.faithfulness[c.requested.index(at)]):.4f}" + (f" ({c.sizes[c.requested.index(at)]})" if c.greedy else "")
                         if at in c.requested else "")
        table.add_row(str(size), *cells)
    lines = ["faithfulness = mean(m(circuit) - m(noise)) / mean(m(clean) - m(noise))" + ("; greedy sizes reached in ()" if curves[0].greedy else ""),
             render_table(table)]
    for c in curves:
        a = c.areas
        lines.append(f"{c.label}: empty {c.empty:.2e}, full {c.full:.6f}; CPR {a['cpr_log']:.4f} / CMD {a['cmd_log']:.4f} over "
                     f"log size, CPR {a['cpr_fraction']:.4f} / CMD {a['cmd_fraction']:.4f} over the fraction of edges")
    return "\n".join(lines)


@main.command("report")
@click.argument("result_path", metavar="RESULT", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="HTML file to write [default: RESULT with the suffix .html]; an existing file is replaced only if it is .html or .htm.")
@click.option("--diagnosis", "diagnosis_path", type=click.Path(dir_okay=False),
              help="JSON written by `atpf diagnose RESULT --json` for this result: adds the bound and its warnings.")
@click.option("--title", help="Page title [default: method, metric and model].")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def report_command(result_path: str, output: str | None, diagnosis_path: str | None, title: str | None, debug: bool) -> None:
    """Write a self-contained HTML report of RESULT: the run, prompts, heatmaps, top nodes, verification (opens offline)."""
    from atpframework.analysis.report import write_report
    from atpframework.io.results import load_result

    def action() -> None:
        target = _report_target(result_path, output, option="--output")
        result = load_result(result_path)
        diagnosis = _read_diagnosis(diagnosis_path, result) if diagnosis_path else None
        written = write_report(result, target, diagnosis=diagnosis, title=title)
        click.echo(f"wrote {written} ({written.stat().st_size / 1024:.0f} kB)")

    _guard(debug, action)


def _report_target(result_path: str, output: str | None, option: str) -> str:
    """Where a report goes (``option`` names the CLI option): ``output``, or RESULT with ``.html``; never RESULT
    itself nor an existing non-HTML file."""
    from pathlib import Path

    target = Path(output) if output else Path(result_path).with_suffix(".html")
    if target.resolve() == Path(result_path).resolve():
        raise PlanError(f"{option}: {shorten(str(target))} is the result file itself; name an .html file")
    if target.exists() and target.suffix.lower() not in (".html", ".htm"):
        raise PlanError(f"{option}: {shorten(str(target))} exists and is not an .html or .htm file; not replacing it")
    return str(target)


def _read_diagnosis(path: str, result: Any) -> Any:
    """``--diagnosis``: the JSON of ``atpf diagnose --json``, which must describe RESULT's nodes."""
    from atpframework.analysis.report import load_diagnosis

    try:
        diagnosis = load_diagnosis(path)
    except SchemaError as err:
        raise SchemaError(f"--diagnosis {err}") from None
    covered, n_nodes = diagnosis.verified_top + diagnosis.remainder, result.numbering.n_nodes
    if covered != n_nodes:
        raise PlanError(f"--diagnosis {shorten(path)}: covers {covered} nodes (verified_top + remainder) but RESULT has "
                        f"{n_nodes}; it is the diagnosis of another result")
    return diagnosis


@main.command("schema")
def schema_command() -> None:
    """Print the JSON Schema of plans (with every installed node type)."""
    from atpframework.plans.plan import plan_json_schema

    _guard(False, lambda: click.echo(json.dumps(plan_json_schema(), indent=2)))


def _result_backend(result: Any, result_path: str, model_source: str | None) -> Any:
    """Load the backend that re-runs a result's plan: the model the file names, or ``--model``.

    A result file may come from someone else, so what it would load is said before it loads."""
    from atpframework import api

    plan = result.plan
    if not isinstance(plan.get("model"), dict):
        raise SchemaError(f"{result_path}: atpf.plan has no model entry")
    if model_source is not None:
        plan["model"]["source"] = model_source
    saes = ", ".join(f"{s.get('name')}: {s.get('path') or s.get('release')}" for s in plan.get("saes") or [] if isinstance(s, dict))
    click.echo(
        f"loading model {shorten(plan['model']['source'])} with the {shorten(plan['model'].get('backend', 'transformer_lens'))} backend "
        + ("(--model)" if model_source is not None else f"(named by {shorten(result_path)}; --model SOURCE loads another)")
        + (f" and SAEs {shorten(saes)} (tensors only)" if saes else ""),
        err=True,
    )
    parsed = api.as_plan(plan)
    problem = api.device_problem(parsed.model.device)
    if problem:
        raise PlanError(f"{problem} (the result's plan says so)")
    return api.load_backend(parsed)


def _report_diagnosis(result: Any, diagnosis: Any, started: float, json_path: str | None, plot: str | None) -> None:
    """Print a diagnosis (bound table, warnings) and write its JSON and plot where asked."""
    from atpframework.io.files import write_text_atomically

    click.echo(f"verified top {diagnosis.verified_top}; largest verified mean |effect| "
               f"{float(diagnosis.verified_effects[0]) if len(diagnosis.verified_effects) else float('nan'):.5f}; "
               f"{diagnosis.remainder} unverified nodes, subsets with p={diagnosis.p}")
    table = text_table("samples", *(f"bound@{c:g}" for c in diagnosis.bounds))
    budgets = [n for n, _ in next(iter(diagnosis.bounds.values()))]
    for row, n in enumerate(budgets):
        table.add_row(str(n), *(f"{b[row][1]:.5f}" for b in diagnosis.bounds.values()))
    click.echo(render_table(table))
    click.echo(f"(no unverified node's mean |effect| exceeds the bound, at that confidence; "
               f"{diagnosis.forward_equivalents_per_pair:g} forward passes per pair; {time.perf_counter() - started:.1f}s)")
    for warning in diagnosis.warnings():
        click.echo(f"warning: {warning}")
    if json_path:
        write_text_atomically(json_path, json.dumps(diagnosis.as_json(), indent=2))
    if plot:
        from atpframework.analysis.figures import diagnostic_labels
        from atpframework.analysis.plots import plot_diagnostic

        plot_diagnostic(diagnosis.verified_effects, diagnosis.bounds, plot, labels=diagnostic_labels(result, diagnosis.verified_top),
                        title=f"{result.method}: bound on unverified nodes after verifying the top {diagnosis.verified_top}")
        click.echo(f"wrote {plot}")


def _quiet_model_libraries() -> None:
    """Silence per-tensor loading bars of transformers (our own progress bar is the one that matters)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _score_name(result: Any, aggregate: str) -> str:
    """What the ranking column holds: GradDrop scores (non-negative already), activation-patching effects, or
    the scores of a method with a convention of its own (a plugin's, e.g. zero ablation)."""
    if result.sign_convention == GRADDROP_CONVENTION:
        return "mean GradDrop score"
    noun = "effect" if result.sign_convention == SIGN_CONVENTION else "score"
    return f"mean |{noun}|" if aggregate == "mean_abs" else f"signed mean {noun}"


def _format_verified(result: Any, top: int) -> str:
    from atpframework.analysis.verify import verified_effects

    info = result.verification
    nodes, ranks, effects = verified_effects(result)
    strength = effects.abs().mean(0)
    lines = [
        f"verified {info['verified']} of {info['of_nodes']} nodes ({info['stopped']}); "
        f"{info['forward_equivalents_per_pair']:g} forward passes per pair this run",
        f"confirmed (mean |effect| >= {info['threshold']:.4g}) among the top n estimated: "
        + (", ".join(f"{k.removeprefix('top_')}: {v}" for k, v in info["confirmed"].items()) or "n/a (fewer than 10 verified)"),
        f"top {top} verified nodes by exact mean |effect|:",
    ]
    table = text_table("rank", "<node", "mean |effect|", "<verified", show_header=False)
    for rank, i in enumerate(strength.argsort(descending=True)[:top].tolist(), start=1):
        table.add_row(str(rank), result.node_label(int(nodes[i])), f"{float(strength[i]):.5f}", f"(verified #{int(ranks[i]) + 1})")
    return "\n".join(lines) + ("\n" + render_table(table) if table.rows else "")


def _format_top(result: Any, top: int, aggregate: str) -> str:
    n_pairs = len(result.metric_clean)
    mc, mn = result.metric_clean.mean().item(), result.metric_noise.mean().item()
    lines = [
        f"method {result.method}, metric {result.metric}: clean {mc:.4f}, noise {mn:.4f} (mean over {n_pairs} pair(s))",
        f"top {top} nodes by {_score_name(result, aggregate)}:",
    ]
    table = text_table("rank", "<node", "score", "signed estimate")
    for rank, row in enumerate(result.top_k(top, how=aggregate), start=1):
        table.add_row(str(rank), row.label(), f"{row.score:.5f}", f"{row.signed_estimate:.5f}")
    return "\n".join(lines) + "\n" + render_table(table)
