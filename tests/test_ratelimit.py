import logging

from blkpy.ratelimit import RateLimitedLog


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
