"""OLSS: the least squares and the path search of Duan et al. 2023 ("Optimal Linear Subspace
Search: Learning to Construct Fast and High-Quality Schedulers for Diffusion Models",
CIKM 2023), on recorded teacher trajectories, in float64 numpy on the host.

A trajectory of the teacher's full sampler (N steps) is recorded as

  states  z_0 = z_T, z_1, ..., z_N        (z_N the sampler's result)   shape (N + 1, R)
  outputs e_0, ..., e_{N-1}               (the model output at z_i)     shape (N, R)

with the R = B x H x W x C numbers of all B trajectories flattened into one row each (the
fit pools every pixel of every trajectory). An n-step OLSS scheduler on the path
0 = i_0 < i_1 < ... < i_{n-1} < N predicts, at step j,

  z_{i_{j+1}} ~ wx_j b_j + sum_{m <= j} we_{j,m} e_{i_m}          (i_n = N)

with the coefficients of the ordinary least squares over the R rows (the paper's Sec. 3.2;
EasyNLP `olss.py` `solve_scheduer_parameters`), and its error the mean squared residual.
The state term b_j is the basis choice below.

Path search (EasyNLP `resolve_diffusion_process_graph`): bisect a tolerance; at each
tolerance walk greedily from i = 0, taking as the next index the farthest one whose
one-step fit error stays under the tolerance (itself found by bisection, as the reference
does, which assumes the error grows with the distance); the tolerance is feasible when the
walk reaches N within n steps. The path of the smallest feasible tolerance is refitted.

The basis. The reference searches with the teacher's *current* state b_j = z_{i_j} but
fits and samples with b_j = z_T (basis 'start' here). Basis 'current' (the default) uses
z_{i_j} in all three: each step starts from the sampler's own current state, as DDIM and
the linear multistep solvers do (a DDIM step is one such combination of z_{i_j} and
e_{i_j}, so the fit can only improve on it), and the error the search bounds is exactly
the one-step error of the step the refit produces. The README's OLSS table
(benchmarks/digits_olss.py) compares the two. A search with z_T in the basis is not
offered: every target state then has to be reached from z_T and the outputs so far, late
states are as hard to reach as the result, so the walk never places an evaluation in the
low-noise part of the trajectory (tried on the digits: at 10 steps the samples fell apart).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

BASES = ("current", "start")  # the state term of each step: z_{i_j} or z_T (module doc)


def _rows(a, name):
  a = np.asarray(a, np.float64)
  if a.ndim < 2:
    raise ValueError(f"{name} must be (steps, ...) with the recorded numbers after the "
                     f"step axis, got shape {a.shape}")
  return a.reshape(a.shape[0], -1)


def check_trajectory(states, outputs):
  """(states (N + 1, R), outputs (N, R)) as float64, or a one-line ValueError."""
  z, e = _rows(states, "states"), _rows(outputs, "outputs")
  if z.shape[0] != e.shape[0] + 1 or z.shape[1] != e.shape[1]:
    raise ValueError(f"a trajectory of N steps has N + 1 states and N model outputs of one "
                     f"size; got states {z.shape} and outputs {e.shape}")
  if not (np.all(np.isfinite(z)) and np.all(np.isfinite(e))):
    raise ValueError("the recorded trajectory is not finite (NaN/inf): the teacher's "
                     "sampler diverged")
  return z, e


def step_fit(state, basis_outputs, target):
  """(coefficients (1 + m,), mean squared error) of target ~ c_0 state + sum_k c_k e_k by
  ordinary least squares (numpy.linalg.lstsq, SVD: the outputs of neighbouring steps are
  nearly collinear, which normal equations would square)."""
  a = np.concatenate([state[None], np.asarray(basis_outputs)], axis=0).T  # (R, 1 + m)
  coef = np.linalg.lstsq(a, target, rcond=None)[0]
  residual = a @ coef - target
  return coef, float(np.mean(residual * residual))


def check_basis(basis: str) -> str:
  if basis not in BASES:
    raise ValueError(f"unknown OLSS basis {basis!r}; choose from {BASES}")
  return basis


def fit_path(states, outputs, path: Sequence[int], basis: str = "current"):
  """The OLSS coefficients on `path` (i_0 = 0 < ... < i_{n-1} < N): (wx (n,), we (n, n),
  errors (n,)), we lower-triangular (we[j, m] = 0 for m > j); wx_j multiplies z_{i_j}
  (basis 'current') or z_T ('start')."""
  z, e = check_trajectory(states, outputs)
  path = check_path(path, e.shape[0])
  check_basis(basis)
  n = len(path)
  wx, we, errors = np.zeros(n), np.zeros((n, n)), np.zeros(n)
  ends = list(path[1:]) + [e.shape[0]]
  for j in range(n):
    state = z[path[j]] if basis == "current" else z[0]
    coef, errors[j] = step_fit(state, e[list(path[:j + 1])], z[ends[j]])
    wx[j], we[j, :j + 1] = coef[0], coef[1:]
  return wx, we, errors


def check_path(path, num_teacher_steps: int) -> list[int]:
  """`path` as a list, or a one-line ValueError: it must start at 0, increase strictly and
  stay below the teacher's step count N (the last step goes to the result, index N)."""
  p = [int(i) for i in path]
  if not p:
    raise ValueError("an OLSS path needs at least one step (n >= 1)")
  if len(p) > num_teacher_steps:
    raise ValueError(f"an OLSS path of {len(p)} steps is longer than the teacher's "
                     f"{num_teacher_steps} steps it is fitted on")
  if p[0] != 0 or any(b <= a for a, b in zip(p, p[1:])) or p[-1] >= num_teacher_steps:
    raise ValueError(f"an OLSS path must be 0 = i_0 < i_1 < ... < {num_teacher_steps}, "
                     f"got {p}")
  return p


def uniform_path(num_teacher_steps: int, n: int) -> list[int]:
  """OLSS-P's path, no search: every (N // n)-th teacher step from 0 (EasyNLP
  `resolve_diffusion_process` without `i_path`)."""
  check_steps(num_teacher_steps, n)
  return list(range(0, num_teacher_steps, num_teacher_steps // n))[:n]


def check_steps(num_teacher_steps: int, n: int) -> None:
  if int(n) < 1:
    raise ValueError(f"OLSS needs n >= 1 steps, got {n}")
  if int(n) > int(num_teacher_steps):
    raise ValueError(f"OLSS with {n} steps needs a teacher trajectory of at least {n} steps, "
                     f"got {num_teacher_steps}: raise method.teacher_steps")


def _farthest_next(z, e, path, tolerance):
  """The farthest index after path[-1] whose step fit from the path (the current state
  z_{path[-1]} and the outputs on the path) stays within `tolerance` (bisection over the
  index, as the reference), or path[-1] + 1 if none does."""
  lo, hi = path[-1] + 1, e.shape[0]
  basis = e[list(path)]
  while hi > lo:
    mid = (lo + hi + 1) // 2
    if step_fit(z[path[-1]], basis, z[mid])[1] > tolerance:
      hi = mid - 1
    else:
      lo = mid
  return lo


def greedy_path(states, outputs, n: int, tolerance: float) -> Optional[list[int]]:
  """The greedy walk at `tolerance`: the path (at most n steps) when it reaches the end,
  else None."""
  z, e = check_trajectory(states, outputs)
  return _greedy(z, e, n, tolerance)


def _greedy(z, e, n, tolerance):
  path = [0]
  for _ in range(n):
    nxt = _farthest_next(z, e, path, tolerance)
    if nxt == e.shape[0]:
      return path
    path.append(nxt)
  return None


def _fill(path, n, end):
  """A feasible path shorter than n, lengthened by halving its longest gaps (a step
  more only adds a basis output and shortens a jump): the scheduler takes exactly n."""
  path = list(path)
  while len(path) < n:
    width, k = max((b - a, k) for k, (a, b) in enumerate(zip(path, path[1:] + [end])))
    if width < 2:
      break
    path.insert(k + 1, path[k] + width // 2)
  return path


def search_path(states, outputs, n: int, iterations: int = 30,
                tolerance_hi: float = 10.0) -> tuple[list[int], float]:
  """(path, tolerance): the greedy path of the smallest feasible tolerance found by
  `iterations` bisections of [0, tolerance_hi] (the reference's 30 on [0, 10]; the upper
  end is doubled until feasible), lengthened to exactly n steps."""
  z, e = check_trajectory(states, outputs)
  check_steps(e.shape[0], n)
  lo, hi = 0.0, float(tolerance_hi)
  for _ in range(60):  # an upper end that is feasible
    if _greedy(z, e, n, hi) is not None:
      break
    lo, hi = hi, 2.0 * hi
  else:
    raise ValueError("OLSS path search found no feasible path: the trajectory's fit errors "
                     "do not fall with the tolerance")
  for _ in range(int(iterations)):
    mid = 0.5 * (lo + hi)
    if _greedy(z, e, n, mid) is None:
      lo = mid
    else:
      hi = mid
  return _fill(_greedy(z, e, n, hi), n, e.shape[0]), hi
