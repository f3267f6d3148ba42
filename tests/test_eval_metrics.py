import pytest

from turnwise.eval.metrics import mean_pass_at_k, mean_pass_hat_k, pass_at_k, pass_hat_k


def test_pass_hat_k_table_from_the_issue():
    # successes [4, 2, 0] of 4 trials
    assert mean_pass_hat_k([4, 2, 0], 4, 1) == pytest.approx(0.5)
    assert mean_pass_hat_k([4, 2, 0], 4, 2) == pytest.approx(7 / 18)
    assert mean_pass_hat_k([4, 2, 0], 4, 4) == pytest.approx(1 / 3)


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0
    assert mean_pass_at_k([4, 2, 0], 4, 1) == pytest.approx(0.5)
    assert pass_hat_k(5, 3, 2) == pytest.approx(3 / 10)


def test_invalid_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_hat_k(2, 1, 3)
