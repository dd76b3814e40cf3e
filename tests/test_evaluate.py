"""The eval plan's items, the results file (fingerprint, corrupt file) and the offline fallback."""

import json

import pytest

from bolaco.errors import BolacoError
from bolaco.evaluate import EvalKey, EvalPlan, ResultsFile, check_plan, markdown_table, without_data_dir


def test_plan_items_name_what_they_measure_and_sample_sizes():
    plan = EvalPlan(corpora=("wikitext2-test", "ptb-test"), sequences=None, tasks=("piqa",), limit=50,
                    stereoset_limit=None)
    assert plan.items() == ["ppl/wikitext2-test/seq256/all", "ppl/ptb-test/seq256/all", "task/piqa/50",
                            "stereoset/all"]
    shipped, skipped = without_data_dir(plan)
    assert shipped.items() == ["ppl/wikitext2-test/seq256/all"] and skipped == ["ptb-test", "piqa", "stereoset"]
    few = EvalPlan(corpora=(), tasks=("arc_easy", "mmlu"), limit=None, num_fewshot=5, stereoset=False)
    assert few.items() == ["task/arc_easy/all/5shot", "task/mmlu/all/5shot"]
    assert [str(EvalKey.parse(k)) for k in plan.items() + few.items()] == plan.items() + few.items()
    with pytest.raises(BolacoError, match="num-fewshot is -1"):
        check_plan(EvalPlan(num_fewshot=-1))
    with pytest.raises(BolacoError, match="unknown corpus"):
        check_plan(EvalPlan(corpora=("penn",)))


def test_results_file_keeps_results_of_the_same_weights_only(tmp_path):
    path = tmp_path / "r.json"
    first = ResultsFile(path, "abc", "m")
    first.save("ppl/wikitext2-test/seq256/64", {"ppl": 40.0, "tokens": 16320})
    assert ResultsFile(path, "abc", "m").results == first.results
    assert ResultsFile(path, "other weights", "m").results == {}
    assert json.loads(path.read_text())["fingerprint"] == "abc"
    path.write_text(path.read_text().replace("40.0", "4.0"))    # an edited value is not believed
    assert ResultsFile(path, "abc", "m").results == {}
    path.write_text("{not json")
    with pytest.raises(BolacoError, match="not a bolaco results file"):
        ResultsFile(path, "abc", "m")


def test_markdown_table_puts_models_side_by_side():
    dense = {"ppl/ptb-test/seq256/64": {"ppl": 60.0}, "task/piqa/200": {"acc": 0.6, "acc_stderr": 0.03},
             "task/wikitext/all": {"word_perplexity": 41.25, "byte_perplexity": 1.9}}
    small = {"ppl/ptb-test/seq256/64": {"ppl": 90.5}}
    table = markdown_table({"dense": dense, "20 %": small}).splitlines()
    assert table[0] == "| metric | dense | 20 % |"
    assert "| PTB test ppl (seq 256, 64 seqs) | 60.00 | 90.50 |" in table
    assert "| piqa acc (200 rows) | 60.0 ± 3.0 | - |" in table
    assert "| wikitext word ppl (all documents) | 41.25 | - |" in table
