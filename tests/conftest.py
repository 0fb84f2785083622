"""Shared test fixtures: the repo on sys.path, a small built-in dataset, a tiny config."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data.shapes.prepare as shapes  # noqa: E402


# torchrun on loopback only: its rendezvous (--standalone: a free port), the workers' store
# (--local_addr) and gloo's connections (GLOO_SOCKET_IFNAME) all on 127.0.0.1
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--local_addr=127.0.0.1']
LOOPBACK = dict(os.environ, GLOO_SOCKET_IFNAME='lo')


def run_script(script, args, nproc=1, check=True):
    """python script args, or torchrun with nproc processes (gloo on the CPU), in the repo root."""
    launcher = TORCHRUN + [f'--nproc_per_node={nproc}'] if nproc > 1 else [sys.executable]
    cmd = launcher + [script] + args
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
