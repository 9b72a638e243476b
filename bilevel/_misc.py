"""Small pytree helpers shared by the whole package."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Bool, PyTree, Scalar


def tree_dot(a: PyTree[Array], b: PyTree[Array]) -> Scalar:
    """Euclidean inner product of two pytrees with the same structure."""
    products = [jnp.vdot(u, v) for u, v in zip(jtu.tree_leaves(a), jtu.tree_leaves(b))]
    if not products:
        return jnp.zeros(())
    return sum(products[1:], products[0])


def tree_norm(a: PyTree[Array]) -> Scalar:
    """Euclidean norm of a pytree seen as one flat vector."""
    leaves = jtu.tree_leaves(a)
    if not leaves:
        return jnp.zeros(())
    return jnp.sqrt(sum(jnp.sum(jnp.abs(u) ** 2) for u in leaves))


def tree_axpy(alpha, a: PyTree[Array], b: PyTree[Array]) -> PyTree[Array]:
    """alpha * a + b, leafwise, with `alpha` cast to each leaf's dtype (a float64 step
    size never promotes a float32 leaf, which strict dtype promotion rejects)."""
    return jtu.tree_map(
        lambda u, v: jnp.asarray(alpha, jnp.result_type(u)) * u + v, a, b
    )


def tree_scale(alpha, a: PyTree[Array]) -> PyTree[Array]:
    """alpha * a, leafwise."""
    return jtu.tree_map(lambda u: alpha * u, a)


def tree_sub(a: PyTree[Array], b: PyTree[Array]) -> PyTree[Array]:
    """a - b, leafwise."""
    return jtu.tree_map(lambda u, v: u - v, a, b)


def tree_all_finite(tree: PyTree) -> Bool[Array, ""]:
    r"""True when every inexact array leaf of `tree` is finite.

    Uses $\sum_i 0 \cdot u_i$, which is NaN exactly when some $u_i$ is NaN or inf and
    cannot overflow: one fused reduction per leaf (this runs at every step of `run`).
    """
    finite = jnp.array(True)
    for u in jtu.tree_leaves(tree):
        if isinstance(u, jax.Array) and jnp.issubdtype(u.dtype, jnp.inexact):
            finite = finite & jnp.isfinite(jnp.sum(u * 0))
    return finite


def tree_where(pred, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leafwise `jnp.where(pred, a, b)` for two pytrees of the same structure."""
    return jtu.tree_map(lambda u, v: jnp.where(pred, u, v), on_true, on_false)


def tree_project_ball(tree: PyTree[Array], radius) -> PyTree[Array]:
    r"""Euclidean projection of the whole pytree onto $\{\|z\| \le R\}$, $R$ =
    `radius` (identity for `radius=None`)."""
    if radius is None:
        return tree
    norm = tree_norm(tree)
    safe_norm = jnp.maximum(norm, jnp.finfo(norm.dtype).tiny)
    return tree_scale(jnp.minimum(1.0, radius / safe_norm).astype(norm.dtype), tree)


def default_tolerance(dtype, float64: float = 1e-10, float32: float = 1e-5) -> float:
    """A solver tolerance that the floating type can reach: `float64` for 64-bit types,
    `float32` for narrower ones."""
    return float64 if jnp.finfo(dtype).bits >= 64 else float32


class Frozen(eqx.Module):
    """The parts of a variable that solvers never update: non-floating arrays (carried
    as they are) and everything that is not an array (activation functions, flags,
    ...)."""

    arrays: PyTree
    static: PyTree = eqx.field(static=True)

    @property
    def is_empty(self) -> bool:
        """True when the variable is made of floating-point leaves only."""
        return not jtu.tree_leaves((self.arrays, self.static))


def _is_variable_leaf(leaf) -> bool:
    if isinstance(leaf, jax.Array | np.ndarray | np.generic):
        return jnp.issubdtype(leaf.dtype, jnp.floating)
    return isinstance(leaf, float)


def split_variable(tree: PyTree) -> tuple[PyTree[Array], Frozen]:
    """Split a variable (array, dict, equinox Module such as `eqx.nn.MLP`, ...) into its
    floating-point leaves, which solvers differentiate and update, and the rest.

    Python floats become arrays of the default floating dtype; `merge_variable` undoes
    the split.
    """
    params, rest = eqx.partition(tree, _is_variable_leaf)
    params = jtu.tree_map(
        lambda u: jnp.asarray(u, jnp.result_type(float)) if isinstance(u, float) else u,
        params,
    )
    arrays, static = eqx.partition(rest, eqx.is_array)
    return params, Frozen(arrays, static)


def merge_variable(params: PyTree[Array], frozen: Frozen) -> PyTree:
    """Inverse of `split_variable`."""
    return eqx.combine(params, frozen.arrays, frozen.static)


def structure_of(tree: PyTree) -> PyTree[jax.ShapeDtypeStruct]:
    """Shapes and dtypes of every array leaf (non-arrays are kept as they are)."""
    return jtu.tree_map(
        lambda u: (
            jax.ShapeDtypeStruct(jnp.shape(u), jnp.result_type(u))
            if eqx.is_array_like(u)
            else u
        ),
        tree,
    )
