"""atpframework: attribution patching (AtP, and exact activation patching) for language models.

Importing this package loads no model library (transformer_lens, transformers, sae_lens): backends,
node types and methods are plugins, imported only when a plan names them.
"""

from atpframework.analysis.circuits import circuit_faithfulness as circuit_faithfulness
from atpframework.analysis.session import Session as Session
from atpframework.api import as_plan as as_plan
from atpframework.api import compile as compile
from atpframework.api import load_backend as load_backend
from atpframework.api import run as run
from atpframework.errors import AtpfError as AtpfError
from atpframework.errors import BackendError as BackendError
from atpframework.errors import PlanError as PlanError
from atpframework.errors import PluginError as PluginError
from atpframework.errors import SchemaError as SchemaError
from atpframework.io.results import AttributionResult as AttributionResult
from atpframework.io.results import load_result as load_result
from atpframework.methods.base import AbstractMethod as AbstractMethod
from atpframework.model.backend import AbstractBackend as AbstractBackend
from atpframework.model.backend import ModelInfo as ModelInfo
from atpframework.model.edges import edge_selections as edge_selections
from atpframework.model.interventions import Intervention as Intervention
from atpframework.model.node import AbstractNode as AbstractNode
from atpframework.model.node import NodeSpec as NodeSpec
from atpframework.model.node import Selection as Selection
from atpframework.model.sites import Site as Site
from atpframework.plans.compiled import BatchRun as BatchRun
from atpframework.plans.compiled import BatchScores as BatchScores
from atpframework.plans.compiled import CompiledPlan as CompiledPlan
from atpframework.plans.compiled import PassStep as PassStep
from atpframework.plans.metrics import MetricInputs as MetricInputs
from atpframework.plans.plan import AttributionPlan as AttributionPlan
from atpframework.plans.plan import MethodConfig as MethodConfig
from atpframework.plans.plan import load_plan as load_plan
from atpframework.plans.plan import parse_plan as parse_plan
from atpframework.plans.plan import plan_json_schema as plan_json_schema
from atpframework.version import __version__ as __version__

__all__ = [
    "AbstractBackend", "AbstractMethod", "AbstractNode", "AtpfError", "AttributionPlan", "AttributionResult", "BackendError",
    "BatchRun", "BatchScores", "CompiledPlan", "Intervention", "PassStep", "MethodConfig", "MetricInputs", "ModelInfo", "NodeSpec", "PlanError", "PluginError", "SchemaError",
    "Selection", "Session", "Site", "as_plan", "circuit_faithfulness", "compile", "edge_selections", "load_backend", "load_plan",
    "load_result", "parse_plan",
    "plan_json_schema", "run",
]
