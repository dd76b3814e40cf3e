"""`python slow_cli.py ARGS...`: the bolaco command, with every durable write (cache blocks, finetune checkpoints,
evaluation results, the export's weights) and every perplexity evaluation padded by a pause, so that a test can
SIGKILL the process at a random point inside a stage of a tiny model instead of after it."""

import sys
import time

PAUSE = 0.15


def _slow(owner, name):
    real = getattr(owner, name)

    def slowed(*args, **kwargs):
        time.sleep(PAUSE)
        out = real(*args, **kwargs)
        time.sleep(PAUSE)
        return out
    setattr(owner, name, slowed)


if __name__ == "__main__":
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # a test that times out asks for every stack
    import bolaco.evaluate.perplexity
    import bolaco.evaluate.runner
    import bolaco.export.writer
    import bolaco.finetune.subspace
    import bolaco.store
    from bolaco.cli import main
    _slow(bolaco.store.BlockStore, "write")
    _slow(bolaco.finetune.subspace._Checkpoint, "save")
    _slow(bolaco.evaluate.runner.ResultsFile, "save")
    _slow(bolaco.export.writer, "save_torch_state_dict")
    _slow(bolaco.evaluate.perplexity, "perplexity")
    sys.exit(main(sys.argv[1:]))
