#!/usr/bin/env python3
"""qemu's own Python QMP clients (qemu.qmp) drive live jobs on layerd.

    qmp_python_live.py LAYERD WORKDIR

Makes base <- top (8 MiB) in WORKDIR, starts
`LAYERD -t -f qcow2 -x disk -k nbd.sock --qmp qmp.sock top.qcow2`, then:

- with the synchronous client (qemu.qmp.legacy.QEMUMonitorProtocol, what
  qemu-iotests use): query-block, blockdev-snapshot-sync, a rate-limited
  block-stream followed by its events (pull_event) to BLOCK_JOB_COMPLETED
  and the job's end, and a refused command;
- with the asyncio client (qemu.qmp.QMPClient, what qmp-shell and newer
  tools use): an active block-commit, waiting on an event listener for
  BLOCK_JOB_READY, block-job-complete, BLOCK_JOB_COMPLETED, and an
  ExecuteError with QEMU's error class.

Then layerd is stopped and qemu-img checks the files: the chain is
base alone (the pivot), clean, with the guest's data. Exits 0 when every
check held; otherwise prints what did not (and layerd's log) and exits 1.
Run by server_qmp_test (QemusPythonClient.RunsLiveJobsOnLayerd) with
PYTHONPATH pointing at qemu's python/ directory.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

LAYERD, WORK = sys.argv[1], sys.argv[2]
MiB = 1 << 20


def path(name):
    return os.path.join(WORK, name)


def run(*argv):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, check=False)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r.stdout


def chain_of(block):
    """The files of a query-block entry's chain, top first."""
    files, image = [], block['inserted']['image']
    while image:
        files.append(image['filename'])
        image = image.get('backing-image')
    return files


def wait_for_socket(sock_path, server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"layerd exited with {server.returncode}")
        if os.path.exists(sock_path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(sock_path)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    raise AssertionError(f"{sock_path}: layerd does not listen")


def legacy_client_snapshot_and_stream():
    q = QEMUMonitorProtocol(path('qmp.sock'))
    greeting = q.connect(negotiate=True)
    assert greeting['QMP']['version']['package'].startswith('layerd '), greeting

    blocks = q.command('query-block')
    assert [b['device'] for b in blocks] == ['disk'], blocks
    assert chain_of(blocks[0]) == [path('top.qcow2'), path('base.qcow2')], blocks

    # An external snapshot: sn1 <- top <- base, sn1 active.
    r = q.cmd('blockdev-snapshot-sync',
              {'device': 'disk', 'snapshot-file': path('sn1.qcow2'), 'format': 'qcow2'})
    assert r.get('return') == {}, r
    blocks = q.command('query-block')
    assert chain_of(blocks[0]) == [path('sn1.qcow2'), path('top.qcow2'),
                                   path('base.qcow2')], blocks
    q.clear_events()

    # Stream top into sn1, keeping base: 1 MiB to copy at 2 MiB/s.
    r = q.cmd('block-stream', {'device': 'disk', 'base': path('base.qcow2'),
                               'speed': 2 * MiB})
    assert r.get('return') == {}, r
    jobs = q.command('query-block-jobs')
    assert len(jobs) == 1 and jobs[0]['device'] == 'disk', jobs
    assert jobs[0]['type'] == 'stream' and jobs[0]['speed'] == 2 * MiB, jobs

    # The job's events, to its end (status "null" after BLOCK_JOB_COMPLETED).
    events, completed = [], None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ev = q.pull_event(wait=max(0.1, deadline - time.monotonic()))
        if ev is None:
            break
        assert 'seconds' in ev['timestamp'] and 'microseconds' in ev['timestamp'], ev
        events.append(ev)
        if ev['event'] == 'BLOCK_JOB_COMPLETED':
            completed = ev
        if ev['event'] == 'JOB_STATUS_CHANGE' and ev['data']['status'] == 'null':
            break
    assert completed is not None, events
    data = completed['data']
    assert data['device'] == 'disk' and data['type'] == 'stream', completed
    assert 'error' not in data and data['offset'] == data['len'], completed
    assert data['speed'] == 2 * MiB, completed
    statuses = [e['data']['status'] for e in events if e['event'] == 'JOB_STATUS_CHANGE']
    assert statuses == ['created', 'running', 'waiting', 'pending', 'concluded', 'null'], \
        statuses
    assert all(e['data']['id'] == 'disk' for e in events
               if e['event'] == 'JOB_STATUS_CHANGE'), events

    assert q.command('query-block-jobs') == []
    blocks = q.command('query-block')
    assert chain_of(blocks[0]) == [path('sn1.qcow2'), path('base.qcow2')], blocks

    # A refusal keeps the connection usable.
    r = q.cmd('block-stream', {'device': 'nosuch'})
    assert r['error']['class'] == 'GenericError', r
    assert "Cannot find device='nosuch'" in r['error']['desc'], r
    assert q.command('query-block-jobs') == []
    q.close()


async def async_client_active_commit():
    qmp = QMPClient('layerd-test')
    await qmp.connect(path('qmp.sock'))
    names = ('BLOCK_JOB_READY', 'BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED',
             'BLOCK_JOB_ERROR')

    async def next_job_event():
        ev = await asyncio.wait_for(listener.get(), 60)
        assert ev['data']['device'] == 'disk', ev
        return ev

    with qmp.listener(names) as listener:
        # Active commit of sn1 into base, then the pivot to base.
        await qmp.execute('block-commit', {'device': 'disk', 'job-id': 'disk'})
        ev = await next_job_event()
        assert ev['event'] == 'BLOCK_JOB_READY', ev
        jobs = await qmp.execute('query-block-jobs')
        assert jobs[0]['ready'] and jobs[0]['status'] == 'ready', jobs
        await qmp.execute('block-job-complete', {'device': 'disk'})
        ev = await next_job_event()
        assert ev['event'] == 'BLOCK_JOB_COMPLETED', ev
        assert ev['data']['type'] == 'commit' and 'error' not in ev['data'], ev

    blocks = await qmp.execute('query-block')
    assert chain_of(blocks[0]) == [path('base.qcow2')], blocks
    exports = await qmp.execute('query-block-exports')
    assert [(e['id'], e['node-name']) for e in exports] == \
        [('disk', path('base.qcow2'))], exports
    try:
        await qmp.execute('block-job-pause', {'device': 'disk'})
        raise AssertionError('block-job-pause without a job was accepted')
    except ExecuteError as e:
        assert e.error_class == 'DeviceNotActive', e
    await qmp.disconnect()


def main():
    run('qemu-img', 'create', '-q', '-f', 'qcow2', path('base.qcow2'), '8M')
    run('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x11 0 4M', path('base.qcow2'))
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', path('base.qcow2'), '-F', 'qcow2',
        path('top.qcow2'))
    run('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x22 1M 1M', '-c', 'write -z 6M 1M',
        path('top.qcow2'))
    run('qemu-img', 'convert', '-O', 'raw', path('top.qcow2'), path('guest.raw'))

    with open(path('layerd.log'), 'w') as log:
        server = subprocess.Popen(
            [LAYERD, '-t', '-f', 'qcow2', '-x', 'disk', '-k', path('nbd.sock'),
             '--qmp', path('qmp.sock'), path('top.qcow2')],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_socket(path('qmp.sock'), server)
        legacy_client_snapshot_and_stream()
        asyncio.run(async_client_active_commit())
    except BaseException:
        server.kill()
        server.wait()
        sys.stderr.write('layerd log:\n' + open(path('layerd.log')).read())
        raise
    server.terminate()
    rc = server.wait(timeout=20)
    assert rc == 0, f"layerd exited with {rc}:\n{open(path('layerd.log')).read()}"

    # The files: base holds the guest's data alone; the others are clean.
    for image in ('base.qcow2', 'top.qcow2', 'sn1.qcow2'):
        run('qemu-img', 'check', '-q', path(image))
    run('qemu-img', 'compare', '-q', path('base.qcow2'), path('guest.raw'))
    info = json.loads(run('qemu-img', 'info', '--output=json', path('sn1.qcow2')))
    assert info['backing-filename'] == path('base.qcow2'), info
    print('ok')


if __name__ == '__main__':
    main()
