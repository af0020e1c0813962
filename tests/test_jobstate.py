"""The job state machine, fed event dicts as QEMU 7.2 sends them."""

from qmpkit import JobEnd, JobState


def ev(name, **data):
    return {"event": name, "data": data, "timestamp": {"seconds": 100, "microseconds": 500000}}


def status(s, job="j"):
    return ev("JOB_STATUS_CHANGE", id=job, status=s)


def test_ready_then_completed():
    st = JobState("j")
    for e in [status("created"), status("running"), status("ready"),
              ev("BLOCK_JOB_READY", device="j", type="mirror", len=10, offset=10, speed=0),
              status("waiting"), status("pending"),
              ev("BLOCK_JOB_COMPLETED", device="j", type="mirror", len=10, offset=10, speed=0),
              status("concluded"), status("null")]:
        st.apply(e)
    assert st.ready and st.ready_at == 100.5
    assert st.end is JobEnd.COMPLETED and st.failure() is None
    assert st.status == "null" and st.finished
    assert (st.offset, st.length) == (10, 10)
    assert len(st.events) == 9


def test_failure_keeps_qemu_message_even_after_dismiss():
    st = JobState("j")
    for e in [status("created"), status("running"),
              ev("BLOCK_JOB_ERROR", device="j", operation="write", action="report"),
              status("aborting"),
              ev("BLOCK_JOB_COMPLETED", device="j", type="mirror", len=10, offset=2, speed=0,
                 error="No space left on device"),
              status("concluded"), status("null")]:
        st.apply(e)
    assert st.end is JobEnd.FAILED
    assert st.failure() == "No space left on device"
    assert st.errors == [{"device": "j", "operation": "write", "action": "report"}]
    assert not st.ready


def test_other_jobs_and_events_are_ignored():
    st = JobState("j")
    st.apply(status("running", job="other"))
    st.apply(ev("BLOCK_JOB_READY", device="other"))
    st.apply(ev("SHUTDOWN", guest=False))
    assert st.status is None and not st.ready and st.events == []


def test_cancelled():
    st = JobState("j")
    for e in [status("running"), status("aborting"),
              ev("BLOCK_JOB_CANCELLED", device="j", len=10, offset=3, speed=0),
              status("concluded"), status("null")]:
        st.apply(e)
    assert st.end is JobEnd.CANCELLED and st.failure() is None and not st.ready


def test_paused_by_stop_policy_is_not_finished():
    st = JobState("j")
    for e in [status("running"), ev("BLOCK_JOB_ERROR", device="j", operation="write",
                                    action="stop"), status("paused")]:
        st.apply(e)
    assert st.status == "paused" and not st.finished and st.errors[0]["action"] == "stop"


def test_refresh_after_reconnect():
    st = JobState("j")
    st.refresh({"id": "j", "status": "ready", "current-progress": 5, "total-progress": 5})
    assert st.ready and not st.finished
    st.refresh(None)
    assert st.status == "null" and st.finished
    st2 = JobState("k")
    st2.refresh({"id": "k", "status": "concluded", "error": "Input/output error"})
    assert st2.failure() == "Input/output error"
