"""edged.supervisor: restart with backoff, count, give up once."""

from __future__ import annotations

import threading

from edged.supervisor import Supervisor


def _supervisor(stop, fatal, **kw) -> Supervisor:
    return Supervisor(stop, on_fatal=lambda name, exc: (fatal.append((name, exc)), done.set()),
                      backoff_min_s=0.01, backoff_max_s=0.02, **kw)


done = threading.Event()


def test_a_failing_stage_is_restarted_and_counted():
    stop, fatal, runs = threading.Event(), [], []
    finished = threading.Event()

    def body():
        runs.append(1)
        if len(runs) <= 2:
            raise RuntimeError(f"boom {len(runs)}")
        finished.set()

    sv = _supervisor(stop, fatal, max_restarts=5)
    sv.spawn("work", body)
    assert finished.wait(10)
    assert sv.join("work", 10)
    st = sv.stats()["work"]
    assert st["state"] == "finished" and st["failures"] == 2 and st["last_error"] == "RuntimeError: boom 2"
    assert fatal == [] and sv.total_failures == 2 and sv.healthy()


def test_a_stage_that_keeps_failing_is_fatal_once():
    stop, fatal = threading.Event(), []
    done.clear()

    def body():
        raise OSError("database is locked")

    sv = _supervisor(stop, fatal, max_restarts=3)
    sv.spawn("publisher", body)
    sv.spawn("other", body)
    assert done.wait(10)
    assert sv.join("publisher", 10) and sv.join("other", 10)
    assert len(fatal) == 1 and isinstance(fatal[0][1], OSError)
    states = {n: s["state"] for n, s in sv.stats().items()}
    assert "failed" in states.values() and not sv.healthy()


def test_stop_interrupts_the_backoff():
    stop, fatal = threading.Event(), []
    failed_once = threading.Event()

    def body():
        failed_once.set()
        raise RuntimeError("x")

    sv = Supervisor(stop, on_fatal=lambda *a: fatal.append(a), backoff_min_s=3600, backoff_max_s=3600)
    sv.spawn("slow", body)
    assert failed_once.wait(10)
    stop.set()
    assert sv.join("slow", 10)
    assert sv.state("slow") == "stopped" and fatal == []
