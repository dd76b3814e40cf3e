"""The Optuna study of a study file: storage, creation and resumption, the trial runner, the worker loop.

A worker loads the model and the cached bases once, then loops ask -> apply -> evaluate -> tell until the study
has its target of finished trials (all workers together). Trials send a heartbeat; a trial whose worker died is
failed after the grace period and re-queued with the same parameters. With `prefetch`, the next trial is proposed
in a background thread while the current one evaluates (with the current one as a pending point), so that a GPU
worker never waits for the GP. A study records what it was created from (`identity`): a resume with another
model, data, budget, method or search space is refused instead of mixing trials of different questions.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import optuna
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ..decompose import Budget, Compressor, LevelMap
from ..errors import BolacoError
from ..heatmap import keep_heatmap
from ..errors import mask_secrets
from ..study import Study
from .design import designed_points
from .objectives import OBJECTIVES, Objective, make_objective
from .records import LEVELS, Evaluation, Proposal, TrialRecord, levels_key, write
from .sampler import BudgetSampler
from .space import SearchSpace

HEARTBEAT_SECONDS, GRACE_SECONDS = 10, 30   # a worker silent for GRACE_SECONDS has its trial failed and retried

log = logging.getLogger(__name__)


@contextmanager
def _heartbeat_warnings_off():
    """Optuna marks heartbeats, stale-trial failing, the retry callback and metric names experimental, and warns
    that a heartbeat belongs to Study.optimize; bolaco's ask/tell loop records its own heartbeats (see _Heartbeat)
    and pins them in tests."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        yield


def masked_url(url: str) -> str:
    """The storage URL as it may be shown: the password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return mask_secrets(url)


def open_storage(url: str, create: bool = True) -> RDBStorage:
    """An Optuna RDB storage with a heartbeat: a trial whose worker died is failed and re-queued. create=False: a
    SQLite file must exist already (a mistyped path is named, not left behind as an empty database)."""
    if url.startswith("sqlite:///") and not create and not Path(url[len("sqlite:///"):]).is_file():
        raise BolacoError(f"no study store at {url[len('sqlite:///'):]}: start the study with `make study` "
                          "(bolaco search), or correct storage")
    try:
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        with _heartbeat_warnings_off():
            return RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                              engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
    except Exception as exc:   # sqlalchemy raises many types; the user needs the URL and the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        try:
            password = make_url(url).password
        except (ArgumentError, ValueError):
            password = None
        if password:
            first = first.replace(str(password), "***")
        raise BolacoError(f"cannot open the study storage {masked_url(url)}: {mask_secrets(first)}") from None


def study_name(study: Study) -> str:
    return f"{study.name}-{study.search.sampler}"


def artifact_dir(study: Study) -> Path:
    """Where trial heat maps go: beside a SQLite study file, else beside the cache (never the working directory)."""
    if study.storage.startswith("sqlite:///"):
        return Path(study.storage[len("sqlite:///"):]).parent / "artifacts"
    return Path(study.cache_dir).parent / "artifacts"


def trial_id(trial) -> int:
    # Optuna exposes no public id of a trial, and its storages' heartbeats take one; Study.optimize's own
    # heartbeat thread reads this attribute too.
    return trial._trial_id


def identity(study: Study, space: SearchSpace, fingerprint: str, data_hashes: dict[str, str]) -> dict:
    """What a study's trials answer: the same identity or no resume."""
    cfg, dec = study.search, study.decompose
    objective = OBJECTIVES.get(cfg.objective, "search.objective")    # which weights its values depend on
    return {"model": fingerprint, "data": data_hashes, "seq_len": study.seq_len, "budget.remove": study.budget.remove,
            "decompose": f"{dec.method} {sorted(dec.modules)} x{dec.rank_multiple}",
            "search.variables": list(space.names), "search.r_min": cfg.r_min, "search.objective": cfg.objective,
            "search.kl_weight": cfg.kl_weight if objective.reference else 0.0,
            **({"search.recall_weight": cfg.recall_weight} if objective.recall else {}),
            "search.refit_trials": [cfg.refit_trials, cfg.refit_sequences] if cfg.refit_trials else False,
            "value_unit": "nats/token"}


def open_optuna_study(study: Study, space: SearchSpace, create: bool, sampler: BudgetSampler, ident: dict,
                      designs: Callable[[], dict[str, dict[str, float]]]) -> tuple[optuna.Study, RDBStorage]:
    """Create the study (its designed allocations enqueued first) or open it, refusing another identity."""
    storage = open_storage(study.storage, create)
    name = study_name(study)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5) if study.search.pruner == "median" \
        else optuna.pruners.NopPruner()
    exists = name in {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if not create and not exists:
        raise BolacoError(f"no study '{name}' in {masked_url(study.storage)}: "
                          "start it with `make study` (bolaco search) first")
    opt = optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=sampler,
                              pruner=pruner, load_if_exists=True)
    if not exists:
        opt.set_user_attr("identity", ident)
        opt.set_user_attr("study_file", study.path)
        with _heartbeat_warnings_off():
            opt.set_metric_names([f"search {study.search.objective} (nats/token)"])
        for design, point in designs().items():   # evaluated first, in this order
            opt.enqueue_trial(point, user_attrs={"proposal": design if design == "uniform" else f"design:{design}"})
        return opt, storage
    found = opt.user_attrs.get("identity")
    if found != ident:
        diff = [k for k in ident if not isinstance(found, dict) or found.get(k) != ident[k]]
        what = ", ".join(diff) if isinstance(found, dict) else "identity (an older bolaco made it)"
        raise BolacoError(f"study '{name}' in {masked_url(study.storage)} was created with another {what}: its trials "
                          "answer another question; start a new study (--set name=<new name>) or resume with the "
                          "study file it was created with")
    return opt, storage


def allocation_heatmap(budget: Budget, levels: LevelMap, types: tuple[str, ...], n_blocks: int, title: str) -> bytes:
    """PNG of the share of parameters kept per (layer, unit type)."""
    return keep_heatmap({f"{b}.{t}": budget.keep(f"{b}.{t}", levels) for b in range(n_blocks) for t in types},
                        types, n_blocks, title)


class TrialRunner:
    """apply -> measure a trial's level map; records its Evaluation and an allocation heat map artifact."""

    def __init__(self, ws, comp: Compressor, space: SearchSpace, artifacts: Path | None):
        self.ws, self.comp, self.space = ws, comp, space
        self.store, self.artifact_dir = None, artifacts
        if artifacts is not None:
            from optuna.artifacts import FileSystemArtifactStore
            try:
                Path(artifacts).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BolacoError(f"cannot create the artifact folder {artifacts} ({exc.strerror}): point "
                                  "storage or cache_dir at a writable place")
            self.store = FileSystemArtifactStore(str(artifacts))
        cfg = ws.study.search
        self.objective: Objective = make_objective(cfg.objective, ws.model, {"search": ws.data["search"]},
                                                   ws.study.evaluate.batch_size, cfg.kl_weight, cfg.recall_weight,
                                                   ws.data["calibration"])

    def __call__(self, trial: optuna.Trial, levels: LevelMap) -> tuple[float, Evaluation]:
        try:
            t = time.perf_counter()
            cfg = self.ws.study.search
            refitted = self.ws.refit(self.comp, levels, cache=False, progress=False,
                                     sequences=cfg.refit_sequences) if cfg.refit_trials else None
            self.comp.apply(levels, refitted)
            applied = time.perf_counter() - t

            def report(step, ppl):
                trial.report(float(torch.tensor(ppl).log()), step)
                if trial.should_prune():
                    raise optuna.TrialPruned()

            m = self.objective.measure("search", on_batch=report, desc=f"trial {trial.number}")
            assert m.ppl is not None and m.nll is not None, "the BO objectives measure perplexity"
            budget = self.comp.budget
            params = budget.params(levels)
            record = Evaluation(params, 1 - params / budget.decomposable, m.ppl, m.nll, round(applied, 3),
                                round(m.seconds, 3), m.kl, m.recall)
            write(trial, record)
            if self.store is not None:
                self._upload_heatmap(trial, budget, levels, m.ppl)
            return m.value, record
        finally:
            self.comp.restore()

    def _upload_heatmap(self, trial, budget, levels, ppl):
        from optuna.artifacts import upload_artifact
        dec = self.comp.decomposition
        png = allocation_heatmap(budget, levels, dec.unit_types, dec.adapter.n_blocks,
                                 f"trial {trial.number}: search ppl {ppl:.2f}")
        path = Path(self.artifact_dir) / f".heatmap-{os.getpid()}-{trial.number}.png"
        path.write_bytes(png)
        upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial, mimetype="image/png")
        path.unlink()


class _Heartbeat:
    """Records a heartbeat every HEARTBEAT_SECONDS for the trials this worker holds (current and prefetched)."""

    def __init__(self, storage: RDBStorage):
        self.storage = storage
        self.trials: set[int] = set()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def hold(self, tid: int) -> None:
        self.storage.record_heartbeat(tid)
        with self._lock:
            self.trials.add(tid)

    def release(self, tid: int) -> None:
        with self._lock:
            self.trials.discard(tid)

    def _loop(self):
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with self._lock:
                held = list(self.trials)
            for tid in held:
                self.storage.record_heartbeat(tid)

    def stop(self):
        self._stop.set()
        # bounded: after a Ctrl-C the thread may be inside a storage call; it is a daemon and dies with the process
        self._thread.join(timeout=HEARTBEAT_SECONDS)


def finished(opt: optuna.Study) -> int:
    return len(opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


class Worker:
    """One process's share of a study: propose (ask + sample + record), evaluate, tell."""

    def __init__(self, opt: optuna.Study, space: SearchSpace, sampler: BudgetSampler, runner: TrialRunner,
                 storage: RDBStorage):
        self.opt, self.space, self.sampler, self.runner = opt, space, sampler, runner
        self.heart = _Heartbeat(storage)
        self.who = f"{socket.gethostname()}:{os.getpid()}"
        self.target = 0

    def propose(self) -> tuple[optuna.Trial, LevelMap, Proposal]:
        """A new trial with its parameters and level map recorded; never one whose level map is already stored."""
        for _ in range(5):
            t = time.perf_counter()
            with _heartbeat_warnings_off():
                trial = self.opt.ask()
            self.heart.hold(trial_id(trial))
            point = {n: trial.suggest_float(n, self.space.r_min, 1.0) for n in self.space.names}
            levels = self.space.levels(point)
            info = self.sampler.proposals.pop(trial.number, None)
            # fixed parameters: an enqueued (designed) trial, or a retry (it carries the failed trial's attrs)
            if info is None:
                info = {"proposal": "retry" if LEVELS in trial.user_attrs else
                        trial.user_attrs.get("proposal", "enqueued"),
                        "seconds_sampling": round(time.perf_counter() - t, 3)}
            proposal = Proposal(levels=levels, worker=self.who, **info)
            write(trial, proposal)
            fixed = proposal.proposal == "retry" or proposal.proposal == "uniform" or \
                proposal.proposal.startswith("design:")
            twin = None if fixed else self._twin(trial, levels)
            if twin is None:
                return trial, levels, proposal
            # a map already stored or being evaluated (two workers proposed it at the same moment): give way
            trial.set_user_attr("duplicate_of", twin)
            self.opt.tell(trial, state=TrialState.FAIL)
            self.heart.release(trial_id(trial))
        raise BolacoError("five proposals in a row duplicated stored trials: the search space is exhausted "
                          "at this rank multiple; lower decompose.rank_multiple or search more variables")

    def _twin(self, trial, levels) -> int | None:
        """Another live or finished trial with this level map. Every worker records its map before it looks, so of
        two workers proposing one map at the same moment the one that looks second sees the other (both may: then
        both give way). Looking only at lower-numbered trials is not enough: the lower number may record its map
        after the higher one has looked."""
        key = levels_key(levels)
        for other in self.opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                  TrialState.RUNNING)):
            if other.number != trial.number and LEVELS in other.user_attrs \
                    and levels_key(other.user_attrs[LEVELS]) == key:
                return other.number
        return None

    def evaluate(self, trial: optuna.Trial, levels: LevelMap, proposal: Proposal) -> None:
        state, value, record = TrialState.FAIL, None, None
        try:
            value, record = self.runner(trial, levels)
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        finally:
            self.opt.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
            self.heart.release(trial_id(trial))
        outcome = f"search ppl {record.search_ppl:.3f}, removed {record.removed:.2%}" if record else state.name.lower()
        log.info(f"trial {trial.number}: {outcome}, {proposal.proposal}; seconds: sampling "
                 f"{proposal.seconds_sampling:.2f}" + (f", apply {record.seconds_apply:.2f}, eval "
                                                      f"{record.seconds_eval:.1f}" if record else ""))

    def _propose_here(self) -> tuple[optuna.Trial, LevelMap, Proposal]:
        """Propose in this (the main) thread, the GP's small algebra on one thread; evaluation gets every core back.
        A proposing-ahead thread leaves the thread count alone: it is global, and the evaluation runs meanwhile."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.propose()
        finally:
            torch.set_num_threads(threads)

    def _surplus(self, trial) -> bool:
        """Whether the target is already met by the finished trials and the ones other workers took first (two
        workers that both saw one trial missing would otherwise both run one)."""
        ahead = [t for t in self.opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                         TrialState.RUNNING))
                 if t.state != TrialState.RUNNING or t.number < trial.number]
        return len(ahead) >= self.target

    def work(self, target: int, prefetch: bool) -> None:
        pool = ThreadPoolExecutor(1) if prefetch else None
        ahead = None
        self.target = target
        try:
            while True:
                with _heartbeat_warnings_off():
                    optuna.storages.fail_stale_trials(self.opt)
                if finished(self.opt) >= target:
                    break
                proposal = ahead.result() if ahead is not None else self._propose_here()
                ahead = None
                if self._surplus(proposal[0]):
                    proposal[0].set_user_attr("unused", "the study reached its target while this was proposed")
                    self.opt.tell(proposal[0], state=TrialState.FAIL)
                    self.heart.release(trial_id(proposal[0]))
                    break
                ahead = pool.submit(self.propose) if pool and finished(self.opt) + 1 < target else None
                self.evaluate(*proposal)
        finally:
            if ahead is not None:   # a proposal nobody will evaluate (target reached, or interrupted)
                trial = ahead.result()[0]
                trial.set_user_attr("unused", "proposed ahead; the study ended before it was evaluated")
                self.opt.tell(trial, state=TrialState.FAIL)
            if pool:
                pool.shutdown()
            self.heart.stop()


def summary(opt: optuna.Study) -> dict:
    """Counts of how the trials were proposed (fallbacks included) and of their states."""
    trials = opt.get_trials(deepcopy=False)
    return {"states": dict(Counter(t.state.name for t in trials)),
            "proposals": dict(Counter(t.user_attrs.get("proposal", "?") for t in trials
                                      if t.state in (TrialState.COMPLETE, TrialState.PRUNED)))}


def run(ws, comp: Compressor, create: bool, trials: int | None = None, artifacts: Path | None | bool = True,
        prefetch: bool | None = None) -> optuna.Study:
    """Create or join the study and work until it has `trials` finished trials (all workers together).
    artifacts: the heat-map folder (True: beside the storage or cache, see artifact_dir; None: no heat maps).
    prefetch: propose the next trial while the current one evaluates (default: the study file's `prefetch`,
    whose `auto` means on a GPU only)."""
    study = ws.study
    cfg = study.search
    space = SearchSpace.from_study(study, comp.decomposition)
    sampler = BudgetSampler.named(space, cfg.sampler, cfg.seed, cfg.startup, cfg.coarse_trials)
    ident = identity(study, space, ws.fingerprint, ws.data_hashes)
    opt, storage = open_optuna_study(study, space, create, sampler, ident, lambda: designed_points(ws, comp, space))
    target = trials or cfg.trials
    if prefetch is None:
        prefetch = cfg.prefetch is True or (cfg.prefetch == "auto" and
                                            next(ws.model.parameters()).device.type == "cuda")
    optuna.logging.set_verbosity(optuna.logging.WARNING)   # bolaco prints one short line per trial
    done = finished(opt)
    log.info(f"study {opt.study_name} in {masked_url(study.storage)}: {space.dim} variables ({cfg.space} of "
             f"{comp.decomposition.describe()}), objective {cfg.objective}, {min(done, target)} of {target} trials "
             f"finished, sampler {cfg.sampler}" + (", proposing ahead" if prefetch else ""))
    if done < target:
        folder = artifact_dir(study) if artifacts is True else (artifacts or None)
        worker = Worker(opt, space, sampler, TrialRunner(ws, comp, space, folder), storage)
        worker.work(target, prefetch)
        s = summary(opt)
        log.info("proposals: " + ", ".join(f"{k} {v}" for k, v in sorted(s["proposals"].items())))
    return opt


def load_optuna_study(study: Study) -> optuna.Study:
    storage = open_storage(study.storage, create=False)
    name = study_name(study)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise BolacoError(f"no study '{name}' in {masked_url(study.storage)}: run `make study` first")


def ranked_trials(opt: optuna.Study) -> list[TrialRecord]:
    """The finished trials, best first."""
    done = [t for t in opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return [TrialRecord.of(t) for t in sorted(done, key=lambda t: (t.value, t.number))]


def best_levels(study: Study) -> tuple[LevelMap, TrialRecord]:
    ranked = ranked_trials(load_optuna_study(study))
    if not ranked:
        raise BolacoError(f"study '{study_name(study)}' in {masked_url(study.storage)} has no finished trial yet: "
                          "run `make study` first")
    return ranked[0].levels, ranked[0]
