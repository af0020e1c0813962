"""The embedded qemu-storage-daemon: start, failure, stop, cleanup."""

import os
import stat
import subprocess

import pytest
from helpers import running

from qmpkit import Client, QemuStartError, QmpConnectionError, StorageDaemon
from qmpkit.client import parse_address
from qmpkit.daemon import DaemonState


async def test_start_private_dir_and_clean_stop(tmp_path):
    d = StorageDaemon(base_dir=tmp_path)
    client = await d.start()
    assert stat.S_IMODE(os.stat(d.workdir).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(d.qmp_path).st_mode)
    assert (await client.version())[0] >= 7
    workdir, pid = d.workdir, d.pid
    assert await d.stop() == 0            # quit, exit code 0
    assert not workdir.exists()
    assert not running(pid)
    assert await d.stop() == 0            # twice is fine
    assert d.state is DaemonState.STOPPED


async def test_start_failure_carries_command_line_and_qemu_output(tmp_path):
    d = StorageDaemon(base_dir=tmp_path, extra_args=["--blockdev", "driver=nosuchdriver,node-name=x"])
    with pytest.raises(QemuStartError) as ei:
        await d.start()
    err = ei.value
    assert "--blockdev" in err.argv and "nosuchdriver" in " ".join(err.argv)
    assert "nosuchdriver" in err.output          # QEMU's own complaint
    assert err.returncode not in (None, 0)
    assert "nosuchdriver" in str(err)
    assert list(tmp_path.iterdir()) == []        # temp dir removed


async def test_missing_binary_is_a_clear_error(tmp_path):
    d = StorageDaemon(binary=str(tmp_path / "no-such-qsd"), base_dir=tmp_path)
    with pytest.raises(QemuStartError, match="cannot run .*no-such-qsd"):
        await d.start()


async def test_killed_daemon_is_still_cleaned_up(tmp_path):
    d = StorageDaemon(base_dir=tmp_path)
    await d.start()
    d.kill()
    assert d.returncode == -9
    await d.stop()
    assert not d.workdir.exists()


async def test_attach_to_a_daemon_started_by_hand_over_unix_and_tcp(tmp_path):
    from helpers import free_port, running, stop_pid
    sock = tmp_path / "by hand.sock"       # a space in the path on purpose
    pidfile = tmp_path / "qsd.pid"
    port = free_port()
    # --daemonize returns only once the monitors listen: no need to poll.
    subprocess.run([
        "qemu-storage-daemon", "--daemonize", "--pidfile", str(pidfile),
        "--chardev", f"socket,id=m0,path={sock},server=on,wait=off", "--monitor", "chardev=m0",
        "--chardev", f"socket,id=m1,host=127.0.0.1,port={port},server=on,wait=off",
        "--monitor", "chardev=m1"], check=True, timeout=30)
    pid = int(pidfile.read_text())
    try:
        for addr in (str(sock), f"127.0.0.1:{port}"):
            c = await Client.attach(addr, timeout=5)
            assert (await c.version())[0] >= 7
            await c.close()
            await c.close()
    finally:
        stop_pid(pid)
    assert not running(pid)


async def test_attach_to_nothing_fails_clearly(tmp_path):
    with pytest.raises(QmpConnectionError, match="cannot connect to QMP at .*nothing.sock"):
        await Client.attach(str(tmp_path / "nothing.sock"), timeout=2)


def test_parse_address():
    assert parse_address("/run/qmp.sock") == "/run/qmp.sock"
    assert parse_address("localhost:4444") == ("localhost", 4444)
    assert parse_address("[::1]:4444") == ("::1", 4444)
    assert parse_address("unix:/x/y") == "/x/y"
    assert parse_address("qmp.sock") == "qmp.sock"
