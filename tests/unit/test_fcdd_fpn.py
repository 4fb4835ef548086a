"""FCDD+FPN: FCDD's objective through the FPN decoder finds a dark defect, saves and loads
(its options, outliers and one-image fit are tested with FCDD's in test_fcdd.py)."""

from __future__ import annotations

from tests.unit.pet_method_checks import check_fit_find_save_load
from tests.unit.test_fcdd import BLACK, hsc_before_and_after


def test_fcdd_fpn_finds_a_dark_defect_and_loads_identically(tmp_path) -> None:
    detector = check_fit_find_save_load("fcdd_fpn", tmp_path, color=BLACK, loss_falls=False, max_steps=30)
    before, after = hsc_before_and_after(detector)
    assert after < before
