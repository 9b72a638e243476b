"""Cost of `bl.run` of ImplicitDiff against the same arithmetic fused by hand (issue
target: <= 1.02x), and against `solver.step` in a bare `lax.scan` (which separates the
loop's overhead from the solver step's own).

The problem and the hand-fused step are those of `hypergradient.py` (logistic
regression with per-feature L2 weights exp(x), n = 2000, d = 100): 1000 outer steps of
10 inner gradient steps, 10 CG iterations (tolerance 0) and a gradient step on x.
Timings are medians of interleaved repeats; ratios measured side by side are what
carry over between machines.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
from _timing import interleaved_median_times, print_table
from hypergradient import PROBLEM, hand_written_hypergradient, make_data

import bilevel as bl


def table(n=2000, d=100, num_outer=1000, inner=10, cg_steps=10, outer_lr=1.0):
    batch = make_data(n, d, seed=1)
    x0, w0 = jnp.full((d,), -6.0), jnp.zeros(d)
    lr = 1.0 / (0.25 * 4.0 + float(jnp.exp(-2.0)))
    cg = lx.CG(rtol=0.0, atol=0.0, max_steps=cg_steps, stabilise_every=None)
    solver = bl.solvers.ImplicitDiff(
        inner_steps=inner, inner_lr=lr, outer_lr=outer_lr, linear_solver=cg
    )
    key = jr.PRNGKey(0)

    def ours():
        return bl.run(PROBLEM, solver, x0, w0, batch, num_outer, key)[0].x

    @jax.jit
    def bare_scan():
        state = solver.init(PROBLEM, x0, w0, key)
        keys = jr.split(key, num_outer)
        state, _ = jax.lax.scan(
            lambda s, k: solver.step(PROBLEM, s, batch, k), state, keys
        )
        return state.x

    @jax.jit
    def fused():
        def step(carry, _):
            x, w, adjoint = carry
            grad, w, adjoint = hand_written_hypergradient(
                x, w, batch, inner, lr, cg_steps, adjoint
            )
            return (x - outer_lr * grad, w, adjoint), None

        carry = (x0, w0, jnp.zeros(d))
        (x, _, _), _ = jax.lax.scan(step, carry, None, length=num_outer)
        return x

    fns = {"bl.run(ImplicitDiff)": ours, "solver.step in lax.scan": bare_scan,
           "hand-fused lax.scan": fused}  # fmt: skip
    times = interleaved_median_times(fns, repeats=7)
    reference = fused()
    rows = []
    for name, seconds in times.items():
        gap = jnp.linalg.norm(fns[name]() - reference) / jnp.linalg.norm(reference)
        rows.append({
            "method": name,
            "median s": seconds,
            "x fused": seconds / times["hand-fused lax.scan"],
            "x bare step": seconds / times["solver.step in lax.scan"],
            "rel. diff of final x": float(gap),
        })  # fmt: skip
    print_table(
        f"{num_outer} ImplicitDiff steps: n={n}, d={d}, {inner} inner steps, "
        f"CG {cg_steps} its",
        rows,
    )


if __name__ == "__main__":
    table()
