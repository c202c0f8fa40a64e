"""Progress outside a terminal: one log line per interval, a last line when the work stopped short."""

import logging
import sys

import pytest

from pipeline.progress import Progress


@pytest.fixture(autouse=True)
def not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # as in a Ray job's log, even under `pytest -s`


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]


def test_a_line_per_interval_and_none_for_short_work(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    with Progress(3, "labelling", unit="shard", interval=0.0) as bar:
        for _ in range(3):
            bar.update()
    assert [m.split(" (")[0] for m in lines(caplog)] == [f"labelling: {k}/3 shard" for k in (1, 2, 3)]
    caplog.clear()
    with Progress(3, "quick", interval=3600.0) as bar:
        for _ in range(3):
            bar.update()
    assert lines(caplog) == []  # done before the first interval: the stage's own log line says enough


def test_work_stopped_short_says_how_far_it_got_and_no_desc_shows_nothing(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    with Progress(5, "evaluating", unit="row", interval=3600.0) as bar:
        bar.update(2)
    assert [m.split(" (")[0] for m in lines(caplog)] == ["evaluating: 2/5 row"]
    caplog.clear()
    with Progress(5, None, interval=0.0) as bar:
        bar.update(5)
    assert lines(caplog) == []
