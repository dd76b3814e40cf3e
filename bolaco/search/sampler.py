"""The sampler of every bolaco study: proposals on the budget hyperplane, distinct across workers and resumes.

`BudgetSampler` is an Optuna sampler that owns the whole search space (all variables are sampled jointly in
`sample_relative`) and composes a *model step*, registered in SAMPLERS under the name `search.sampler` uses:
- `botorch`: a GP on the objective (search NLL, i.e. log-perplexity, by default) with LogEI optimised on the budget
  hyperplane (`optimize_acqf` with an equality constraint), or qLogEI with the running trials as pending points
  X_pending when other workers are evaluating. Optionally the first `coarse_trials` trials are proposed in the
  low-dimensional space of one ratio per type group and then refined (coarse-to-fine; the GP of the fine space
  sees the coarse trials as data).
- `gp` (Optuna's GPSampler, qLogEI over running trials) and `tpe` (multivariate TPE with constant liar): their
  proposals are projected onto the hyperplane before they are stored.
- `random`: no model; every trial is a start-up draw.
Whatever the step, the stored parameters are the point that is evaluated. Start-up points are space-filling draws
from the budget polytope that account for every trial in the store, running or finished, and every trial has its
own seed (the study seed and the trial number), so two workers or a resumed study never draw the same point. A
proposal whose level map equals that of a stored trial is replaced by a start-up draw. How each trial was
proposed (`startup`, `model`, `fallback-acqf`, `fallback-duplicate`) and the sampling seconds are kept in
`proposals` for the worker to record.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from typing import Any

import optuna
import torch
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from ..registry import Registry
from .records import LEVELS, levels_key
from .space import SearchSpace, scale_onto_plane

STARTUP_CANDIDATES = 64      # polytope draws per start-up point; the one farthest from all stored points wins
REFIT_EVERY = 10             # the GP's hyperparameters are fitted from scratch every 10 trials, warm-started between


def trial_seed(seed: int, number: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{number}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def polytope_draws(n: int, constraint, dim: int, seed: int) -> torch.Tensor:
    """n points of {u in [0, 1]^dim : a . u = b} by hit-and-run (BoTorch), seeded."""
    from botorch.utils.sampling import get_polytope_samples
    unit = torch.stack([torch.zeros(dim, dtype=torch.float64), torch.ones(dim, dtype=torch.float64)])
    return get_polytope_samples(n, unit, equality_constraints=[constraint], seed=seed, n_burnin=200,
                                n_thinning=2).clamp(0, 1)


def maximin(candidates: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """The candidate farthest from every row of `taken` (the first candidate when nothing is taken)."""
    if taken.shape[0] == 0:
        return candidates[0]
    return candidates[torch.cdist(candidates, taken).min(dim=1).values.argmax()]


def botorch_step(x: torch.Tensor, y: torch.Tensor, pending: torch.Tensor | None, constraint, seed: int,
                 warm: dict | None = None, candidates: int = 512, restarts: int = 3) -> tuple[torch.Tensor, dict]:
    """Next point in unit coordinates, and the GP's hyperparameters for the next call's warm start.

    GP on (x, -y) (y is minimised); LogEI, or qLogEI with the pending points. The acquisition is evaluated on
    `candidates` seeded draws from the budget polytope plus perturbations of the best observed points, and SLSQP
    refines the best few on the hyperplane. BoTorch's own start-point generator for equality constraints
    (hit-and-run per call) costs seconds, as does a cold GP fit in 40 dimensions: with a warm start the fit
    takes a few L-BFGS iterations. Raises what BoTorch raises when it fails."""
    from botorch.acquisition.analytic import LogExpectedImprovement
    from botorch.acquisition.logei import qLogExpectedImprovement
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Standardize
    from botorch.optim import optimize_acqf
    from botorch.utils.sampling import manual_seed
    from gpytorch.mlls import ExactMarginalLogLikelihood

    dim = x.shape[1]
    with manual_seed(seed):
        gp = SingleTaskGP(x, -y.unsqueeze(-1), outcome_transform=Standardize(m=1))
        if warm is not None:
            with torch.no_grad():
                for name, p in gp.named_parameters():
                    p.copy_(warm[name])
        fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp),
                         optimizer_kwargs={"options": {"maxiter": 30}} if warm is not None else {})
        best = float((-y).max())
        acqf = (LogExpectedImprovement(gp, best_f=best) if pending is None
                else qLogExpectedImprovement(gp, best_f=best, X_pending=pending))
        _, coef, rhs = constraint
        g = torch.Generator().manual_seed(seed)
        top = x[(-y).topk(min(4, len(y))).indices]
        local = top.repeat_interleave(candidates // 8, 0)
        local = local + 0.05 * torch.randn(local.shape, generator=g, dtype=x.dtype)
        cands = torch.cat([polytope_draws(candidates, constraint, dim, seed),
                           scale_onto_plane(local.clamp(0, 1), coef, rhs, 0.0, 1.0)])
        with torch.no_grad():
            values = acqf(cands.unsqueeze(1))
        starts = cands[values.topk(restarts).indices].unsqueeze(1)
        unit = torch.stack([torch.zeros(dim, dtype=x.dtype), torch.ones(dim, dtype=x.dtype)])
        cand, _ = optimize_acqf(acqf, bounds=unit, q=1, num_restarts=restarts, batch_initial_conditions=starts,
                                equality_constraints=[constraint], options={"maxiter": 50, "batch_limit": restarts})
    state = {k: v.detach().clone() for k, v in gp.named_parameters()}
    return cand.detach().reshape(-1).clamp(0, 1), state


class ModelStep:
    """How a sampler proposes once the start-up is over: from the finished (and running) trials, the next point in
    the space's coordinates. BudgetSampler does the rest (start-up draws, projection onto the budget hyperplane,
    duplicates, records). Register a new one in SAMPLERS."""
    coarse_to_fine = False      # can propose in the coarse space of one ratio per type group first

    def propose(self, sampler: "BudgetSampler", study, trial: FrozenTrial, search_space: dict,
                done: list[FrozenTrial], running: list[FrozenTrial], seed: int, coarse: bool) -> torch.Tensor:
        raise NotImplementedError


SAMPLERS: Registry[type[ModelStep] | None] = Registry("sampler")
SAMPLERS.register("random")(None)


@SAMPLERS.register("botorch")
class BoTorchStep(ModelStep):
    coarse_to_fine = True

    def __init__(self):
        self._gp_state: dict[str, dict] = {}

    def propose(self, sampler, study, trial, search_space, done, running, seed, coarse):
        space = sampler.space
        lift = space.coarse_lift if coarse else None
        x = torch.stack([sampler.coords(space.vector(t.params), coarse) for t in done])
        y = torch.tensor([t.value for t in done], dtype=torch.float64)
        pending = torch.stack([sampler.coords(space.vector(t.params), coarse) for t in running]) if running else None
        # warm-start the GP from this process's last fit in the same phase; a full fit every REFIT_EVERY trials
        key = "coarse" if coarse else "fine"
        warm = self._gp_state.get(key) if trial.number % REFIT_EVERY else None
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # BoTorch's small dense algebra is several times slower with more threads
        try:
            u, self._gp_state[key] = botorch_step(x, y, pending, space.unit_constraint(lift), seed, warm)
        finally:
            torch.set_num_threads(threads)
        return space.from_unit(u if lift is None else lift @ u)


class OptunaStep(ModelStep):
    """One of Optuna's samplers, fresh for each trial with its own seed (start-up is BudgetSampler's)."""

    def make(self, seed: int) -> BaseSampler:
        raise NotImplementedError

    def propose(self, sampler, study, trial, search_space, done, running, seed, coarse):
        inner = self.make(seed)
        params = inner.sample_relative(study, trial, search_space)
        return sampler.space.vector({n: params[n] if n in params else
                                     inner.sample_independent(study, trial, n, search_space[n])
                                     for n in sampler.space.names})


@SAMPLERS.register("gp")
class GPStep(OptunaStep):
    def make(self, seed):
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=0, warn_independent_sampling=False)


@SAMPLERS.register("tpe")
class TPEStep(OptunaStep):
    def make(self, seed):
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=0, multivariate=True, constant_liar=True)


class BudgetSampler(BaseSampler):
    def __init__(self, space: SearchSpace, model: ModelStep | None = None, seed: int = 0, startup: int = 10,
                 coarse_trials: int = 0):
        self.space, self.model, self.seed, self.startup = space, model, seed, startup
        self.coarse_trials = coarse_trials if model is not None and model.coarse_to_fine else 0
        self.proposals: dict[int, dict[str, Any]] = {}
        self._distributions = {n: FloatDistribution(space.r_min, 1.0) for n in space.names}

    @classmethod
    def named(cls, space: SearchSpace, sampler: str, seed: int = 0, startup: int = 10,
              coarse_trials: int = 0) -> "BudgetSampler":
        step = SAMPLERS.get(sampler, "search.sampler")
        return cls(space, step() if step is not None else None, seed, startup, coarse_trials)

    def infer_relative_search_space(self, study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._distributions)

    def sample_independent(self, study, trial, param_name, param_distribution):
        raise RuntimeError(f"BudgetSampler samples every variable jointly; '{param_name}' is not a search variable")

    def sample_relative(self, study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        start = time.perf_counter()
        space = self.space
        names = set(space.names)
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        stored = [t for t in study.get_trials(deepcopy=False, states=states)
                  if t.number != trial.number and names <= t.params.keys()]
        done = [t for t in stored if t.state == TrialState.COMPLETE]
        running = [t for t in stored if t.state == TrialState.RUNNING]
        seed = trial_seed(self.seed, trial.number)
        coarse = trial.number < self.coarse_trials
        info: dict[str, Any] = {"seed": seed, "phase": "coarse" if coarse else "fine"}
        x = None
        if self.model is not None and len(stored) >= self.startup and len(done) >= 2:
            try:
                x = self.model.propose(self, study, trial, search_space, done, running, seed, coarse)
                info["proposal"] = "model"
            except Exception as exc:   # BoTorch/SciPy raise many types; one failed step must not stop a worker
                warnings.warn(f"the sampler's model step failed on trial {trial.number} ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); drawing this trial from the budget polytope instead", stacklevel=2)
                info.update(proposal="fallback-acqf", error=f"{type(exc).__name__}: {str(exc)[:200]}")
        if x is None:
            x = self._startup_point(stored, seed, coarse)
            info.setdefault("proposal", "startup")
        x = space.project(x)
        taken = {levels_key(t.user_attrs[LEVELS]) for t in stored if LEVELS in t.user_attrs}
        if levels_key(space.levels(x)) in taken:
            x = space.project(self._startup_point(stored, seed + 1, coarse))
            info["proposal"] = "fallback-duplicate"
        info["seconds_sampling"] = round(time.perf_counter() - start, 3)
        self.proposals[trial.number] = info
        return space.point(x)

    def _startup_point(self, stored: list[FrozenTrial], seed: int, coarse: bool) -> torch.Tensor:
        space = self.space
        lift = space.coarse_lift if coarse else None
        dim = space.dim if lift is None else lift.shape[1]
        cands = polytope_draws(STARTUP_CANDIDATES, space.unit_constraint(lift), dim, seed)
        taken = torch.stack([self.coords(space.vector(t.params), coarse) for t in stored]) if stored \
            else torch.zeros(0, dim, dtype=torch.float64)
        u = maximin(cands, taken)
        return space.from_unit(u if lift is None else lift @ u)

    def coords(self, x: torch.Tensor, coarse: bool) -> torch.Tensor:
        """Unit coordinates of a stored point in the phase's space (coarse: one per type group)."""
        return self.space.to_unit(self.space.coarse_of(x) if coarse else x)
