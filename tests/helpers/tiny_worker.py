"""A bolaco worker process on the tiny test model:
`python tiny_worker.py STORAGE CACHE_DIR TRIALS create|join [slow|fast]`.

A slow worker sleeps before each evaluation so that a test can kill it in the middle of a trial."""

import sys
import time

from bolaco.evaluate import perplexity as ppl_module
from bolaco.search import worker as search_worker

search_worker.HEARTBEAT_SECONDS, search_worker.GRACE_SECONDS = 1, 4
_real = ppl_module.perplexity


def slow_perplexity(*args, **kwargs):
    time.sleep(1.5)
    return _real(*args, **kwargs)


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from test_search import tiny_workspace   # noqa: E402  (the same tiny study as the unit tests)
    storage, cache_dir, trials, mode = sys.argv[1:5]
    if (sys.argv[5] if len(sys.argv) > 5 else "slow") == "slow":
        ppl_module.perplexity = slow_perplexity
    ws, comp = tiny_workspace(__import__("pathlib").Path(cache_dir))
    ws.study = ws.study.override(storage=storage)
    search_worker.run(ws, comp, create=(mode == "create"), trials=int(trials), artifacts=None)
