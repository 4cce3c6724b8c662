"""report.py: the smoothing of the per-run loss plots."""

from posttrain.report import _ema


def test_ema_window_follows_the_number_of_logged_points():
    # A short run (8 points): no smoothing, so the curve ends where the loss ends.
    short = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    assert _ema(short) == short
    # A long run: alpha = 2 / (n / 10 + 1) = 20 / 210 for 200 points, by hand on a step.
    values = [1.0] * 100 + [0.0] * 100
    alpha = 20 / 210
    assert abs(_ema(values)[100] - (1 - alpha)) < 1e-12
    assert abs(_ema(values)[-1] - (1 - alpha) ** 100) < 1e-12
    assert _ema([2.0, 4.0], alpha=0.5) == [2.0, 3.0]  # an explicit alpha is used as given
