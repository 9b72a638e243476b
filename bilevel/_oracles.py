r"""The per-step oracle bundle of first- and second-order bilevel methods.

At $(x, y)$, with a vector $v$ like $y$, an upper batch $\xi$ and a lower batch
$\zeta$, one value-and-gradient of $f$ and one VJP of the optimality condition
$\Phi$ ($\nabla_y g$ by default) give everything SOBA-type, BSVRB, BOREP and IFT steps
need:

- $f(x, y; \xi)$, $\nabla_x f$, $\nabla_y f$;
- $\Phi(x, y; \zeta)$ (the lower gradient);
- $\partial_y\Phi^\top v$ (the Hessian-vector product $\nabla^2_{yy} g\, v$) and
  $\partial_x\Phi^\top v$ (the cross product $\nabla^2_{xy} g\, v$), both from the same
  VJP, so the condition's forward pass is done once.

No Hessian is formed.
"""

from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, PyTree, Scalar


class Oracles(eqx.Module):
    """Values and products at one point; see the module docstring for the maths."""

    upper_loss: Scalar
    upper_grad_x: PyTree[Array]
    upper_grad_y: PyTree[Array]
    lower_grad: PyTree[Array]
    hvp: PyTree[Array]
    cross: PyTree[Array]


def oracles(
    problem: Any,
    x: PyTree[Array],
    y: PyTree[Array],
    v: PyTree[Array],
    upper_batch: Any,
    lower_batch: Any,
) -> Oracles:
    r"""$f$, $\nabla_x f$, $\nabla_y f$ on `upper_batch`; $\Phi$,
    $\partial_y\Phi^\top v$ and $\partial_x\Phi^\top v$ on `lower_batch`."""
    value, (grad_x, grad_y) = jax.value_and_grad(problem.upper, argnums=(0, 1))(
        x, y, upper_batch
    )
    condition = problem.condition
    phi, phi_vjp = jax.vjp(lambda x_, y_: condition(x_, y_, lower_batch), x, y)
    cross, hvp = phi_vjp(v)
    return Oracles(value, grad_x, grad_y, phi, hvp, cross)
