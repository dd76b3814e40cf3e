"""bolaco's lm-eval tasks run offline on local rows and agree with an independent float64 log-likelihood:
one multiple-choice task (PIQA layout, handcrafted rows) and one perplexity task (lm-eval's wikitext on
the shipped WikiText-2); the local copies load with their official row counts; splits are disjoint."""

import json
import math
import re

import pytest
import torch
from bolaco.data import default_data_dir
from bolaco.errors import BolacoError
from bolaco.evaluate.tasks import ZERO_SHOT, evaluate, lm_wrapper, load_tasks, n_docs, split
from conftest import tiny_model

PIQA = [("How do you open a jar?", "Twist the lid.", "Eat the lid.", 0),
        ("dresser", "replace drawer with bobby pin ", "finish, woodgrain", 1),
        ("To dry wet shoes,", "stuff them with newspaper.", "put them in a pond.", 0),
        ("What melts ice on roads?", "salt", "sugar syrup and sand", 0),
        ("A plant needs", "light", "darkness only", 1)]


@pytest.fixture(scope="module")
def lm(eos_tokenizer):
    return tiny_model("llama", vocab_size=len(eos_tokenizer)), eos_tokenizer


def write_piqa(tmp_path):
    """A data directory with the handcrafted PIQA rows."""
    (tmp_path / "piqa").mkdir(parents=True)
    (tmp_path / "piqa" / "valid.jsonl").write_text(
        "".join(json.dumps({"goal": g, "sol1": a, "sol2": b}) + "\n" for g, a, b, _ in PIQA))
    (tmp_path / "piqa" / "valid-labels.lst").write_text("".join(f"{y}\n" for *_, y in PIQA))
    return tmp_path


@pytest.fixture
def piqa_dir(tmp_path):
    return write_piqa(tmp_path)


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, in float64 on a float64 copy of the model."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0]
    return torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def continuation_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """lm-eval's request split: continuation tokens = tokens of context+continuation past those of context."""
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    return float(reference_logprobs(model, whole)[len(ctx) - 1:].sum())


def test_multiple_choice_task_agrees_with_independent_loglikelihoods(lm, piqa_dir):
    model, tokenizer = lm
    model64 = tiny_model("llama", vocab_size=len(tokenizer)).double()
    res = evaluate(lm_wrapper(model, tokenizer, batch_size=2), load_tasks(["piqa"], piqa_dir), log_samples=True)
    samples = res["samples"]["piqa"]
    assert res["piqa"]["rows"] == len(samples) == len(PIQA)
    acc = acc_norm = 0
    for sample in samples:
        goal, a, b, label = PIQA[sample["doc_id"]]
        ours = [continuation_loglik(model64, tokenizer, f"Question: {goal}\nAnswer:", " " + c) for c in (a, b)]
        assert [float(r[0]) for r in sample["filtered_resps"]] == pytest.approx(ours, abs=1e-4)
        acc += max((0, 1), key=lambda i: ours[i]) == label
        acc_norm += max((0, 1), key=lambda i: ours[i] / len((a, b)[i])) == label
    assert res["piqa"]["acc"] == pytest.approx(acc / len(PIQA))
    assert res["piqa"]["acc_norm"] == pytest.approx(acc_norm / len(PIQA))


def test_wikitext_word_perplexity_agrees_with_independent_rolling_windows(lm):
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer
    model, tokenizer = lm
    model64 = tiny_model("llama", vocab_size=len(tokenizer)).double()
    loaded = load_tasks(["wikitext"])
    docs = list(loaded["tasks"]["wikitext"].eval_docs)[:2]
    assert docs[0]["page"].startswith(" = Robert Boulter = ")
    res = evaluate(lm_wrapper(model, tokenizer, batch_size=4), loaded, limit=2)["wikitext"]
    width = model.config.max_position_embeddings      # lm-eval's max_length for this model
    total = words = 0.0
    for doc in docs:
        # the first token is predicted from EOS; chunks of `width` tokens, each from the `width` tokens before
        stream = [tokenizer.eos_token_id] + tokenizer(wikitext_detokenizer(doc), add_special_tokens=False).input_ids
        n = len(stream) - 1
        for a in range(0, n, width):
            b = min(a + width, n)
            window = stream[max(0, b - width):b + 1]
            total += float(reference_logprobs(model64, window)[-(b - a):].sum())
        words += len(re.split(r"\s+", doc["page"]))
    assert res["rows"] == 2
    assert res["word_perplexity"] == pytest.approx(math.exp(-total / words), rel=1e-4)


def test_local_loaders_errors_and_splits(piqa_dir):
    with pytest.raises(BolacoError, match=r"unknown task\(s\) no_such_task: neither bolaco's"):
        load_tasks(["no_such_task"], piqa_dir)

    with pytest.raises(BolacoError, match="not found"):
        load_tasks(["arc_easy"], piqa_dir)
    doc = load_tasks(["piqa"], piqa_dir)["tasks"]["piqa"].eval_docs[1]
    assert (doc["goal"], doc["label"]) == ("dresser", 1)
    search, test = split(20, 6, seed=3)
    assert len(search) == 6 and len(test) == 14
    assert set(search).isdisjoint(test) and set(search) | set(test) == set(range(20))
    assert split(20, 6, seed=3) == (search, test) and split(20, 6, seed=4) != (search, test)


@pytest.mark.skipif(default_data_dir() is None, reason="needs the data directory (../shared/data)")
def test_local_copies_have_the_official_row_counts():
    loaded = load_tasks(list(ZERO_SHOT))
    assert {t: n_docs(loaded, t) for t in ZERO_SHOT} == {
        "boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
        "arc_challenge": 1172, "openbookqa": 500, "lambada_openai": 5153}
    lam = loaded["tasks"]["lambada_openai"].eval_docs[0]
    assert loaded["tasks"]["lambada_openai"].doc_to_target(lam) == " signs"     # the last word, after a space
    tasks = loaded["tasks"]
    win = tasks["winogrande"].eval_docs[0]
    assert tasks["winogrande"].doc_to_choice(win) == ["Sarah was a much better surgeon than Maria so Sarah",
                                                      "Sarah was a much better surgeon than Maria so Maria"]
    assert tasks["winogrande"].doc_to_target(win) == "always got the easier cases." and win["gold"] == 1
    obqa = tasks["openbookqa"].eval_docs[0]
    assert tasks["openbookqa"].doc_to_choice(obqa)[tasks["openbookqa"].doc_to_target(obqa)] == "quit eating lunch out"
    boolq = tasks["boolq"].eval_docs[0]
    assert boolq["label"] == 0 and tasks["boolq"].doc_to_text(boolq).endswith("produces?\nAnswer:")
