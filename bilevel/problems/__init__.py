"""Benchmark tasks: each constructor returns a [`bilevel.problems.Benchmark`][]."""

from ._benchmark import Benchmark as Benchmark
from ._distillation import distillation as distillation
from ._hypercleaning import hypercleaning as hypercleaning
from ._hyperrep import hyper_representation as hyper_representation
from ._imaml import (
    FewShotTasks as FewShotTasks,
    TaskPool as TaskPool,
    imaml as imaml,
    imaml_meta_train as imaml_meta_train,
)
from ._logreg import logreg_hpo as logreg_hpo
from ._multiblock import (
    multiblock_hpo as multiblock_hpo,
    multiblock_quadratic as multiblock_quadratic,
)
from ._quadratic import quadratic as quadratic
from ._registry import make as make, parameters as parameters, registry as registry
from ._ridge import ridge_hpo as ridge_hpo
from ._svm import svm_hpo as svm_hpo
