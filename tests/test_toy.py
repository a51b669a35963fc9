"""The 2-D toy: dataset definitions, exact targets, the distance, and the CLI."""
import numpy as np
import pytest

from cepdist.algos import toy
from cepdist.cli import main


def test_dataset_values_follow_their_definitions():
    x, e = toy.make_dataset("8gaussians", 4000, seed=0)
    ang = np.round(np.arctan2(x[:, 1], x[:, 0]) / (np.pi / 4)) % 8       # nearest centre index
    assert np.mean(np.isclose(e, ang / 7)) > 0.99
    x, e = toy.make_dataset("checkerboard", 4000)
    assert np.array_equal(e == 1, ((x[:, 0] > 0) & (x[:, 0] <= 2)) | (x[:, 0] <= -2))
    x, e = toy.make_dataset("rings", 4000)
    assert np.allclose(np.unique(e), [0.0, 1 / 3, 2 / 3, 1.0])
    x, e = toy.make_dataset("swissroll", 4000)
    assert np.allclose(e, (x**2).sum(1) / 9, atol=1e-6)
    for name in toy.DATASETS:
        x, e = toy.make_dataset(name, 1001)
        assert x.shape == (1001, 2) and e.shape == (1001,) and e.min() >= 0
        # ‖x‖²/9 on the noisy swiss roll slightly exceeds 1 at the rim; the other values are within [0, 1]
        assert e.max() <= (1.5 if name == "swissroll" else 1.0)
    with pytest.raises(ValueError, match="unknown toy dataset 'blobs'"):
        toy.make_dataset("blobs", 10)


def test_ground_truth_tilts_towards_high_value():
    """At β = 10 on moons (e ∈ {0,1}) the exact target has p(e=1) = e^10/(1 + e^10) ≈ 0.99995."""
    gt = toy.ground_truth("moons", 10.0, 2000, pool=100_000)
    x, e = toy.make_dataset("moons", 100_000, seed=1)
    # points of the upper-left moon (label 0) lie mostly above y = 0.3; the tilted target has almost none
    frac_upper = np.mean(gt[:, 1] > 1.2)
    assert frac_upper < np.mean(x[:, 1] > 1.2) / 5


def test_sliced_w2_is_a_distance_of_the_right_scale():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5000, 2))
    assert toy.sliced_w2(a, a) == 0.0
    # a shift by d along a random direction: W2 of the projections is |d·cos θ|, whose RMS over θ is d/√2
    assert abs(toy.sliced_w2(a, a + np.array([1.0, 0.0]), n_proj=512) - 1 / np.sqrt(2)) < 0.05


def test_cli_data_and_sample(tmp_path):
    assert main(["toy", "data", "--dataset", "moons", "--n", "300", "--out", str(tmp_path / "m.npz")]) == 0
    d = np.load(tmp_path / "m.npz")
    assert d["x"].shape == (300, 2) and d["e"].shape == (300,)
    args = ["toy", "sample", "--dataset", "moons", "--beta", "3", "--method", "cep", "--n", "200",
            "--preset", "tiny", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "s.npy")]
    assert main(args) == 0
    s = np.load(tmp_path / "s.npy")
    assert s.shape == (200, 2) and np.isfinite(s).all()
    cached = sorted(p.name for p in (tmp_path / "cache").glob("moons-*/*.pt"))
    assert cached == ["behavior.pt", "energy-cep-beta3.pt"]
    assert main(args) == 0                                  # second call: from the cache, same samples
    assert np.array_equal(np.load(tmp_path / "s.npy"), s)


def test_cli_rejects_unknown_method(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["toy", "sample", "--dataset", "moons", "--beta", "3", "--method", "ddim", "--out", "x.npy"])
    assert "invalid choice: 'ddim'" in capsys.readouterr().err
