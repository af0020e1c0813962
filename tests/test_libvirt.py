"""The libvirt backend against a real, private libvirtd (issue #18).

The session fixture starts its own ``libvirtd`` in a private mount namespace
(``unshare -m``): libvirt's state, config, log and cache dirs and ``/run`` are
temp dirs of the fixture there, so the machine's own libvirt (its daemon, its
domains, its capability cache) is never touched, and the two can run side by
side. Its socket is reached at ``qemu:///system?socket=DIR/sock/libvirt-sock``.
QEMU's output goes to files (``stdio_handler = "file"``), so no ``virtlogd`` is
needed. Everything started is stopped by PID, and the temp dir removed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import libvirt  # the dev extra installs it: missing is a failure, not a skip
import pytest

import qmpkit.libvirt
from qmpkit import ArgumentError
from qmpkit.client import Client
from qmpkit.libvirt import (LibvirtDomain, LibvirtSampler, block_copy_arguments,
                            managed_by_libvirt)
from qmpkit.process import die_with_parent
from qmpkit.trace import Trace


MiB = 1 << 20
DISK = 64 * MiB
_names = itertools.count(1)


class PrivateLibvirtd:
    """A libvirtd of its own: own config, socket dir, PID file and state dirs."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qmpkit-libvirtd-"))
        self.sock_dir = self.dir / "sock"
        self.log = self.dir / "libvirtd.log"
        for sub in ("sock", "etc", "lib", "log", "cache"):
            (self.dir / sub).mkdir(mode=0o700)
        self.uri = f"qemu:///system?socket={self.sock_dir}/libvirt-sock"
        (self.dir / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.sock_dir}"\n'
            'unix_sock_rw_perms = "0700"\nunix_sock_ro_perms = "0700"\n'
            'unix_sock_admin_perms = "0700"\n'
            'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            # qemu.qemu_monitor at debug: the QMP libvirt sends, read back by the tests
            'log_filters = "1:qemu.qemu_monitor"\n'
            f'log_outputs = "1:file:{self.log}"\n')
        (self.dir / "etc" / "qemu.conf").write_text(
            # no cgroups, no per-domain namespace, no security labels, no virtlogd:
            # nothing of the host's is changed, and the temp dirs stay root's
            'user = "root"\ngroup = "root"\ndynamic_ownership = 0\n'
            'security_driver = "none"\nnamespaces = []\ncgroup_controllers = []\n'
            'stdio_handler = "file"\n')
        d = self.dir
        script = ("set -e\n"
                  f"mount --bind {d}/etc /etc/libvirt\n"
                  "mount -t tmpfs -o mode=0755 tmpfs /run\n"
                  f"mount --bind {d}/lib /var/lib/libvirt\n"
                  f"mount --bind {d}/log /var/log/libvirt\n"
                  f"mount --bind {d}/cache /var/cache/libvirt\n"
                  f"exec libvirtd --config {d}/libvirtd.conf --pid-file {d}/libvirtd.pid\n")
        self.started = time.monotonic()
        # unshare execs sh, which execs libvirtd: the Popen's PID is libvirtd's
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=open(d / "stdout.log", "wb"),
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        deadline = time.monotonic() + 30
        while not (self.sock_dir / "libvirt-sock").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = (d / "stdout.log").read_text()
                self.stop()
                raise RuntimeError(f"private libvirtd did not start: {out}")
            time.sleep(0.05)
        self.up_s = time.monotonic() - self.started
        self.first_start_s: float | None = None

    def qemu_pids(self) -> list[int]:
        """QEMUs whose command line names this fixture's dirs (its domains)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in argv and b"guest=qmpkit-t-" in argv \
                    and str(self.dir).encode() in argv:
                pids.append(int(entry))
        return pids

    def stop(self) -> None:
        """Destroy the domains, stop libvirtd by PID, remove the temp dir."""
        if self.proc.poll() is None:
            try:
                conn = libvirt.open(self.uri)
                for dom in conn.listAllDomains():
                    if dom.isActive():
                        dom.destroy()
                    if dom.isPersistent():
                        dom.undefine()
                conn.close()
            except libvirt.libvirtError:
                pass
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in self.qemu_pids():       # a domain libvirt failed to destroy
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def libvirtd():
    d = PrivateLibvirtd()
    yield d
    d.stop()
    print(f"\nprivate libvirtd: up in {d.up_s:.2f} s; first domain start "
          f"{d.first_start_s} s")


def _make_disk(path: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(DISK)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 40M",
                    "-c", "write -P 0xcd 48M 8M", str(path)],
                   check=True, stdout=subprocess.DEVNULL)


def _domain_xml(name: str, disk: Path, extra_qmp: Path | None = None) -> str:
    ns = " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'" if extra_qmp else ""
    cmd = (f"<qemu:commandline><qemu:arg value='-qmp'/>"
           f"<qemu:arg value='unix:{extra_qmp},server=on,wait=off'/></qemu:commandline>"
           if extra_qmp else "")
    return f"""<domain type='qemu'{ns}>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>{shutil.which('qemu-system-x86_64')}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <memballoon model='none'/>
  </devices>
  {cmd}
</domain>"""


class Guest:
    """A persistent TCG domain with no OS (SeaBIOS finds nothing to boot and waits)."""

    def __init__(self, libvirtd: PrivateLibvirtd, workdir: Path, *, extra_qmp: bool = False):
        self.name = f"qmpkit-t-{os.getpid()}-{next(_names)}"
        self.disk = workdir / "src.qcow2"
        self.qmp = workdir / "qmp2.sock" if extra_qmp else None
        _make_disk(self.disk)
        self.conn = libvirt.open(libvirtd.uri)
        t = time.monotonic()     # a fresh daemon probes QEMU at the first define
        self.dom = self.conn.defineXML(_domain_xml(self.name, self.disk, self.qmp))
        self.dom.create()
        if libvirtd.first_start_s is None:
            libvirtd.first_start_s = round(time.monotonic() - t, 2)

    def destroy(self) -> None:
        if self.dom.isActive():
            self.dom.destroy()

    def close(self) -> None:
        self.destroy()
        self.dom.undefine()
        self.conn.close()


@pytest.fixture
def guest(libvirtd, tmp_path):
    g = Guest(libvirtd, tmp_path)
    yield g
    g.close()


def _monitor_log(libvirtd: PrivateLibvirtd, command: str) -> list[str]:
    """The QMP commands ``command`` libvirtd sent, from its debug log."""
    return [line for line in libvirtd.log.read_text(errors="replace").splitlines()
            if f'"execute":"{command}"' in line and "QEMU_MONITOR_SEND_MSG" in line]


def _disk_source(xml: str) -> str:
    m = re.search(r"<disk type='file' device='disk'>.*?<source file='([^']+)'", xml, re.S)
    assert m, xml
    return m.group(1)


# -- (c) refusals: the pure builder, then on a domain --------------------------

@pytest.mark.parametrize("option, value, why", [
    ("filter_node_name", "f", "libvirt cannot pass it"),
    ("filter-node-name", "f", "libvirt cannot pass it"),
    ("target_is_zero", True, "libvirt cannot pass it"),
    ("on_target_error", "stop", "libvirt cannot pass 'stop'"),
    ("on-source-error", "ignore", "libvirt cannot pass 'ignore'"),
    ("sync", "none", "libvirt cannot pass sync='none'"),
    ("sync", "incremental", "libvirt cannot pass sync='incremental'"),
])
def test_refused_before_anything_starts(option, value, why):
    with pytest.raises(ArgumentError, match=re.escape(why)) as info:
        block_copy_arguments("/tmp/x.qcow2", **{option: value})
    assert info.value.argument == option.replace("_", "-")


def test_arguments_libvirt_can_pass():
    xml, params, flags = block_copy_arguments(
        "/tmp/x.qcow2", granularity="4K", buf_size="1M", bandwidth="16M",
        copy_mode="write-blocking", sync="top", reuse_ext=True, on_target_error="report")
    assert params == {"granularity": 4096, "buf-size": MiB, "bandwidth": 16 * MiB}
    assert flags == (libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
                     | libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW
                     | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
                     | libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES)
    assert params.keys() <= {libvirt.VIR_DOMAIN_BLOCK_COPY_GRANULARITY,
                             libvirt.VIR_DOMAIN_BLOCK_COPY_BUF_SIZE,
                             libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH}
    assert "source file=\"/tmp/x.qcow2\"" in xml and "type='qcow2'" in xml
    with pytest.raises(ArgumentError, match="power of 2"):
        block_copy_arguments("/tmp/x", granularity=3000)
    with pytest.raises(ArgumentError, match="absolute"):
        block_copy_arguments("x.qcow2")


async def test_refusal_on_a_domain_starts_nothing(libvirtd, guest, tmp_path):
    async with await LibvirtDomain.open(libvirtd.uri, guest.name) as dom:
        with pytest.raises(ArgumentError, match="filter-node-name"):
            await dom.block_copy("vda", str(tmp_path / "dst.qcow2"), filter_node_name="f")
        assert await dom.job_info("vda") is None
        assert not (tmp_path / "dst.qcow2").exists()
        with pytest.raises(ArgumentError, match="read-only"):
            await dom.monitor("blockdev-del", {"node-name": "libvirt-1-format"})


# -- (a) mirror to READY, recorded, then pivot ---------------------------------

async def test_mirror_ready_recorded_then_pivot(libvirtd, guest, tmp_path):
    dst = tmp_path / "dst.qcow2"
    async with await LibvirtDomain.open(libvirtd.uri, guest.name) as dom:
        before = await dom.disks()
        assert [(d.target, d.source, d.format) for d in before] == \
            [("vda", str(guest.disk), "qcow2")]
        old_node = before[0].node_name
        assert old_node and re.fullmatch(r"libvirt-\d+-format", old_node)
        async with LibvirtSampler(dom, "vda", hz=20) as rec:
            sent = await dom.block_copy("vda", str(dst), granularity="4K", buf_size="1M",
                                        bandwidth="16M")
            assert sent["params"] == {"granularity": 4096, "buf-size": MiB,
                                      "bandwidth": 16 * MiB}
            # what reached QEMU: the job's speed and its bitmap's granularity
            jobs = await dom.monitor("query-block-jobs")
            assert jobs[0]["device"] == f"copy-vda-{old_node}"
            assert jobs[0]["speed"] == 16 * MiB
            await dom.set_speed("vda", "12M")
            assert (await dom.monitor("query-block-jobs"))[0]["speed"] == 12 * MiB
            assert (await dom.job_info("vda"))["bandwidth"] == 12 * MiB
            nodes = await dom.monitor("query-named-block-nodes", {"flat": True})
            # the job's bitmap: on the source node (QEMU <= 8.1), or on the mirror
            # filter above it (8.2 and later)
            bitmaps = [b for n in nodes if n["node-name"] == old_node
                       or n.get("drv") == "mirror_top"
                       for b in n.get("dirty-bitmaps", []) if "name" not in b]
            assert [b["granularity"] for b in bitmaps] == [4096]
            await dom.wait_ready("vda", timeout=90)
            await asyncio.sleep(0.2)
        trace = rec.trace(meta={"disk_bytes": DISK})
        # buf-size is not in query-block-jobs (7.2): libvirt's log shows what it sent
        sent_qmp = _monitor_log(libvirtd, "blockdev-mirror")
        assert sent_qmp and '"buf-size":1048576' in sent_qmp[-1] \
            and '"granularity":4096' in sent_qmp[-1], sent_qmp

        await dom.complete("vda")
        await dom.wait_ended("vda", timeout=30)
        xml = await dom.xml()
        assert _disk_source(xml) == str(dst)
        after = await dom.disks()
        assert after[0].source == str(dst) and after[0].node_name != old_node
        assert any(e["status"] == "completed" for e in dom.job_events("vda"))

    s = trace.samples
    assert trace.meta["backend"] == "libvirt" and trace.meta["passthrough"] is True
    assert trace.meta["libvirt_version"].count(".") == 2
    assert trace.ready_time() is not None
    dirty = [x.dirty_bytes for x in s if x.dirty_bytes is not None]
    assert len(s) >= 5 and len(dirty) >= 5, s
    assert max(dirty) > 0 and dirty[-1] < max(dirty)            # the dirty bytes moved
    assert s[-1].current_progress > s[0].current_progress         # and the progress
    assert s[-1].status == "ready"
    rate_hz = len(s) / (s[-1].t_s - s[0].t_s)
    print(f"\npassthrough: {len(s)} samples at {rate_hz:.1f}/s (asked 20)")
    trace.save(tmp_path / "trace")

    guest.destroy()
    out = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                          str(guest.disk), str(dst)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# -- (b) cancel: the XML keeps the old file ------------------------------------

async def test_cancel_keeps_the_source(libvirtd, guest, tmp_path):
    dst = tmp_path / "dst.qcow2"
    async with await LibvirtDomain.open(libvirtd.uri, guest.name) as dom:
        await dom.block_copy("vda", str(dst), copy_mode="write-blocking", bandwidth="64M")
        await dom.wait_ready("vda", timeout=90)
        await dom.cancel("vda")
        await dom.wait_ended("vda", timeout=30)
        assert _disk_source(await dom.xml()) == str(guest.disk)
        assert (await dom.disks())[0].source == str(guest.disk)
        assert any(e["status"] == "cancelled" for e in dom.job_events("vda"))
    assert '"copy-mode":"write-blocking"' in _monitor_log(libvirtd, "blockdev-mirror")[-1]


# -- (d) no passthrough: progress without the custom-monitor taint -------------

async def test_no_passthrough_records_without_taint(libvirtd, guest, tmp_path):
    async with await LibvirtDomain.open(libvirtd.uri, guest.name) as dom:
        assert not any("custom monitor" in t for t in await dom.taints())
        async with LibvirtSampler(dom, "vda", hz=200, passthrough=False) as rec:
            await dom.block_copy("vda", str(tmp_path / "dst.qcow2"), bandwidth="8M")
            await dom.wait_ready("vda", timeout=90)
        # a short burst at full speed: what each mode can sample
        fast = {}
        for mode in (False, True):
            probe = LibvirtSampler(dom, "vda", hz=1000, passthrough=mode)
            t = time.monotonic()
            async with probe:
                await asyncio.sleep(1.0)
            fast[mode] = len(probe.samples) / (time.monotonic() - t)
            if not mode:
                assert not any("custom monitor" in t for t in await dom.taints())
        taints = await dom.taints()
        await dom.cancel("vda")
        await dom.wait_ended("vda", timeout=30)
    trace = rec.trace()
    s = trace.samples
    assert trace.meta["passthrough"] is False
    assert all(x.dirty_bytes is None for x in s)
    assert len(s) >= 5 and s[-1].current_progress > s[0].current_progress
    assert s[-1].status == "ready" and trace.ready_time() is not None
    # libvirt's cur = end - 1 until READY
    assert all(x.remaining_bytes >= 1 for x in s if x.t_s < trace.ready_time() - 0.05)
    print(f"\nmax samples/s: no-passthrough {fast[False]:.0f}, passthrough {fast[True]:.0f}")
    # the passthrough probe taints the domain (the first query of a domain run does)
    assert any("custom monitor" in t for t in taints), taints


# -- (e) who manages a QEMU -----------------------------------------------------

async def test_managed_by_libvirt_over_a_second_qmp_socket(libvirtd, tmp_path, monkeypatch):
    g = Guest(libvirtd, tmp_path, extra_qmp=True)
    try:
        deadline = time.monotonic() + 10
        while not g.qmp.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        client = await Client.attach(str(g.qmp))
        try:
            reason = await managed_by_libvirt(client)
            # over TCP there is no peer PID: QMP alone must tell
            monkeypatch.setattr(qmpkit.libvirt, "_peer_pid", lambda _client: None)
            remote = await managed_by_libvirt(client)
        finally:
            await client.close()
        assert reason and f"guest={g.name}" in reason, reason
        assert remote and "charmonitor" in remote, remote
    finally:
        g.close()


async def test_managed_by_libvirt_says_none_for_qmpkits_daemon(qemu):
    assert await managed_by_libvirt(qemu) is None
    assert await managed_by_libvirt(qemu.client) is None


async def test_the_command_line_through_libvirt(libvirtd, guest, tmp_path):
    """`qmpkit mirror --libvirt`: READY, pivot, libvirt's XML names the new file,
    the trace says which backend and mode ran; `nodes` and `jobs` see the domain."""
    from helpers import run_cli
    where = ["--libvirt", libvirtd.uri, "--domain", guest.name]
    code, out, err = await run_cli("nodes", *where)
    assert code == 0, err
    assert "vda" in out and str(guest.disk) in out and "libvirt-" in out
    dest = tmp_path / "new.qcow2"
    code, out, err = await run_cli("mirror", *where, "--disk", "vda", "--target-file", str(dest),
                                   "--granularity", "64K", "--buf-size", "1M", "--speed", "64M",
                                   "--out", str(tmp_path / "rec"), timeout=180)
    assert code == 0, out + err
    assert "READY: vda is in sync" in out
    assert f"completed: vda now writes to {dest} (libvirt's XML agrees)" in out
    assert _disk_source(guest.dom.XMLDesc()) == str(dest)
    tr = Trace.load(tmp_path / "rec")
    assert tr.meta["backend"] == "libvirt" and tr.meta["passthrough"] is True
    assert tr.samples and tr.ready_time() is not None
    code, out, err = await run_cli("jobs", *where)
    assert code == 0 and "(no block jobs)" in out
    # refused before anything starts, with the reason
    code, out, err = await run_cli("mirror", *where, "--disk", "vda", "--target-file",
                                   str(tmp_path / "x.qcow2"), "--filter-node-name", "f")
    assert code == 2 and "--filter-node-name: libvirt cannot pass it" in err
    assert not (tmp_path / "x.qcow2").exists()
    code, out, err = await run_cli("job", "pause", *where, "vda")
    assert code == 2 and "libvirt has no block-job pause" in err


async def test_state_changes_over_qmp_behind_libvirts_back_are_refused(libvirtd, tmp_path):
    from helpers import run_cli
    g = Guest(libvirtd, tmp_path, extra_qmp=True)
    try:
        deadline = time.monotonic() + 10
        while not g.qmp.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        code, out, err = await run_cli("mirror", "--qmp", str(g.qmp), "--device", "vda",
                                       "--target-file", str(tmp_path / "t.qcow2"), "--create")
        assert code == 2, out + err
        assert "managed by libvirt" in err and "--libvirt URI --domain NAME" in err
        assert not (tmp_path / "t.qcow2").exists()
        assert "<source file='" + str(g.disk) in g.dom.XMLDesc()
        code, out, err = await run_cli("job", "cancel", "--qmp", str(g.qmp), "nojob")
        assert code == 2 and "managed by libvirt" in err
        # reading is allowed
        code, out, err = await run_cli("jobs", "--qmp", str(g.qmp))
        assert code == 0, err
    finally:
        g.close()
