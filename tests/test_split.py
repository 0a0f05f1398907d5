"""The GPU split planner, on made-up device sizes (no GPU needed)."""
import pytest

from model.config import ModelConfig
from model.split import GB, Costs, SplitError, costs_for, plan_auto, plan_manual

LLAMA70B = ModelConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, head_dim=128)


def test_manual_fills_devices_in_order():
    c = Costs(layer_weights=int(1 * GB), layer_kv=0, embed=0, head=0, reserve=0)
    plan = plan_manual(5, c, [2.5, 10])
    assert plan == [0, 0, 1, 1, 1]


def test_manual_too_small_is_refused_clearly():
    c = Costs(layer_weights=int(1 * GB), layer_kv=0, embed=0, head=0, reserve=0)
    with pytest.raises(SplitError, match="holds only 3 of 5 layers"):
        plan_manual(5, c, [1.5, 1.5, 1.2])
    with pytest.raises(SplitError, match="positive"):
        plan_manual(5, c, [0, 4])
    with pytest.raises(SplitError, match="layer 0 needs"):
        plan_manual(5, c, [0.5, 10])


def test_auto_counts_the_kv_cache():
    # Weights alone would fit on one 24 GB card, weights + a long KV cache do not.
    c = Costs(layer_weights=int(0.5 * GB), layer_kv=int(0.3 * GB), embed=0, head=int(0.5 * GB), reserve=int(1 * GB))
    plan = plan_auto(32, c, [24 * GB, 24 * GB])
    assert len(plan) == 32 and plan == sorted(plan)
    for d in (0, 1):
        n = plan.count(d)
        extra = c.reserve + (c.head if d == 1 else 0)
        assert n * (c.layer_weights + c.layer_kv) + extra <= 24 * GB
    assert plan.count(0) > 0 and plan.count(1) > 0


def test_auto_uneven_devices_get_proportional_shares():
    c = Costs(layer_weights=int(1 * GB), layer_kv=0, embed=0, head=0, reserve=0)
    plan = plan_auto(30, c, [10 * GB, 20 * GB])
    assert plan.count(0) == 10 and plan.count(1) == 20


def test_auto_impossible_is_refused_with_the_figures():
    c = costs_for(LLAMA70B, max_seq_len=4096)
    with pytest.raises(SplitError, match="does not fit") as e:
        plan_auto(80, c, [16 * GB, 16 * GB])
    assert "GB free" in str(e.value)


def test_70b_on_two_80gb_cards_fits_at_2k():
    c = costs_for(LLAMA70B, max_seq_len=2048)
    plan = plan_auto(80, c, [78 * GB, 78 * GB])
    assert plan.count(0) + plan.count(1) == 80 and abs(plan.count(0) - plan.count(1)) <= 2
