"""The study commands as a user runs them, on a tiny model saved to disk."""

import json

from bolaco.cli import main
from bolaco.export import count_params, load_compressed
from conftest import tiny_model


def test_collect_compress_search_export_surgical_eval(tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "tiny"
    dense = tiny_model("qwen2", vocab_size=len(tokenizer))
    dense.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    study = tmp_path / "s.yaml"
    study.write_text(f"name: s\nmodel: {model_dir}\nseq_len: 16\nstorage: sqlite:///{tmp_path}/s.db\n"
                     f"cache_dir: {tmp_path}/cache\ndata:\n"
                     "  calibration: {corpus: wikitext2-valid, start: 0, sequences: 8}\n"
                     "  search: {corpus: wikitext2-valid, start: -4, sequences: 4}\n"
                     "  test: {corpus: wikitext2-test, start: 0, sequences: 4}\n"
                     "collect: {partitions: 2, batch_size: 4}\nbudget: {remove: 0.25}\n"
                     "decompose: {rank_multiple: 2}\nsearch: {trials: 3, groups: 1, startup: 2}\n"
                     "surgical: {delta: 0.5, types: [q, up]}\n")
    s = ["--study", str(study)]
    assert main(["collect", *s]) == 0
    assert main(["compress", *s, "--uniform", "--out", str(tmp_path / "uniform")]) == 0
    assert main(["search", *s, "--trials", "2"]) == 0
    assert main(["worker", *s]) == 0                       # joins and brings the study to 3 trials
    assert main(["export", *s, "--out", str(tmp_path / "best")]) == 0
    assert main(["surgical", *s, "--out", str(tmp_path / "surgical")]) == 0
    out = capsys.readouterr().out
    assert "covariance cache complete" in out and "best trial" in out and "surgical:" in out
    for name in ("uniform", "best", "surgical"):
        meta = json.loads((tmp_path / name / "bolaco.json").read_text())
        model, _ = load_compressed(tmp_path / name)
        assert count_params(model) == meta["params"] < count_params(dense)
        assert set(meta["perplexity"]) == {"seq_len", "search", "test"}
    best = json.loads((tmp_path / "best" / "bolaco.json").read_text())
    assert best["allocation"].startswith("best trial") and best["removed_fraction"] >= 0.25
    assert main(["eval", str(tmp_path / "best"), "--seq-len", "16", "--sequences", "4", "--json"]) == 0
    assert '"wikitext2-test"' in capsys.readouterr().out
