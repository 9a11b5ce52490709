"""Task suites: seeded generators of equal-length prompt pairs with answers, ready for plans.

Each task (``TASKS``: ``ioi``, ``city``, ``greater_than``, ``counting``, ``rand_pp``) draws pairs
``{"clean", "noise", "answer", "wrong_answer"}`` for the ``logit_diff`` metric; ``task_plan`` makes a
plan of them, and ``task_report`` says how well a model performs a task (docs/tasks.md).
"""

from atpframework.tasks.base import Pair as Pair
from atpframework.tasks.base import Task as Task
from atpframework.tasks.base import Tokenize as Tokenize
from atpframework.tasks.base import tokenizer_of as tokenizer_of
from atpframework.tasks.registry import TASKS as TASKS
from atpframework.tasks.registry import get_task as get_task
from atpframework.tasks.registry import task_plan as task_plan
from atpframework.tasks.report import THRESHOLD as THRESHOLD
from atpframework.tasks.report import TaskReport as TaskReport
from atpframework.tasks.report import logit_diffs as logit_diffs
from atpframework.tasks.report import performed_pairs as performed_pairs
from atpframework.tasks.report import report_table as report_table
from atpframework.tasks.report import task_report as task_report

__all__ = [
    "TASKS", "THRESHOLD", "Pair", "Task", "TaskReport", "Tokenize", "get_task",
    "logit_diffs", "performed_pairs", "report_table", "task_plan", "task_report", "tokenizer_of",
]
