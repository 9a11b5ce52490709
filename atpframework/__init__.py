"""atpframework: attribution patching (AtP, and exact activation patching) for language models.

Importing this package loads no model library (transformer_lens, transformers, sae_lens): backends,
node types and methods are plugins, imported only when a plan names them.
"""

from .api import as_plan as as_plan
from .api import compile as compile
from .api import load_backend as load_backend
from .api import run as run
from .backend import AbstractBackend as AbstractBackend
from .backend import ModelInfo as ModelInfo
from .compiled import CompiledPlan as CompiledPlan
from .errors import AtpfError as AtpfError
from .errors import BackendError as BackendError
from .errors import PlanError as PlanError
from .errors import PluginError as PluginError
from .errors import SchemaError as SchemaError
from .methods import AbstractMethod as AbstractMethod
from .metrics import MetricInputs as MetricInputs
from .node import AbstractNode as AbstractNode
from .node import NodeSpec as NodeSpec
from .node import Selection as Selection
from .plan import AttributionPlan as AttributionPlan
from .plan import MethodConfig as MethodConfig
from .plan import load_plan as load_plan
from .plan import parse_plan as parse_plan
from .plan import plan_json_schema as plan_json_schema
from .results import AttributionResult as AttributionResult
from .results import load_result as load_result
from .sites import Site as Site
from .version import __version__ as __version__


__all__ = [
    "AbstractBackend", "AbstractMethod", "AbstractNode", "AtpfError", "AttributionPlan", "AttributionResult", "BackendError",
    "CompiledPlan", "MethodConfig", "MetricInputs", "ModelInfo", "NodeSpec", "PlanError", "PluginError", "SchemaError",
    "Selection", "Site", "as_plan", "compile", "load_backend", "load_plan", "load_result", "parse_plan",
    "plan_json_schema", "run",
]
