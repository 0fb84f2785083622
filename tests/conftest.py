"""Shared test fixtures: the repo on sys.path, a small built-in dataset, a tiny config."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data.shapes.prepare as shapes  # noqa: E402


@pytest.fixture(scope='session')
def shapes_dir(tmp_path_factory):
    """A small built-in dataset (32 x 32), made once for the whole test session."""
    out = tmp_path_factory.mktemp('shapes')
    shapes.make_dataset(str(out), image_size=32, n_train=512, n_val=256, n_ood=64, seed=0)
    return str(out)
