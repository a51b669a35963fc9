"""Network initialisation as in the reference."""
import math

import torch

from cepdist.core.nets import EnergyNet, TwinQ, ValueNet


def test_first_layer_is_initialised_as_one_layer_over_action_and_condition():
    """The reference's first layer is one Linear over [a, s] (fφ: [a, time embedding, s]); its default init
    draws every weight and bias from U(±1/√fan_in) with fan_in the combined width. Split into parts, each
    part must use that same bound (the action part's own default would be √(fan_in/a_dim) larger)."""
    torch.manual_seed(0)
    a_dim, s_dim = 3, 11
    for mlp, fan_in in ((TwinQ(a_dim, s_dim).q1, a_dim + s_dim), (EnergyNet(a_dim, s_dim).mlp, a_dim + 32 + s_dim),
                        (ValueNet(a_dim, s_dim).mlp, a_dim + s_dim)):
        bound = 1 / math.sqrt(fan_in)
        for p in (mlp.inp.weight, mlp.inp.bias, mlp.cond.weight):
            assert p.abs().max() <= bound + 1e-7
            assert p.abs().max() > 0.9 * bound                 # uniform over the whole range, not narrower
        # the action part's spread equals the condition part's (one distribution for the whole layer)
        assert abs(mlp.inp.weight.std() / mlp.cond.weight.std() - 1) < 0.2
    # initial ‖∇a fφ‖ no longer dominated by the action weights: within 2× of the one-layer reference
    ref = torch.nn.Linear(a_dim + 32 + s_dim, 256)
    e = EnergyNet(a_dim, s_dim)
    assert 0.5 < e.mlp.inp.weight.norm() / ref.weight[:, :a_dim].norm() < 2
