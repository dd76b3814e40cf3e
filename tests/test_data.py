import pytest
import torch

from bolaco.data import RoleSpec, check_roles, pack, read_text, role_sequences
from bolaco.errors import BolacoError


def test_pack_drops_the_partial_window():
    out = pack(torch.arange(10), 4)
    assert out.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(BolacoError, match="fewer than one sequence"):
        pack(torch.arange(3), 4)


def test_roles_resolve_and_must_be_disjoint():
    totals = {"wikitext2-valid": 100, "wikitext2-test": 50}
    ranges = check_roles({"calibration": RoleSpec("wikitext2-valid", 0, 64),
                          "search": RoleSpec("wikitext2-valid", -32, 32),
                          "test": RoleSpec("wikitext2-test")}, totals)
    assert ranges == {"calibration": [range(0, 64)], "search": [range(68, 100)], "test": [range(0, 50)]}
    # a mixture: each part is checked against every other part of every role
    mixed = check_roles({"calibration": (RoleSpec("wikitext2-valid", 0, 32), RoleSpec("c4-valid", 0, 32)),
                         "search": (RoleSpec("wikitext2-valid", -16, 16), RoleSpec("c4-valid", -16, 16))},
                        {**totals, "c4-valid": 80})
    assert mixed["search"] == [range(84, 100), range(64, 80)]
    with pytest.raises(BolacoError, match="overlap in 'c4-valid'"):
        check_roles({"calibration": (RoleSpec("wikitext2-valid", 0, 32), RoleSpec("c4-valid", 0, 70)),
                     "search": (RoleSpec("wikitext2-valid", -16, 16), RoleSpec("c4-valid", -16, 16))},
                    {**totals, "c4-valid": 80})
    with pytest.raises(BolacoError, match="overlap in 'c4-valid'"):   # two parts of one role
        check_roles({"calibration": (RoleSpec("c4-valid", 0, 40), RoleSpec("c4-valid", 30, 10))},
                    {**totals, "c4-valid": 80})
    with pytest.raises(BolacoError, match="overlap"):
        check_roles({"calibration": RoleSpec("wikitext2-valid", 0, 70),
                     "search": RoleSpec("wikitext2-valid", -32, 32)}, totals)
    with pytest.raises(BolacoError, match="test split"):
        check_roles({"calibration": RoleSpec("wikitext2-test", 0, 8), "test": RoleSpec("wikitext2-test", 10, 8)},
                    totals)
    with pytest.raises(BolacoError, match="test split"):
        check_roles({"search": RoleSpec("wikitext2-test", 0, 8)}, totals)
    with pytest.raises(BolacoError, match="has 100 sequences"):
        check_roles({"calibration": RoleSpec("wikitext2-valid", 90, 20)}, totals)


def test_role_sequences_are_the_packed_corpus_slices(tokenizer):
    roles = {"calibration": RoleSpec("wikitext2-valid", 0, 4), "search": RoleSpec("wikitext2-valid", -2, 2),
             "test": RoleSpec("wikitext2-test", 0, 3)}
    data = role_sequences(roles, tokenizer, 32)
    whole = tokenizer(read_text("wikitext2-valid"), add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = whole.numel() // 32
    assert torch.equal(data["calibration"].reshape(-1), whole[:4 * 32])
    assert torch.equal(data["search"].reshape(-1), whole[(n - 2) * 32:n * 32])
    assert data["test"].shape == (3, 32)


def test_corpora_from_the_data_directory(tmp_path):
    with pytest.raises(BolacoError, match="not found"):
        read_text("ptb-test", tmp_path)
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text("\n  \n")
    with pytest.raises(BolacoError, match="empty"):
        read_text("ptb-test", tmp_path)
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" a b \n c d \n")
    assert read_text("ptb-test", tmp_path) == "a b c d"
    with pytest.raises(BolacoError, match="unknown corpus"):
        read_text("nope")
