"""Claims about configurator.py: config files and --key=value override a flat config block,
and a typo or a wrong type is an error instead of a silently different run."""
import glob
import importlib
import os

import pytest

from conftest import ROOT
from configurator import configure

DEFAULTS = dict(lr=1e-4, batch_size=256, out_dir='out', compile=False, crop_scale=(0.32, 1.0))


def test_file_then_overrides_apply_in_order(tmp_path):
    path = tmp_path / 'cfg.py'
    path.write_text("import math\nbatch_size = 64\nlr = 3e-4\n")
    cfg = configure(DEFAULTS, [str(path), '--lr=1e-3', '--out_dir=runs/a', '--compile=True',
                               '--crop_scale=(0.6, 1.0)'])
    assert cfg == dict(lr=1e-3, batch_size=64, out_dir='runs/a', compile=True,
                       crop_scale=(0.6, 1.0))
    assert DEFAULTS['lr'] == 1e-4   # the defaults are not modified


def test_an_int_may_stand_for_a_float():
    assert configure(DEFAULTS, ['--lr=1'])['lr'] == 1.0


@pytest.mark.parametrize('argv, error, message', [
    (['--learning_rat=1e-3'], ValueError, "unknown config key 'learning_rat'"),
    (['--batch_size=64.5'], (TypeError, ValueError), "'batch_size' expects int"),
    (['--compile=1'], TypeError, "'compile' expects bool"),
    (['--lr'], ValueError, 'must look like --key=value'),
    (['missing_config.py'], FileNotFoundError, 'missing_config.py'),
])
def test_typos_and_wrong_types_are_errors(argv, error, message):
    with pytest.raises(error, match=message):
        configure(DEFAULTS, argv)


def test_an_unknown_key_in_a_config_file_names_the_file(tmp_path):
    path = tmp_path / 'bad.py'
    path.write_text("batch_sise = 64\n")
    with pytest.raises(ValueError, match=f"{path}.*batch_sise"):
        configure(DEFAULTS, [str(path)])


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'config', '*.py'))))
def test_every_config_file_sets_only_keys_its_script_has(path):
    script = os.path.basename(path).split('_')[0]                  # config/<script>_<name>.py
    module = importlib.import_module(script)
    cfg = configure(module.CONFIG, [path])
    assert cfg.keys() == module.CONFIG.keys()


@pytest.mark.parametrize('text', ['3,17', '207,360', '42', '1e-3', 'True', '(1, 2)'])
def test_a_string_key_keeps_the_text_as_written(text):
    # --sources=3,17 and --labels=207,360 are the documented forms; a prompt may be a number
    assert configure(DEFAULTS, [f'--out_dir={text}'])['out_dir'] == text
    assert configure(DEFAULTS, [f'--out_dir={text!r}'])['out_dir'] == text    # quoted: the same
