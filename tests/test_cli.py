"""The study commands as a user runs them, on a tiny model saved to disk, with their default output folders."""

import json

import pytest
import yaml
from PIL import Image

from bolaco.cli import main
from bolaco.export import count_params, load_compressed
from conftest import tiny_model


def assert_picture(path, size):
    with Image.open(path) as im:
        assert im.size == size
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20   # not blank


def test_collect_compress_search_export_surgical_eval_report(tmp_path, tokenizer, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
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
    assert main(["compress", *s]) == 0
    assert main(["search", *s, "--trials", "2"]) == 0
    assert main(["worker", *s]) == 0                       # joins and brings the study to 3 trials
    assert main(["export", *s]) == 0
    assert main(["surgical", *s]) == 0
    out = capsys.readouterr().out
    assert "covariance cache complete" in out and "best trial" in out and "surgical:" in out
    assert main(["speed", *s]) == 0
    speed = capsys.readouterr().out
    assert all(f" {t} " in speed for t in ("q", "k", "v", "o", "gate", "up", "down")) and "batch 1" in speed
    assert "search.dense=[" in speed or "nothing to change" in speed
    for name in ("s-uniform", "s", "s-surgical"):
        meta = json.loads((tmp_path / "out" / name / "bolaco.json").read_text())
        model, _ = load_compressed(tmp_path / "out" / name)
        assert count_params(model) == meta["params"] < count_params(dense)
        assert set(meta["perplexity"]) == {"seq_len", "search", "test"}
    best = json.loads((tmp_path / "out" / "s" / "bolaco.json").read_text())
    assert best["allocation"].startswith("best trial") and best["removed_fraction"] >= 0.25
    card = (tmp_path / "out" / "s" / "README.md").read_text()       # the model card names the right numbers
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "bolaco" in front["tags"]
    assert f"{best['removed_fraction']:.1%} of the projections' parameters are removed" in card
    assert f"{best['params']:,} parameters" in card and "trust_remote_code=True" in card
    for role in ("search", "test"):
        corpus = best["provenance"]["data"][role]["corpus"]
        assert f"| {role}: {corpus} (16 tokens per sequence) | {best['perplexity'][role]:.2f} |" in card
    assert "| q | " in card and "(allocation.png)" in card
    assert_picture(tmp_path / "out" / "s" / "allocation.png", (400, 260))

    other = tmp_path / "s40.yaml"      # the same study at another budget, for the perplexity-vs-kept picture
    other.write_text(study.read_text().replace("name: s\n", "name: s40\n").replace("remove: 0.25", "remove: 0.4"))
    assert main(["search", "--study", str(other), "--trials", "2"]) == 0
    prefixed = tmp_path / "s-x.yaml"   # its BO study, s-x-botorch, starts with "s-" but is not one of s's
    prefixed.write_text(study.read_text().replace("name: s\n", "name: s-x\n"))
    assert main(["search", "--study", str(prefixed), "--trials", "1"]) == 0

    ppl = ["--ppl", "--corpus", "wikitext2-test", "--seq-len", "16", "--sequences", "4"]
    for model in ("out/s", str(model_dir)):
        assert main(["eval", "--model", model, *ppl, "--json"]) == 0
    results = json.loads((tmp_path / "out" / "s" / "bolaco-eval.json").read_text())["results"]
    assert set(results) == {"ppl/wikitext2-test/seq16/4"} and results["ppl/wikitext2-test/seq16/4"]["tokens"] == 60
    assert (model_dir / "bolaco-eval.json").is_file()
    assert '"ppl/wikitext2-test/seq16/4"' in capsys.readouterr().out

    def no_recompute(*a, **k):
        raise AssertionError("a cached result was recomputed")
    monkeypatch.setattr("bolaco.evaluate.perplexity.perplexity", no_recompute)
    assert main(["eval", "--model", "out/s", *ppl]) == 0
    assert "re-using 1 cached result(s)" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="recomputed"):
        main(["eval", "--model", "out/s", *ppl, "--force"])

    assert main(["report", *s, "--compare", str(other)]) == 0
    report = (tmp_path / "out" / "s-report" / "report.md").read_text()
    assert "| s-botorch | 3 |" in report and "| s40-botorch | 2 |" in report and "s-surgical-ppl" in report
    assert "s-x-botorch" not in report
    assert_picture(tmp_path / "out" / "s-report" / "budgets.png", (640, 400))
    assert "| metric | dense | s |" in report and "WikiText-2 test ppl (seq 16, 4 seqs)" in report
    assert_picture(tmp_path / "out" / "s-report" / "search.png", (640, 400))
    for name in ("allocation.png", "surgical.png"):   # 3 blocks: the heat map's minimum width, 4 x 2.6 inches
        assert_picture(tmp_path / "out" / "s-report" / name, (400, 260))


@pytest.mark.parametrize("family", ["phi3", "mixtral", "gemma3"])
def test_a_study_on_a_local_checkout_of_another_family(family, tmp_path, tokenizer, capsys, monkeypatch):
    """Fused projections, an MoE with dense experts and a multimodal checkpoint: search, export, load back."""
    monkeypatch.chdir(tmp_path)
    model_dir = tmp_path / family
    dense = tiny_model(family, vocab_size=len(tokenizer))
    dense.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    study = tmp_path / "f.yaml"
    study.write_text(f"name: f\nmodel: {model_dir}\nseq_len: 16\nstorage: sqlite:///{tmp_path}/f.db\n"
                     f"cache_dir: {tmp_path}/cache\ndata:\n"
                     "  calibration: {corpus: wikitext2-valid, start: 0, sequences: 8}\n"
                     "  search: {corpus: wikitext2-valid, start: -4, sequences: 4}\n"
                     "  test: {corpus: wikitext2-test, start: 0, sequences: 4}\n"
                     "collect: {partitions: 2, batch_size: 4}\nbudget: {remove: 0.25}\n"
                     "decompose: {rank_multiple: 2}\nsearch: {trials: 2, space: types, startup: 2}\n")
    s = ["--study", str(study)]
    assert main(["search", *s]) == 0 and main(["export", *s]) == 0
    meta = json.loads((tmp_path / "out" / "f" / "bolaco.json").read_text())
    model, _ = load_compressed(tmp_path / "out" / "f")
    assert isinstance(model, type(dense)) and count_params(model) == meta["params"] < count_params(dense)
    assert {lid.split(".")[1] for lid in meta["levels"]} <= set(
        {"phi3": ("qkv", "o", "gate_up", "down"), "mixtral": ("q", "k", "v", "o")}.get(
            family, ("q", "k", "v", "o", "gate", "up", "down")))
