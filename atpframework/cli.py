"""The ``atpf`` command line.

    atpf PLAN.json [-o OUT] [--dry-run] [--debug]   run a plan (or print its compiled passes)
    atpf show RESULT [--top N] [--aggregate mean_abs|mean]
    atpf schema                                     print the plan JSON Schema

Exit codes: 0 success; 2 a bad plan or usage (one-paragraph message); 1 a runtime failure.
No traceback unless ``--debug``.
"""

import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import click

from .errors import AtpfError, PlanError, SchemaError
from .results import SIGN_CONVENTION


class _PlanFirstGroup(click.Group):
    """A group whose default command is ``run``: ``atpf PLAN.json`` means ``atpf run PLAN.json``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run"] + args
        return super().parse_args(ctx, args)


def _guard(debug: bool, action: Callable[[], Any]) -> Any:
    try:
        return action()
    except (PlanError, SchemaError) as err:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except AtpfError as err:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            traceback.print_exc()
        else:
            click.echo(f"error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)


@click.group(cls=_PlanFirstGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="atpframework")
def main() -> None:
    """atpframework: which parts of a language model cause a behaviour (AtP, AtP* and activation patching).

    Run a plan with `atpf PLAN.json`; see `atpf run --help`.
    """


@main.command("run")
@click.argument("plan_path", metavar="PLAN.json", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Result file (.safetensors); overrides the plan's output.")
@click.option("--dry-run", is_flag=True, help="Print the compiled passes and sites, run nothing.")
@click.option("--top", default=10, show_default=True, help="How many top nodes to print after the run.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def run_command(plan_path: str, output: str | None, dry_run: bool, top: int, debug: bool) -> None:
    """Run the attribution plan PLAN.json and write its result file."""
    from . import api

    def action() -> None:
        plan = api.as_plan(plan_path)
        target = output or plan.output
        if not dry_run and target is None:
            raise PlanError("output: the plan has no 'output' path; give one in the plan or with -o OUT.safetensors")
        started = time.perf_counter()
        _quiet_model_libraries()
        backend = api.load_backend(plan)
        compiled = api.compile(plan, backend=backend)
        if dry_run:
            click.echo(compiled.explain())
            return
        click.echo(f"loaded {backend.info.source} in {time.perf_counter() - started:.1f}s", err=True)
        with click.progressbar(length=len(compiled.pairs), label="prompt pairs", file=sys.stderr) as bar:
            result = api.run(plan, backend=backend, output=target, progress=bar.update)
        click.echo(_format_top(result, top, "mean_abs"))
        click.echo(f"wrote {target} ({time.perf_counter() - started:.1f}s)")

    _guard(debug, action)


@main.command("show")
@click.argument("result_path", metavar="RESULT", type=click.Path(dir_okay=False))
@click.option("--top", default=20, show_default=True, help="How many nodes to list.")
@click.option("--aggregate", type=click.Choice(["mean_abs", "mean"]), default="mean_abs", show_default=True,
              help="Combine pairs by mean |effect| or signed mean.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def show_command(result_path: str, top: int, aggregate: str, debug: bool) -> None:
    """Print a table of the top nodes of a result file."""
    from .results import load_result

    def action() -> None:
        result = load_result(result_path)
        click.echo(_format_top(result, top, aggregate))

    _guard(debug, action)


@main.command("schema")
def schema_command() -> None:
    """Print the JSON Schema of plans (with every installed node type)."""
    from .plan import plan_json_schema

    _guard(False, lambda: click.echo(json.dumps(plan_json_schema(), indent=2)))


def _quiet_model_libraries() -> None:
    """Silence per-tensor loading bars of transformers (our own progress bar is the one that matters)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _score_name(result: Any, aggregate: str) -> str:
    if result.sign_convention != SIGN_CONVENTION:  # GradDrop scores: non-negative already
        return "mean GradDrop score"
    return "mean |effect|" if aggregate == "mean_abs" else "signed mean effect"


def _format_top(result: Any, top: int, aggregate: str) -> str:
    n_pairs = len(result.metric_clean)
    mc, mn = result.metric_clean.mean().item(), result.metric_noise.mean().item()
    lines = [
        f"method {result.method}, metric {result.metric}: clean {mc:.4f}, noise {mn:.4f} (mean over {n_pairs} pair(s))",
        f"top {top} nodes by {_score_name(result, aggregate)}:",
        f"{'rank':>4}  {'node':<28} {'score':>11} {'signed mean':>12}",
    ]
    for rank, row in enumerate(result.top_k(top, how=aggregate), start=1):  # type: ignore[arg-type]
        lines.append(f"{rank:>4}  {row.label():<28} {row.score:>11.5f} {row.signed_mean:>12.5f}")
    return "\n".join(lines)
