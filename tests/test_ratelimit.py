import logging

from blkpy.ratelimit import RateLimitedLog, WindowBudget


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_info_lines_share_the_budget(caplog):
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("t"), burst=2, interval=5.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="t"):
        for i in range(5):
            log.info("state %d", i)
        log.error("refused")
    assert [r.getMessage() for r in caplog.records] == ["state 0", "state 1"]
    assert log.suppressed == 4


def test_burst_then_suppression_then_summary(caplog):
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("t"), burst=3, interval=5.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="t"):
        for i in range(10):
            log.warning("bad request %d", i)
        assert [r.getMessage() for r in caplog.records] == [
            "bad request 0", "bad request 1", "bad request 2"]
        assert log.suppressed == 7
        clock.now = 5.0
        log.error("later")
    assert [r.getMessage() for r in caplog.records][-2:] == [
        "7 similar messages suppressed", "later"]


def test_window_budget_counts_the_last_window_per_key():
    clock = Clock()
    budget = WindowBudget(limit=3, window=10.0, clock=clock)
    for now in (0.0, 4.0, 8.0):
        assert not budget.spent("a")
        clock.now = now
        budget.charge("a")
    assert budget.spent("a") and budget.used("a") == 3
    assert not budget.spent("b")  # another key has its own budget
    assert budget.reopens_in("a") == 2.0 and budget.reopens_in("b") == 0.0
    clock.now = 10.0  # the first event left the window: one more fits, not three
    assert not budget.spent("a") and budget.used("a") == 2
    budget.charge("a")
    assert budget.spent("a") and budget.reopens_in("a") == 4.0
    clock.now = 28.0
    assert budget.used("a") == 0 and budget.reopens_in("a") == 0.0
