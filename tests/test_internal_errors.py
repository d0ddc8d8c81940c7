"""A broken invariant of yoloprune's own is an InternalError: outside the user-error root, reported as a bug."""

from __future__ import annotations

import pickle

import pytest

from yoloprune import cli
from yoloprune.errors import REPORT_HINT, InternalError, YoloPruneError


def test_internal_error_is_not_a_user_error():
    assert not issubclass(InternalError, YoloPruneError)
    with pytest.raises(InternalError):  # an `except YoloPruneError` (the "fix your input" path) lets it through
        try:
            raise InternalError("a usable calibration is None.")
        except YoloPruneError:
            pytest.fail("InternalError was caught as a user error")


def test_message_ends_with_the_report_hint_once_even_after_pickling():
    e = InternalError("the C2f split changed the parameter count.")
    assert str(e) == f"the C2f split changed the parameter count. {REPORT_HINT}"
    assert str(pickle.loads(pickle.dumps(e))) == str(e)  # a trial's error sent between processes


def test_cli_reports_an_internal_error_as_a_bug_with_its_traceback(monkeypatch, capsys):
    def broken(args):
        raise InternalError("landing considered no allocation.")

    monkeypatch.setattr(cli, "_cmd_stages", broken)
    assert cli.main(["stages", "yolov8n.yaml"]) == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert err.rstrip().endswith(f"internal error: landing considered no allocation. {REPORT_HINT}")
    assert "\nerror: " not in f"\n{err}"  # not the user-error line


def test_cli_still_reports_a_user_error_with_exit_code_2(monkeypatch, capsys):
    def bad_input(args):
        raise YoloPruneError("unknown stage 'bogus'.")

    monkeypatch.setattr(cli, "_cmd_stages", bad_input)
    assert cli.main(["stages", "yolov8n.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown stage 'bogus'.\n" and "Traceback" not in err


def test_saving_a_model_that_still_holds_split_c2f_blocks_is_an_internal_error(tmp_path):
    from yoloprune.ultra.blocks import split_c2f_blocks
    from yoloprune.ultra.checkpoint import save_checkpoint
    from yoloprune.ultra.models import load_detector

    model = load_detector("yolov8n.yaml", nc=2)
    split_c2f_blocks(model)
    with pytest.raises(InternalError, match="still holds yoloprune's SplitC2f"):
        save_checkpoint(model, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_landing_on_latency_that_measured_nothing_is_an_internal_error():
    from yoloprune.search.targets import land_on_latency

    with pytest.raises(InternalError, match="max_measurements 0"):  # the config allows >= 1 only
        land_on_latency(None, lambda s: {}, 0.3, 1, measure=lambda ratios, k: 0.0, max_measurements=0)  # type: ignore[arg-type]
