"""The zero-shot scorer agrees with lm-eval's acc/acc_norm on the same rows (lm-eval run offline on a
task written here from local rows), and task splits are disjoint."""

import json

import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from bolaco.data import read_text
from bolaco.tasks import Example, accuracy, loglikelihood, split
from conftest import tiny_model

ROWS = [Example("Question: How do you open a jar?\nAnswer:", ("Twist the lid.", "Eat the lid."), 0),
        Example("Question: dresser\nAnswer:", ("replace drawer with bobby pin ", "finish, woodgrain"), 1),
        Example("Question: To dry wet shoes,\nAnswer:", ("stuff them with newspaper.", "put them in a pond."), 0),
        Example("Question: What melts ice on roads?\nAnswer:", ("salt", "sugar syrup", "sand", "water"), 0),
        Example("Question: A plant needs\nAnswer:", ("light", "darkness only"), 1)]


@pytest.fixture(scope="module")
def lm():
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([read_text("wikitext2-valid")[:100_000]], vocab_size=300, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    return tiny_model("llama", vocab_size=len(tokenizer)), tokenizer


def test_accuracy_agrees_with_lm_eval_on_the_same_rows(lm, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    model, tokenizer = lm
    ours = accuracy(model, tokenizer, ROWS)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"q": r.context, "choices": list(r.choices), "label": r.label}) + "\n"
                            for r in ROWS))
    (tmp_path / "local_mc.yaml").write_text(
        "task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: label\n"
        "doc_to_choice: '{{choices}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    res = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1), tasks=["local_mc"],
                          task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                          log_samples=True)
    for sample in res["samples"]["local_mc"]:   # every choice's log-likelihood, not only the argmax
        row = ROWS[sample["doc_id"]]
        theirs_ll = [float(r[0]) for r in sample["filtered_resps"]]
        ours_ll = [loglikelihood(model, tokenizer, row.context, " " + c) for c in row.choices]
        assert ours_ll == pytest.approx(theirs_ll, abs=1e-3)
    theirs = res["results"]["local_mc"]
    assert theirs["acc,none"] == pytest.approx(ours["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])


def test_splits_are_disjoint_and_seeded():
    rows = [Example(f"q{i}", ("a", "b"), 0) for i in range(20)]
    search, test = split(rows, 6, seed=3)
    assert len(search) == 6 and len(test) == 14
    assert {r.context for r in search}.isdisjoint({r.context for r in test})
    assert split(rows, 6, seed=3) == (search, test)


def test_local_task_files_load_with_their_labels(tmp_path):
    from bolaco.data import default_data_dir
    from bolaco.errors import BolacoError
    from bolaco.tasks import load_task
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g1", "sol1": "a", "sol2": "b"}\n'
                                                   '{"goal": "g2", "sol1": "c", "sol2": "d"}\n')
    (tmp_path / "piqa" / "valid-labels.lst").write_text("1\n0\n")
    assert load_task("piqa", tmp_path) == [Example("Question: g1\nAnswer:", ("a", "b"), 1),
                                           Example("Question: g2\nAnswer:", ("c", "d"), 0)]
    with pytest.raises(BolacoError, match="not found under the data directory"):
        load_task("arc_easy", tmp_path)
    with pytest.raises(BolacoError, match="unknown task"):
        load_task("mmlu", tmp_path)
    root = default_data_dir()
    if root is not None and (root / "arc").is_dir():   # the real copies: official row counts
        easy = load_task("arc_easy", root)
        assert len(easy) == 2376 and all(0 <= e.label < len(e.choices) for e in easy)
        assert len(load_task("piqa", root)) == 1838
