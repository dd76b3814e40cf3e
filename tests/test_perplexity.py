import copy
import math

import torch

from bolaco.evaluate.perplexity import perplexity
from conftest import tiny_model


def test_perplexity_equals_independent_float64_per_token_computation(family):
    model = tiny_model(family)
    seqs = torch.randint(0, 300, (5, 24), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, seqs, batch_size=2, progress=False)

    ref64 = copy.deepcopy(model).double()
    if getattr(ref64.config, "_experts_implementation", None):   # MoE: the batched expert kernel has no float64
        ref64.config._experts_implementation = "eager"
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in seqs:  # one window at a time, each token's log-probability read off separately
            logp = torch.log_softmax(ref64(input_ids=window[None]).logits[0], dim=-1)
            for t in range(len(window) - 1):
                nll -= float(logp[t, window[t + 1]])
                count += 1
    assert got.tokens == count == 5 * 23
    assert math.isclose(got.ppl, math.exp(nll / count), rel_tol=1e-5)


def test_running_values_reach_the_final_perplexity():
    model = tiny_model("llama")
    seqs = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(1))
    seen = []
    got = perplexity(model, seqs, batch_size=4, progress=False, on_chunk=lambda step, ppl: seen.append((step, ppl)))
    assert [s for s, _ in seen] == [0, 1]
    assert math.isclose(seen[-1][1], got.ppl, rel_tol=1e-12)


def test_kl_to_reference_is_zero_for_itself_and_matches_float64():
    from bolaco.evaluate.perplexity import log_probs
    model, other = tiny_model("qwen2"), tiny_model("qwen2", seed=1)
    seqs = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(2))
    ref = log_probs(model, seqs, batch_size=2, dtype=torch.float64)
    assert abs(perplexity(model, seqs, batch_size=2, progress=False, reference=ref).kl) < 1e-5
    got = perplexity(other, seqs, batch_size=2, progress=False, reference=ref).kl
    with torch.no_grad():
        p = torch.log_softmax(copy.deepcopy(other).double()(input_ids=seqs).logits[:, :-1], -1)
        q = torch.log_softmax(copy.deepcopy(model).double()(input_ids=seqs).logits[:, :-1], -1)
    expected = float((p.exp() * (p - q)).sum(-1).mean())
    assert got > 0 and math.isclose(got, expected, rel_tol=1e-4)


def test_recall_positions_are_rare_targets_seen_earlier_in_their_window_and_their_nll_is_reported():
    from bolaco.evaluate.perplexity import recall_positions
    g = torch.Generator().manual_seed(3)
    seqs = torch.randint(0, 40, (6, 20), generator=g)     # a small vocabulary: many repeats
    rare = torch.rand(300, generator=g) < 0.5
    got = recall_positions(seqs, rare)
    expected = torch.tensor([[bool(rare[w[t + 1]]) and int(w[t + 1]) in w[:t + 1].tolist() for t in range(19)]
                             for w in seqs])
    assert got.shape == (6, 19) and torch.equal(got, expected) and 0 < int(got.sum()) < got.numel()

    model = tiny_model("llama")
    r = perplexity(model, seqs, batch_size=4, progress=False, focus=got)
    with torch.no_grad():
        logp = torch.log_softmax(copy.deepcopy(model).double()(input_ids=seqs).logits[:, :-1], -1)
    nll = -logp.gather(-1, seqs[:, 1:, None])[..., 0]
    assert math.isclose(r.focus_nll, float(nll[got].mean()), rel_tol=1e-5)
    assert math.isclose(r.nll, float(nll.mean()), rel_tol=1e-5)


def test_ctrl_c_inside_an_evaluation_clears_its_progress_bar_first(capsys):
    """The command's one-line 'interrupted' message must start on a clean line: the bar is gone by the time
    the KeyboardInterrupt reaches the command's handler (whose traceback still holds the frame that made it)."""
    model = tiny_model("llama")
    seqs = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(1))

    def interrupt(step, _ppl):
        if step == 1:
            raise KeyboardInterrupt

    try:
        perplexity(model, seqs, batch_size=2, progress=True, desc="trial 1", on_chunk=interrupt)
    except KeyboardInterrupt:
        err = capsys.readouterr().err                 # what the terminal shows when bolaco.cli.main prints
    assert "trial 1" in err                           # the bar was drawn ...
    assert err.rstrip(" ").endswith("\r")            # ... and cleared: the cursor is back at column 0
