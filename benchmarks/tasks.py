"""How well the bundled SmolLM2 performs each task of ``atpframework.tasks``.

Prints one line per task (pairs, fraction performed: clean logit diff > 0 and noise below it, fraction
whose noise logit diff is negative, clean and noise logit diff as mean +- standard deviation over pairs,
pairs dropped, whether the task is kept), then the fraction performed per template.

Usage: ``python benchmarks/tasks.py [--pairs 64] [--seed 0] [--tasks ioi,city] [--json out.json]``
"""

import argparse
import json
import time

import atpframework as af
from atpframework.tasks import TASKS, get_task, report_table, task_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--backend", default="transformer_lens")
    parser.add_argument("--json")
    args = parser.parse_args()
    plan = af.as_plan({"model": {"source": "bundled:smollm2-135m-instruct", "backend": args.backend},
                       "prompts": [{"clean": "a", "noise": "b"}], "metric": {"name": "cross_entropy"},
                       "nodes": [{"kind": "resid"}], "method": {"name": "atp"}})
    backend = af.load_backend(plan)
    reports, seconds = [], {}
    for name in args.tasks.split(","):
        start = time.perf_counter()
        reports.append(task_report(get_task(name), backend, args.pairs, args.seed))
        seconds[name] = time.perf_counter() - start
    print(report_table(reports))
    print()
    for report in reports:
        groups = ", ".join(f"{group} {done}/{total}" for group, (done, total) in report.by_group.items())
        print(f"{report.task} ({seconds[report.task]:.1f} s): {groups}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"pairs": args.pairs, "seed": args.seed, "tasks": [r.summary() for r in reports], "seconds": seconds}, f, indent=1)


if __name__ == "__main__":
    main()
