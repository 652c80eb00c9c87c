import numpy as np
import pytest

from extract.engine.planning import plan_batches, plan_pending_rows


def _plan(seed=0, rows=500, budget=4096):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 1025, size=rows)
    return plan_batches(np.arange(rows), tokens, budget), tokens


def test_every_row_in_exactly_one_batch():
    plan, tokens = _plan()
    rows = np.concatenate(plan.batches)
    assert sorted(rows.tolist()) == list(range(len(tokens)))


@pytest.mark.parametrize("budget", [1024, 4096, 20000])
def test_padded_tokens_stay_within_budget(budget):
    plan, tokens = _plan(budget=budget)
    for batch, padded in zip(plan.batches, plan.batch_tokens):
        assert padded == tokens[batch].max() * batch.size
        assert padded <= budget


def test_row_longer_than_budget_gets_its_own_batch():
    plan = plan_batches(np.arange(3), np.array([10, 5000, 10]), 4096)
    assert [b.tolist() for b in plan.batches] == [[1], [0, 2]]
    assert plan.batch_tokens.tolist() == [5000, 20]


def test_longest_first_ties_by_row():
    plan = plan_batches(np.array([7, 3, 5, 9]), np.array([10, 20, 10, 10]), 30)
    assert [b.tolist() for b in plan.batches] == [[3], [5, 7, 9]]


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_ranks_token_totals_within_one_batch(world_size):
    plan, _ = _plan(rows=2000)
    totals = plan.tokens_per_rank(world_size)
    assert totals.sum() == plan.batch_tokens.sum()
    assert totals.max() - totals.min() <= plan.batch_tokens.max()


def test_batch_b_goes_to_rank_b_mod_world_size():
    plan, _ = _plan()
    for rank in range(3):
        rank_batches = plan.for_rank(rank, 3)
        assert [b.tolist() for b in rank_batches] == [b.tolist() for b in plan.batches[rank::3]]


def test_same_plan_however_often_computed():
    first, _ = _plan(seed=4)
    again, _ = _plan(seed=4)
    assert [b.tolist() for b in first.batches] == [b.tolist() for b in again.batches]


def test_plan_of_a_subset_covers_only_the_subset():
    rows = np.array([2, 11, 40, 41])
    plan = plan_batches(rows, np.array([50, 60, 70, 80]), 200)
    assert sorted(np.concatenate(plan.batches).tolist()) == rows.tolist()


def test_every_window_of_a_row_counts_against_the_budget():
    plan = plan_batches(np.arange(4), np.array([1024, 1024, 100, 100]), 4096, inputs=np.array([3, 2, 1, 1]))
    assert [b.tolist() for b in plan.batches] == [[0], [1, 2, 3]]
    assert plan.batch_tokens.tolist() == [3 * 1024, 4 * 1024]


def test_row_whose_windows_exceed_the_budget_gets_its_own_batch():
    plan = plan_batches(np.arange(3), np.array([1024, 1024, 50]), 4096, inputs=np.array([1, 5, 1]))
    assert [b.tolist() for b in plan.batches] == [[1], [0, 2]]
    assert plan.batch_tokens.tolist() == [5 * 1024, 2 * 1024]


def test_windowed_rows_stay_within_budget_and_each_in_one_batch():
    rng = np.random.default_rng(5)
    tokens = rng.integers(3, 1025, size=400)
    inputs = np.where(tokens == 1024, rng.integers(1, 6, size=400), 1)
    plan = plan_batches(np.arange(400), tokens, 4096, inputs=inputs)
    assert sorted(np.concatenate(plan.batches).tolist()) == list(range(400))
    for batch, padded in zip(plan.batches, plan.batch_tokens):
        assert padded == tokens[batch].max() * inputs[batch].sum()
        assert padded <= 4096 or batch.size == 1


def _copies_of(pending):
    """Every row the pending writes, with the row whose computed values it takes."""
    written = {}
    for batch in pending.plan.batches:
        rows, taken = pending.copies(batch)
        for row, source in zip(rows.tolist(), batch[taken].tolist()):
            assert row not in written
            written[row] = source
    return written


def test_identical_sequences_are_planned_once_and_copied_to_every_row():
    sources = np.array([0, 1, 0, 3, 1, 0, 6, 3])
    tokens = np.array([50, 40, 50, 30, 40, 50, 20, 30])
    pending = plan_pending_rows(np.arange(8), sources, tokens, 100)
    assert sorted(np.concatenate(pending.plan.batches).tolist()) == [0, 1, 3, 6] == pending.computed.tolist()
    assert _copies_of(pending) == {row: int(sources[row]) for row in range(8)}
    assert pending.plan.batch_tokens.sum() == 50 * 2 + 30 * 2  # [0, 1] then [3, 6]


def test_rows_whose_source_is_done_still_take_its_values():
    sources = np.array([0, 1, 0, 3, 1, 0])
    pending = plan_pending_rows(np.array([2, 4, 5]), sources, np.full(6, 10), 100)
    assert pending.computed.tolist() == [0, 1]
    assert _copies_of(pending) == {2: 0, 4: 1, 5: 0}


def test_without_sources_every_row_computes_itself():
    tokens = np.array([5, 9, 7, 3])
    pending = plan_pending_rows(np.array([0, 2, 3]), None, tokens, 12)
    assert _copies_of(pending) == {0: 0, 2: 2, 3: 3}
    assert [b.tolist() for b in pending.plan.batches] == [b.tolist() for b in plan_batches(np.array([0, 2, 3]),
                                                                                         tokens[[0, 2, 3]], 12).batches]


def test_nothing_pending_plans_nothing():
    pending = plan_pending_rows(np.empty(0, np.int64), np.arange(4), np.full(4, 10), 100)
    assert pending.plan.batches == [] and pending.computed.size == 0
    assert pending.summary_lines(np.full(4, 8), 2)[0] == "rows: 0 to write, 0 residues"


def test_the_description_counts_the_batches_of_one_protein_longer_than_the_budget():
    tokens = np.array([30, 250, 40, 120, 20])  # rows 1 and 3 are longer than 100 tokens
    pending = plan_pending_rows(np.arange(5), None, tokens, 100)
    batches_line = pending.summary_lines(tokens - 2, 1)[2]
    assert batches_line.startswith("batches: 4 of <= 100 padded tokens (2 of them one protein longer than that, "
                                   "alone), 470 in all (")
    assert "longer than that" not in plan_pending_rows(np.arange(5), None, tokens, 300).summary_lines(tokens - 2, 1)[2]
