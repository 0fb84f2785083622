"""Shared test fixtures: the repo on sys.path, a small built-in dataset, a tiny config."""
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data.shapes.prepare as shapes  # noqa: E402


# torchrun on loopback only: its rendezvous (--standalone: a free port), the workers' store
# (--local_addr) and gloo's connections (GLOO_SOCKET_IFNAME) all on 127.0.0.1
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--local_addr=127.0.0.1']
LOOPBACK = dict(os.environ, GLOO_SOCKET_IFNAME='lo')
TEARDOWN_ABORT = 'terminate called without an active exception'


def run_script(script, args, nproc=1, check=True):
    """python script args, or torchrun with nproc processes (gloo on the CPU), in the repo root."""
    launcher = TORCHRUN + [f'--nproc_per_node={nproc}'] if nproc > 1 else [sys.executable]
    cmd = launcher + [script] + args
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=LOOPBACK)
    if nproc > 1 and result.returncode and TEARDOWN_ABORT in result.stderr:
        # a gloo worker can abort in its C++ teardown after its work is done (rarely, seen under
        # load with torch 2.13): the whole run once more, so the test still checks its claim
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=LOOPBACK)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope='session')
def shapes_dir(tmp_path_factory):
    """A small built-in dataset (32 x 32), made once for the whole test session."""
    out = tmp_path_factory.mktemp('shapes')
    shapes.make_dataset(str(out), image_size=32, n_train=512, n_val=256, n_ood=64, seed=0)
    return str(out)


# -- resumable sampling: runs killed mid-way --------------------------------------------------

def finished_chunks(parts):
    """{chunk file: (inode, mtime, bytes, rank, world)} of the chunks written in parts."""
    chunks = {}
    for name in sorted(os.listdir(parts)) if os.path.isdir(parts) else []:
        if re.fullmatch(r'\d{6}\.npz', name):
            path = os.path.join(parts, name)
            with open(path, 'rb') as f, np.load(path) as chunk:
                chunks[name] = (os.stat(path).st_ino, os.stat(path).st_mtime_ns, f.read(),
                                int(chunk['rank']), int(chunk['world']))
    return chunks


def launch(script, args, log, nproc=1):
    """A run in its own session, so that stop_when can signal it; torchrun for nproc > 1."""
    launcher = TORCHRUN + [f'--nproc_per_node={nproc}'] if nproc > 1 else [sys.executable]
    with open(log, 'w') as f:
        run = subprocess.Popen(launcher + [script] + args, cwd=ROOT, start_new_session=True,
                               stdout=f, stderr=subprocess.STDOUT,
                               env=dict(LOOPBACK, OMP_NUM_THREADS='1'))
    run.log = log
    return run


def stop_when(run, parts, condition, sig, timeout=300):
    """Send sig to the run once condition(finished chunks) holds; the chunks it left."""
    deadline, log = time.time() + timeout, lambda: open(run.log).read()[-3000:]
    try:
        while not condition(finished_chunks(parts)):
            assert run.poll() is None, f'the run ended before it was stopped:\n{log()}'
            assert time.time() < deadline, f'the run made no progress:\n{log()}'
            time.sleep(0.01)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, sig)     # torchrun passes SIGTERM on to its workers, as SLURM's
        run.wait()
    return finished_chunks(parts)


def kill_then_continue_on_two(script, args, parts, n_chunks, tmp_path):
    """A sampling run of n_chunks chunks in parts: one process, SIGKILLed after a random number
    of chunks (mid-run, checked), then two processes, stopped once both have drawn chunks (before
    the end, checked). Nothing done is drawn again; what is new records world 2. The chunks left."""
    k = random.randint(1, n_chunks // 2)
    one = launch(script, args, tmp_path / 'one.log')
    before = stop_when(one, parts, lambda c: len(c) >= k, signal.SIGKILL)
    assert k <= len(before) < n_chunks, (k, len(before))            # the kill landed mid-run
    new = lambda c: [v for name, v in c.items() if name not in before]
    both_drew = lambda c: {v[3] for v in new(c)} == {0, 1}
    two = launch(script, args, tmp_path / 'two.log', nproc=2)
    during = stop_when(two, parts, both_drew, signal.SIGTERM)
    assert len(during) < n_chunks, 'the two processes finished before they could be stopped'
    assert all(during[name] == v for name, v in before.items())     # nothing done is redrawn
    assert all(v[4] == 2 for v in new(during))
    return during


def assert_two_runs_bitwise_equal(train, cfgs, ckpt_name):
    """train(cfg) for each of two configs (the same but their out_dir) with 2 threads, the way
    a CPU run sums in parallel; their checkpoints' model and EMA weights must be bitwise equal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for cfg in cfgs:
            train(cfg)
    finally:
        torch.set_num_threads(threads)
    a, b = (torch.load(os.path.join(c['out_dir'], ckpt_name), weights_only=True) for c in cfgs)
    for part in ('model', 'ema'):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
