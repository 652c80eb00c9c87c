"""--toks-per-batch auto: the budget a GPU's free memory holds (the formula; its use needs a GPU)."""

import torch

from extract.models.esm2.token_budget import MAX_TOKEN_BUDGET, memory_token_budget

GiB = 2**30
ESM2_3B = {"embed_dim": 2560, "heads": 40}


def _budget(free_gib: float, dtype=torch.bfloat16, layers_kept=1, scores=0, shape=ESM2_3B) -> int:
    return memory_token_budget(int(free_gib * GiB), dtype, shape["embed_dim"], layers_kept, shape["heads"], scores)


def test_the_budget_fills_half_the_free_memory_by_the_per_token_estimate():
    # 3B in bf16 with SDPA kernels: 2560 x (2 x (20 + 1) + 12) bytes per token.
    assert _budget(16) == 8 * GiB // (2560 * 54) == 62_137
    assert abs(_budget(32) - 2 * _budget(16)) <= 1  # linear in the free memory, up to rounding


def test_fair_esms_materialised_scores_fp32_and_more_layers_cost_room():
    fast = _budget(16)
    assert _budget(16, scores=1024) == 8 * GiB // (2560 * 54 + 8 * 40 * 1024) < fast
    assert _budget(16, dtype=torch.float32) == 8 * GiB // (2560 * (4 * 21 + 12)) < fast
    assert _budget(16, layers_kept=4) < fast


def test_the_budget_stays_between_the_seed_plans_floor_and_the_cap():
    assert _budget(0.001) == 3072 and _budget(0.001, dtype=torch.float32) == 2048
    assert _budget(140) == MAX_TOKEN_BUDGET
