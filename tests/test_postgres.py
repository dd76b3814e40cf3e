"""Two worker processes share one study in a real PostgreSQL; one is killed in the middle of a trial.

CI starts PostgreSQL on loopback (.ci/postgres.sh) and sets BOLACO_TEST_POSTGRES; locally run
`export BOLACO_TEST_POSTGRES=$(bash .ci/postgres.sh)` first."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

URL = os.environ.get("BOLACO_TEST_POSTGRES")
HELPER = Path(__file__).parent / "helpers" / "tiny_worker.py"
STUDY = "tiny-botorch"

if not URL and not os.environ.get("CI"):
    pytest.skip("set BOLACO_TEST_POSTGRES=$(bash .ci/postgres.sh) to run the PostgreSQL test",
                allow_module_level=True)


def _wait_for(predicate, what, timeout=180):
    end = time.time() + timeout
    while time.time() < end:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _running_trial_of(storage, pid):
    try:
        study = optuna.load_study(study_name=STUDY, storage=storage)
    except KeyError:
        return None
    return [t for t in study.get_trials(states=(TrialState.RUNNING,))
            if t.user_attrs.get("worker", "").endswith(f":{pid}")]


def test_two_workers_share_a_study_and_a_killed_workers_trial_is_retried(tmp_path):
    assert URL, "CI must provide BOLACO_TEST_POSTGRES (see .ci/postgres.sh)"
    storage = optuna.storages.RDBStorage(URL)
    if STUDY in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        optuna.delete_study(study_name=STUDY, storage=storage)
    # enough trials that the surviving worker is still busy when the dead worker's heartbeat goes stale
    # (grace 4 s, about 1.7 s per trial), so it fails and retries that trial before the study is done
    target = 16
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                            os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(HELPER), URL, str(tmp_path)]
    a = subprocess.Popen(cmd + [str(target), "create"], env=env)
    b = None
    try:
        _wait_for(lambda: _running_trial_of(storage, a.pid), "worker A to run a trial")
        b = subprocess.Popen(cmd + [str(target), "join"], env=env)
        _wait_for(lambda: _running_trial_of(storage, b.pid), "worker B to run a trial")
        # a trial A has only just started (its 1.5 s sleep ahead), so it cannot finish before the kill
        seen = max((t.number for t in _running_trial_of(storage, a.pid) or []), default=-1)
        victim = _wait_for(lambda: [t for t in _running_trial_of(storage, a.pid) or [] if t.number > seen],
                           "worker A's next trial", timeout=60)[0]
        a.send_signal(signal.SIGKILL)
        finished = optuna.load_study(study_name=STUDY, storage=storage).get_trials(states=(TrialState.COMPLETE,))
        assert len(finished) <= target - 5, "worker A ran too fast for the test to kill it early"
        a.wait()
        assert b.wait(timeout=240) == 0
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()

    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))               # no duplicate or missing numbers
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(complete) >= target
    # the killed worker's trial, and besides it only proposals that gave way to a twin another worker proposed
    assert victim.number in [t.number for t in failed]
    assert all("duplicate_of" in t.user_attrs for t in failed if t.number != victim.number)
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)
    retried = [t for t in complete if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == victim.number]
    assert len(retried) == 1 and retried[0].params == victim.params
    allocations = [tuple(sorted(t.user_attrs["levels"].items())) for t in complete]
    assert len(set(allocations)) == len(allocations)                  # two workers never repeat an allocation
    workers = {t.user_attrs["worker"] for t in complete}
    assert len(workers) == 2                                          # both workers contributed results
    for t in complete:                                                # nothing lost: every result is whole
        assert t.value == t.user_attrs["search_nll"] and t.user_attrs["levels"]

    # the retried trial's value is the one its allocation gets in an uninterrupted evaluation, bit for bit
    sys.path.insert(0, str(Path(__file__).parent))
    from bolaco.evaluate.perplexity import perplexity
    from test_search import tiny_workspace
    ws, comp = tiny_workspace(tmp_path)       # the workers' cache folder: nothing is recomputed
    comp.apply({k: int(v) for k, v in retried[0].user_attrs["levels"].items()})
    alone = perplexity(ws.model, ws.data["search"], ws.study.evaluate.batch_size, progress=False)
    assert alone.nll == retried[0].value
