import random

import numpy as np
import pytest

from rlhfkit.data.split import carve_eval, phase_counts, prompt_key, split_phases


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 10, 99, 1000, 1919])
@pytest.mark.parametrize("ratios", [(2, 4, 4), (1, 1, 1), (0, 1, 1), (3, 0, 0), (0.5, 0.25, 0.25), (1, 2, 7)])
def test_ratios_honoured_within_one_record(n, ratios):
    counts = phase_counts(n, ratios)
    assert sum(counts) == n
    for c, r in zip(counts, ratios):
        assert abs(c - n * r / sum(ratios)) < 1
        if r == 0:
            assert c == 0


def unique_keys(n):
    return [f"user: question {i}" for i in range(n)]


def test_one_record_per_prompt_meets_the_ratios_exactly():
    parts = split_phases(unique_keys(1000), (2, 4, 4), seed=1234)
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(1000))  # disjoint and complete
    assert [len(p) for p in parts] == [200, 400, 400]
    again = split_phases(unique_keys(1000), (2, 4, 4), seed=1234)
    assert all((a == b).all() for a, b in zip(parts, again))


def test_seed_and_prompts_change_the_split():
    base = split_phases(unique_keys(200), (1, 1, 1), seed=1)[0]
    assert not np.array_equal(base, split_phases(unique_keys(200), (1, 1, 1), seed=2)[0])
    other = [k + " (reworded)" for k in unique_keys(200)]
    assert not np.array_equal(base, split_phases(other, (1, 1, 1), seed=1)[0])


def test_the_split_follows_the_prompts_not_the_file_order():
    keys = unique_keys(300)
    order = list(range(300))
    random.Random(0).shuffle(order)
    shuffled = [keys[i] for i in order]
    by_key = [{keys[i] for i in part} for part in split_phases(keys, (2, 4, 4), seed=7)]
    by_key_shuffled = [{shuffled[i] for i in part} for part in split_phases(shuffled, (2, 4, 4), seed=7)]
    assert by_key == by_key_shuffled


def test_carve_eval():
    train, ev = carve_eval(unique_keys(100), 0.1, seed=0)
    assert len(ev) == 10 and len(train) == 90
    assert not set(train) & set(ev)
    train, ev = carve_eval(unique_keys(100), 0.1, seed=0, max_eval=3)
    assert len(ev) == 3 and len(train) == 97
    train, ev = carve_eval(unique_keys(2), 0.01, seed=0)  # never an empty eval or train split
    assert len(ev) == 1 and len(train) == 1


def synthetic_pairs(n_prompts=120, seed=0):
    """Many pairs per prompt (1 to 9), and prompts that repeat with other spacing and case."""
    rng = random.Random(seed)
    keys = []
    for q in range(n_prompts):
        for _ in range(rng.randint(1, 9)):
            text = f"Who   wrote BOOK {q}?" if rng.random() < 0.3 else f"who wrote book {q}?"
            keys.append(prompt_key([{"role": "user", "content": text}]))
    rng.shuffle(keys)
    return keys


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_prompt_on_both_sides_of_any_split(seed):
    keys = synthetic_pairs(seed=seed)
    train, evals = carve_eval(keys, 0.1, seed=seed)
    sides = {}
    for split, idx in (("train", train), ("eval", evals)):
        sub = [keys[i] for i in idx]
        for phase, part in zip((1, 2, 3), split_phases(sub, (2, 4, 4), seed=seed)):
            sides[(split, phase)] = {sub[i] for i in part}
    assert sum(len(v) for v in sides.values()) == len(set(keys))  # each prompt in exactly one chunk
    n = len(keys)
    # each cut lies at the group boundary nearest its target: within half a group (at most 9 pairs)
    assert abs(len(evals) - 0.1 * n) <= 4.5
    phase_sizes = [len(p) for p in split_phases([keys[i] for i in train], (2, 4, 4), seed=seed)]
    for size, share in zip(phase_sizes, (0.2, 0.4, 0.4)):
        assert abs(size - share * len(train)) <= 4.5 + 4.5 + 1  # two cuts, plus rounding to whole records


def test_prompt_key_ignores_spacing_and_case_but_not_roles_or_turns():
    user = [{"role": "user", "content": "  Who wrote\n Hamlet? "}]
    assert prompt_key(user) == prompt_key([{"role": "user", "content": "who WROTE hamlet?"}])
    assert prompt_key(user) != prompt_key([{"role": "system", "content": "Who wrote Hamlet?"}])
    assert prompt_key(user) != prompt_key([{"role": "system", "content": "Be brief."}, *user])


def test_a_group_bigger_than_the_eval_share_still_leaves_both_sides():
    keys = ["a"] * 50 + ["b"] * 2 + ["c"]
    train, ev = carve_eval(keys, 0.1, seed=0, max_eval=1)
    assert len(train) and len(ev)
    assert not {keys[i] for i in train} & {keys[i] for i in ev}
