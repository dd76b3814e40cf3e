"""Fault injection: SIGKILL at a random point inside each stage, then the same command again; the result must be
bit for bit the result of an uninterrupted run (docs/reliability.md holds the table). Ctrl-C prints one line.

Two copies of one study on a tiny saved model run side by side: `clean` without faults, `faulty` killed once per
stage and resumed. The killed run is a real `bolaco` process (tests/helpers/slow_cli.py pads every durable write
with a pause, so that the kill lands inside the stage); the uninterrupted run and the resume call the same command
in this process, which spares two torch imports per stage."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_model

SLOW_CLI = Path(__file__).parent / "helpers" / "slow_cli.py"
STUDY = """name: s
model: {model}
seq_len: 16
storage: sqlite:///storage/s.db
cache_dir: storage/cache
data:
  calibration: {{corpus: wikitext2-valid, start: 0, sequences: 8}}
  search: {{corpus: wikitext2-valid, start: -4, sequences: 4}}
  test: {{corpus: wikitext2-test, start: 0, sequences: 4}}
  train: {{corpus: c4-valid, start: 0, sequences: 8}}
collect: {{partitions: 2, batch_size: 4}}
budget: {{remove: 0.25}}
decompose: {{rank_multiple: 2, refit: true}}
search: {{trials: 3, startup: 2}}
finetune: {{steps: 6, batch_size: 2, lr: 0.01, warmup: 0, checkpoint_every: 1}}
"""
EVAL = ["eval", "--model", "out/s-uniform", "--cache-dir", "storage/cache", "--ppl", "--corpus", "wikitext2-test",
        "c4-valid", "--seq-len", "16",
        "--sequences", "4", "--results", "eval.json"]
# stage: (command, a file whose appearance means the stage has started, its results: removed from both copies
# before the stage, so that it really runs, and compared with the clean run after it)
STAGES = {
    "collect": (["collect"], "storage/cache/*/covariance/block_000.safetensors", ["storage/cache/*/covariance/*"]),
    "bases": (["compress"], "storage/cache/*/bases-*/block_000.safetensors",
              ["storage/cache/*/bases-*/*"]),
    "refit": (["compress"], "storage/cache/refit/refit-*/block_000.safetensors",
              ["storage/cache/refit/refit-*/*"]),
    "export": (["compress"], "out/.s-uniform.tmp-*/config.json",
               ["out/s-uniform/model.safetensors", "out/s-uniform/config.json", "out/s-uniform/bolaco.json"]),
    "finetune": (["finetune", "--from", "out/s-uniform"], "storage/finetune/*/state.json",
                 ["out/s-uniform-ft-lora/model.safetensors", "storage/finetune/*/*"]),
    "evaluation": (EVAL, "eval.json", ["eval.json"]),
}


def _bolaco(cwd: Path, args: list[str], study: bool = True) -> subprocess.Popen:
    argv = [sys.executable, str(SLOW_CLI), *args] + (["--study", "s.yaml"] if study else [])
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})


def _in_process(cwd: Path, args: list[str], study: bool = True) -> None:
    """The same command as `_bolaco`, run by this process (no padding: nothing kills it)."""
    from bolaco.cli import main
    here = os.getcwd()
    os.chdir(cwd)
    try:
        assert main([*args, "-q"] + (["--study", "s.yaml"] if study else [])) == 0
    finally:
        os.chdir(here)


def _files(root: Path, patterns: list[str]) -> dict[str, bytes]:
    found = {str(p.relative_to(root)): p.read_bytes() for pat in patterns for p in sorted(root.glob(pat))
             if p.is_file()}
    assert found, patterns
    return found


def _remove(root: Path, patterns: list[str]) -> None:
    for pat in patterns:
        for p in root.glob(pat):
            p.unlink()


def _comparable(name: str, data: bytes) -> bytes:
    """bolaco.json and eval.json without the wall-clock fields (seconds, and the results' sha256 that covers
    them) that no two runs share; every other file as it is."""
    if name not in ("eval.json", "out/s-uniform/bolaco.json"):
        return data

    def strip(o):
        return {k: strip(v) for k, v in o.items() if "seconds" not in k and k != "sha256"} \
            if isinstance(o, dict) else o
    return json.dumps(strip(json.loads(data)), sort_keys=True).encode()


@pytest.fixture(scope="module")
def twin_studies(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("faults")
    model_dir = root / "tiny"
    tiny_model("qwen2", vocab_size=len(tokenizer), layers=6).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    dirs = {}
    for name in ("clean", "faulty"):
        (root / name).mkdir()
        (root / name / "s.yaml").write_text(STUDY.format(model=model_dir))
        dirs[name] = root / name
    return dirs


def _kill_inside(proc, cwd: Path, marker: str, rng: random.Random) -> bool:
    """SIGKILL `proc` at a random moment after `marker` appears; False if it finished first."""
    end = time.time() + 300
    while not list(cwd.glob(marker)):
        if proc.poll() is not None or time.time() > end:
            return False
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.6))
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


# The stages run in pipeline order: each one's inputs are the previous ones' outputs.
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_kill_inside_a_stage_resumes_to_the_identical_result(twin_studies, stage):
    args, marker, compared = STAGES[stage]
    study = args[0] != "eval"
    clean, faulty = twin_studies["clean"], twin_studies["faulty"]
    for d in (clean, faulty):
        _remove(d, compared)
    _in_process(clean, args, study)
    rng = random.Random(stage)
    killed = False
    for _ in range(3):     # a fast machine may finish before the kill: try again from scratch for this stage
        proc = _bolaco(faulty, args, study)
        killed = _kill_inside(proc, faulty, marker, rng)
        if killed:
            break
        proc.communicate()
        _remove(faulty, compared)
    assert killed, f"the {stage} stage finished before the kill"
    _in_process(faulty, args, study)                # the same command again resumes
    a, b = _files(clean, compared), _files(faulty, compared)
    assert a.keys() == b.keys()
    for name in a:
        assert _comparable(name, a[name]) == _comparable(name, b[name]), f"{stage}: {name} differs"


def test_ctrl_c_during_a_search_prints_one_line(twin_studies):
    cwd = twin_studies["clean"]
    # more trials than it can finish before the signal (a trial of the tiny model takes a fraction of a second,
    # and a loaded machine may notice the first artifact late)
    proc = _bolaco(cwd, ["search", "--trials", "500"])
    end = time.time() + 300
    while not list(cwd.glob("storage/artifacts/**/*")) and proc.poll() is None and time.time() < end:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the search ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"no exit 120 s after Ctrl-C; its threads:\n{err[-6000:]}") from None
    assert proc.returncode == 130, out + err
    lines = [l for l in err.splitlines() if l.strip() and "|" not in l]   # progress bars aside
    assert "Traceback" not in err and lines[-1].startswith("bolaco: interrupted"), err
    assert not [l for l in lines if l.startswith(("[W", "[E"))], err     # no Optuna warning about the trial
