"""The main job (`make demo`): solve a bilevel problem with every foundation solver,
show progress, and compare with the closed-form answer."""

import time

import jax
import jax.numpy as jnp

import bilevel as bl


jax.config.update("jax_enable_x64", True)


def main() -> None:
    bench = bl.problems.quadratic(dim_x=5, dim_y=10, seed=0)
    solvers = {
        "ImplicitDiff": bl.solvers.ImplicitDiff(inner_steps=10, outer_lr=1.0),
        "Unrolled": bl.solvers.Unrolled(inner_steps=80, inner_lr=0.2, outer_lr=1.0),
    }
    rows = []
    for name, solver in solvers.items():
        print(f"\n{name} on the quadratic bilevel problem (dim_x=5, dim_y=10)")
        start = time.perf_counter()
        result = bl.solve(
            bench.problem, solver, bench.x0, bench.y0, bench.data,
            num_steps=2000, log_every=25, tol=1e-8,
        )
        seconds = time.perf_counter() - start
        metrics = bench.evaluate(result.x, result.y)
        rows.append((name, str(result.status), result.num_steps, float(metrics["x_error"]),
                     float(result.history["grad_norm"][-1]), seconds))
    print(f"\n{'solver':<14}{'status':<11}{'steps':>6}{'|x - x*|':>12}{'|grad F|':>12}{'wall s':>8}")
    for name, status, steps, err, grad, seconds in rows:
        print(f"{name:<14}{status:<11}{steps:>6}{err:>12.2e}{grad:>12.2e}{seconds:>8.1f}")
    x = bench.x0 + 1.0
    grad, info = bl.hypergradient(bench.problem, x, bench.lower_solution(x), bench.data.lower)
    error = jnp.linalg.norm(grad - bench.hypergradient(x)) / jnp.linalg.norm(bench.hypergradient(x))
    print(f"\nIFT hypergradient vs closed form: relative error {float(error):.1e} "
          f"({int(info.linear_steps)} CG iterations, optimality residual "
          f"{float(info.optimality_residual):.1e})")


if __name__ == "__main__":
    main()
