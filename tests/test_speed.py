"""bolaco.evaluate.speed: each record is timed with its low-rank members' down factors stacked, every member
factorised and then each member dense in turn. Timings are never asserted (this machine is noisy); the cost
function is replaced by a count of matrix products, which the timing would follow where calls dominate."""

import torch

from bolaco.evaluate import speed
from bolaco.layers import LowRankLinear

RECORDS = {"attn_in": {"q": (64, 64, 16), "k": (64, 16, 8), "v": (64, 16, 8)}, "o_in": {"o": (64, 64, 16)}}


def products_per_step(layers, x, calls):
    count = []
    real = torch.nn.functional.linear

    def counting(*a, **k):
        count.append(1)
        return real(*a, **k)

    torch.nn.functional.linear = counting
    try:
        with torch.inference_mode():
            for m in layers.values():
                m(x)
    finally:
        torch.nn.functional.linear = real
    return float(len(count))


def test_records_are_timed_with_stacked_down_factors(monkeypatch):
    monkeypatch.setattr(speed, "_us_per_step", products_per_step)
    timings = {t.type: t for t in speed.time_types(RECORDS, batch=1, rounds=1)}
    assert set(timings) == {"q", "k", "v", "o"} and timings["q"].rank == 16 and timings["k"].rank == 8
    # q, k, v factorised: one stacked down product + three up products; with one member dense, two stacked
    # members (one product + two ups) and the dense one: the same count, so it stays factorised
    assert timings["q"].factorised_us == 4 and timings["k"].dense_us == 4 and not timings["k"].keep_dense
    # o alone: two products factorised, one dense (half the time: past the margin)
    assert timings["o"].factorised_us == 2 and timings["o"].dense_us == 1 and timings["o"].keep_dense


def test_a_record_is_built_as_it_is_served():
    layers = speed._record(RECORDS["attn_in"], "k", "cpu", torch.float32)
    assert isinstance(layers["k"], torch.nn.Linear) and layers["k"].out_features == 16
    assert all(isinstance(layers[t], LowRankLinear) and layers[t].shared is layers["q"].shared for t in ("q", "v"))
    assert layers["q"].shared.weight.shape == (16 + 8, 64)
    assert speed.time_types(RECORDS, batch=2, calls=5, rounds=1)[0].factorised_us > 0
