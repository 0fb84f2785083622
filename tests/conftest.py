"""Shared test fixtures: the repo on sys.path, a small built-in dataset, a tiny config."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data.shapes.prepare as shapes  # noqa: E402


def run_script(script, args, nproc=1, check=True):
    """python script args, or torchrun with nproc processes (gloo on the CPU), in the repo root."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    cmd = launcher + [script] + args
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope='session')
def shapes_dir(tmp_path_factory):
    """A small built-in dataset (32 x 32), made once for the whole test session."""
    out = tmp_path_factory.mktemp('shapes')
    shapes.make_dataset(str(out), image_size=32, n_train=512, n_val=256, n_ood=64, seed=0)
    return str(out)
