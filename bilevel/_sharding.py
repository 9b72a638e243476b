"""Sharding constraints that accept meshes of every axis type.

`jax.make_mesh` gives its axes the `Explicit` type, `jax.sharding.Mesh` the `Auto` type.
`lax.with_sharding_constraint` accepts only `Auto` axes, and `jax.sharding.reshard`
needs the mesh to be set as context (`jax.set_mesh`). `constrain` picks what works: a
`reshard` inside an explicit-mesh context, otherwise a constraint on the same devices
and axis names with every axis `Auto` (compiler-propagated shardings).
"""

from typing import Any

import jax
import jax.lax as lax
import jax.tree_util as jtu
from jax.sharding import AxisType, Mesh, NamedSharding
from jaxtyping import PyTree


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with every axis `Auto`."""
    return Mesh(
        mesh.devices,
        mesh.axis_names,
        axis_types=(AxisType.Auto,) * len(mesh.axis_names),
    )


def _in_explicit_context() -> bool:
    context = jax.sharding.get_abstract_mesh()
    return bool(context.axis_names) and AxisType.Explicit in context.axis_types


def constrain(tree: PyTree, sharding: Any) -> PyTree:
    """Ask that every array leaf of `tree` be laid out as `sharding` (inside `jit`).

    `None` leaves the tree as it is. A `NamedSharding` may be built on a mesh of any
    axis types; other shardings are passed to `lax.with_sharding_constraint` as they
    are.
    """
    if sharding is None:
        return tree
    if isinstance(sharding, NamedSharding):
        if _in_explicit_context():
            return jtu.tree_map(lambda u: jax.sharding.reshard(u, sharding.spec), tree)
        sharding = NamedSharding(auto_mesh(sharding.mesh), sharding.spec)
    return jtu.tree_map(lambda u: lax.with_sharding_constraint(u, sharding), tree)
