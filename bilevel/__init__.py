"""bilevel: bilevel optimization and implicit differentiation in JAX."""

from . import problems as problems, solvers as solvers
from ._conditions import (
    OptimalityCondition as OptimalityCondition,
    kkt_condition as kkt_condition,
    projected_gradient_condition as projected_gradient_condition,
    proximal_gradient_condition as proximal_gradient_condition,
    stationarity_condition as stationarity_condition,
)
from ._data import (
    AbstractData as AbstractData,
    FixedBatches as FixedBatches,
    FullBatch as FullBatch,
    Minibatch as Minibatch,
)
from ._implicit import (
    HypergradientInfo as HypergradientInfo,
    hypergradient as hypergradient,
    implicit_diff as implicit_diff,
)
from ._linear import Neumann as Neumann, Richardson as Richardson
from ._problem import (
    BilevelProblem as BilevelProblem,
    MultiBlockProblem as MultiBlockProblem,
)
from ._result import Result as Result, Status as Status
from ._solve import run as run, solve as solve
from ._solver import (
    FEATURES as FEATURES,
    METRICS as METRICS,
    AbstractBilevelSolver as AbstractBilevelSolver,
)


__version__ = "0.1.0"
