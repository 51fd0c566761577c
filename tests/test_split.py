import numpy as np
import pytest

from rlhfkit.data.split import carve_eval, phase_counts, split_phases


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 10, 99, 1000, 1919])
@pytest.mark.parametrize("ratios", [(2, 4, 4), (1, 1, 1), (0, 1, 1), (3, 0, 0), (0.5, 0.25, 0.25), (1, 2, 7)])
def test_ratios_honoured_within_one_record(n, ratios):
    counts = phase_counts(n, ratios)
    assert sum(counts) == n
    for c, r in zip(counts, ratios):
        assert abs(c - n * r / sum(ratios)) < 1
        if r == 0:
            assert c == 0


def test_phases_are_disjoint_cover_all_and_deterministic():
    parts = split_phases(1000, (2, 4, 4), seed=1234, key="ds")
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(1000))  # disjoint and complete
    assert [len(p) for p in parts] == [200, 400, 400]
    again = split_phases(1000, (2, 4, 4), seed=1234, key="ds")
    assert all((a == b).all() for a, b in zip(parts, again))


def test_seed_and_dataset_name_change_the_split():
    base = split_phases(200, (1, 1, 1), seed=1, key="a")[0]
    assert not np.array_equal(base, split_phases(200, (1, 1, 1), seed=2, key="a")[0])
    assert not np.array_equal(base, split_phases(200, (1, 1, 1), seed=1, key="b")[0])


def test_carve_eval():
    train, ev = carve_eval(100, 0.1, seed=0, key="x")
    assert len(ev) == 10 and len(train) == 90
    assert not set(train) & set(ev)
    train, ev = carve_eval(100, 0.1, seed=0, key="x", max_eval=3)
    assert len(ev) == 3 and len(train) == 97
    train, ev = carve_eval(2, 0.01, seed=0, key="x")  # never an empty eval or train split
    assert len(ev) == 1 and len(train) == 1
