"""bilevel: bilevel optimization and implicit differentiation in JAX."""

from . import (
    distributed as distributed,
    problems as problems,
    prox as prox,
    solvers as solvers,
)
from ._argmin import (
    argmin as argmin,
    fixed_point as fixed_point,
    least_squares as least_squares,
    projected_gradient as projected_gradient,
    proximal_gradient as proximal_gradient,
    root as root,
)
from ._conditions import (
    OptimalityCondition as OptimalityCondition,
    kkt_condition as kkt_condition,
    kkt_multipliers as kkt_multipliers,
    projected_gradient_condition as projected_gradient_condition,
    proximal_gradient_condition as proximal_gradient_condition,
    stationarity_condition as stationarity_condition,
)
from ._data import (
    AbstractData as AbstractData,
    BlockMinibatch as BlockMinibatch,
    FixedBatches as FixedBatches,
    FullBatch as FullBatch,
    Minibatch as Minibatch,
)
from ._implicit import (
    HypergradientInfo as HypergradientInfo,
    HypergradientStatus as HypergradientStatus,
    hypergradient as hypergradient,
    implicit_diff as implicit_diff,
)
from ._linear import MINRES as MINRES, Neumann as Neumann, Richardson as Richardson
from ._problem import (
    BilevelProblem as BilevelProblem,
    MultiBlockProblem as MultiBlockProblem,
)
from ._projection import projection as projection
from ._result import Result as Result, Status as Status
from ._solve import (
    LoopState as LoopState,
    init as init,
    run as run,
    run_from as run_from,
    solve as solve,
)
from ._solver import (
    FEATURES as FEATURES,
    METRICS as METRICS,
    AbstractBilevelSolver as AbstractBilevelSolver,
)


__version__ = "0.1.0"
