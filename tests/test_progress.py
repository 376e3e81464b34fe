"""Progress log lines: a resumed run's rate and eta come from the work this process timed."""
import logging

import scdd_ray.core.progress as progress


def test_resumed_progress_rates_only_the_work_it_timed(monkeypatch, caplog):
    clock = iter([100.0, 110.0, 120.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False)
    with caplog.at_level(logging.INFO, logger="scdd_ray"):
        bar = progress.Progress(100, "squeeze", "step", every_s=5.0, initial=60)
        bar.update(5)  # 5 steps in 10 s: 0.5 step/s, 35 steps left: 70 s
        bar.update(5)  # 10 steps in 20 s
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("squeeze: 65/100 step (0.5 step/s, eta 70s)"), lines
    assert lines[1].startswith("squeeze: 70/100 step (0.5 step/s, eta 60s)"), lines
