import pytest
import torch

from bolaco.arch import adapter_for
from bolaco.calibrate import collect
from bolaco.errors import BolacoError, CacheError
from bolaco.store import BlockStore
from conftest import tiny_model


def _activations(model, calibration, batch_size=4):
    """Materialise the input of every record of every block, per sequence, in float64."""
    adapter = adapter_for(model)
    acts = {}
    hooks = []
    for b in range(adapter.n_blocks):
        for r, lids in adapter.block_records(b).items():
            hooks.append(adapter.module(lids[0]).register_forward_pre_hook(
                lambda _m, a, key=(b, r): acts.setdefault(key, []).append(a[0].detach().double())))
    with torch.no_grad():
        for i in range(0, len(calibration), batch_size):
            model(input_ids=calibration[i:i + batch_size])
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in acts.items()}  # (N, T, d)


@pytest.mark.parametrize("partitions", [1, 4])
def test_pooled_moments_match_float64_reference(family, partitions, tmp_path):
    """Gemma-2/3 models here alternate sliding-window and global layers: each block must get its own mask."""
    model = tiny_model(family)
    torch.manual_seed(1)
    calibration = torch.randint(0, 300, (8, 16))
    cache = collect(model, calibration, tmp_path, partitions=partitions, batch_size=3, progress=False)
    acts = _activations(model, calibration)
    for (b, r), x in acts.items():
        parts = x.chunk(partitions, dim=0)
        flat = [p.reshape(-1, p.shape[-1]) for p in parts]
        mus = [f.mean(0) for f in flat]
        covs = [(f - m).T @ (f - m) / f.shape[0] for f, m in zip(flat, mus)]
        ref_cov = sum(covs) / partitions
        ref_mean = sum(mus) / partitions
        allx = x.reshape(-1, x.shape[-1])
        m = cache.moments(b, r)
        assert m.count == allx.shape[0]
        scale = ref_cov.abs().max()
        assert torch.allclose(m.cov, ref_cov, atol=1e-5 * scale, rtol=0), (b, r)
        assert torch.allclose(m.mean, ref_mean, atol=1e-5)
        assert torch.allclose(m.second, allx.T @ allx / allx.shape[0], atol=1e-5 * scale, rtol=0)


def test_interrupted_collect_resumes_to_identical_cache(tmp_path, monkeypatch):
    model = tiny_model("qwen2", layers=4)
    calibration = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(2))
    full = collect(model, calibration, tmp_path / "a", partitions=2, progress=False)

    real_write = BlockStore.write
    calls = {"n": 0}

    def write_then_die(self, block, tensors):
        real_write(self, block, tensors)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(BlockStore, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        collect(model, calibration, tmp_path / "b", partitions=2, progress=False)
    monkeypatch.setattr(BlockStore, "write", real_write)
    store_dirs = list((tmp_path / "b").iterdir())
    store = BlockStore(store_dirs[0] / "covariance", full.store.key, 4, "covariance")
    assert [b for b in range(4) if store.has(b)] == [0, 1]

    resumed = collect(model, calibration, tmp_path / "b", partitions=2, progress=False)
    for b in range(4):
        a, c = full.store.read(b), resumed.store.read(b)
        assert a.keys() == c.keys()
        for k in a:
            assert torch.equal(a[k], c[k]), (b, k)


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        del data[-100:]
    else:               # one flipped byte in the tensor data: same size, other sha256
        data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_damaged_block_is_recomputed_by_the_next_collect(tmp_path, how, caplog):
    model = tiny_model("llama")
    calibration = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))
    cache = collect(model, calibration, tmp_path, progress=False)
    path = cache.store.block_path(1)
    original = path.read_bytes()
    _damage(path, how)
    with caplog.at_level("WARNING", logger="bolaco"):
        again = collect(model, calibration, tmp_path, progress=False)
    assert "covariance cache block 1" in caplog.text and "recomputing" in caplog.text
    assert path.read_bytes() == original            # recomputed bit for bit
    assert torch.equal(again.moments(1, "attn_in").cov, cache.moments(1, "attn_in").cov)


def test_a_block_damaged_after_the_stage_is_refused_then_recomputed(tmp_path):
    model = tiny_model("llama")
    calibration = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))
    collect(model, calibration, tmp_path, progress=False)
    fresh = collect(model, calibration, tmp_path, progress=False)   # verified: blocks 0..2 are read from disk
    fresh.store._verified.clear()           # as a later process would see it
    _damage(fresh.store.block_path(2), "flip")
    with pytest.raises(CacheError, match="run the command again to recompute it"):
        fresh.moments(2, "mlp_in")
    again = collect(model, calibration, tmp_path, progress=False)   # the advice works
    again.moments(2, "mlp_in")
    with pytest.raises(CacheError, match="different inputs"):
        BlockStore(again.store.root, {"other": 1}, 3, "covariance")


def test_an_unreadable_index_recomputes_every_block(tmp_path):
    model = tiny_model("llama")
    calibration = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))
    cache = collect(model, calibration, tmp_path, progress=False)
    before = {b: cache.store.block_path(b).read_bytes() for b in range(3)}
    (cache.store.root / "index.json").write_text("{not json")
    again = collect(model, calibration, tmp_path, progress=False)
    assert {b: again.store.block_path(b).read_bytes() for b in range(3)} == before


def test_collect_refuses_bad_input(tmp_path):
    model = tiny_model("mistral")
    with pytest.raises(BolacoError, match="empty"):
        collect(model, torch.zeros(0, 16, dtype=torch.long), tmp_path, progress=False)
    with pytest.raises(BolacoError, match="equal partitions"):
        collect(model, torch.zeros(6, 16, dtype=torch.long), tmp_path, partitions=4, progress=False)
    with pytest.raises(BolacoError, match="longer than the model allows"):
        collect(model, torch.zeros(2, 256, dtype=torch.long), tmp_path, progress=False)


def test_a_cache_the_disk_cannot_hold_is_refused_before_any_work(tmp_path, monkeypatch):
    from collections import namedtuple

    from bolaco.calibrate import cache_bytes
    model = tiny_model("llama")
    adapter = adapter_for(model)
    calibration = torch.randint(0, 300, (4, 16))
    # exact size: the packed float32 triangles, the float64 partition means and the counts
    store = collect(model, calibration, tmp_path / "ok", partitions=2, progress=False).store
    data_bytes = sum(t.numel() * t.element_size() for b in range(adapter.n_blocks) for t in store.read(b).values())
    assert data_bytes == cache_bytes(adapter, 2)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda _p: usage(10**9, 10**9, 1000))
    with pytest.raises(BolacoError, match="needs 0.0 GB .* free some space or point cache_dir"):
        collect(model, calibration, tmp_path / "full", partitions=2, progress=False)
    assert not (tmp_path / "full").exists() or not any((tmp_path / "full").rglob("block_*"))
