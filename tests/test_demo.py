"""Claims about `make demo` (data/shapes/demo.py): it runs every stage of the built-in pipeline
with the built-in configs, and ends with one table that gives every stage its wall time and
every floor its verdict, demo.json with the numbers, and one picture with a panel per part of
the method; --report_only=True draws them again from the folder alone."""
import json
import os
import sys
import time

import pytest
from PIL import Image

from conftest import run_script
from data.shapes import demo

STAGES = ['tokenizer', 'dit', 'prior', 'text', 'samples']


def test_the_default_stages_are_the_built_in_configs_at_full_length():
    commands = demo.stages(dict(demo.CONFIG))
    assert list(commands) == STAGES
    words = [w for stage in commands.values() for c in stage for w in c]
    assert not any(w.startswith(('--max_iters', '--data_dir', '--run_iters')) for w in words)
    assert [c[2] for c in commands['dit']] == ['config/diffusion_shapes.py'] * 2
    # the seen pairs' 14 short prompts, 20 images each
    assert '--n_samples=280' in commands['samples'][-1]


@pytest.fixture(scope='module')
def tiny_demo(shapes_dir, tmp_path_factory):
    """The whole driver on the small dataset: every script at a few iterations and a few images."""
    out = str(tmp_path_factory.mktemp('demo') / 'out')
    d = shapes_dir
    extra = {
        'tokenizer.py': f'--data_dir={d} --embed_dim=32 --depth=1 --num_heads=2 --L=4 --V=8 '
                        '--head_hidden_dim=32 --head_bottleneck_dim=16 --batch_size=32 '
                        '--max_iters=3 --warmup_iters=1 --log_interval=1 --probe_iters=20',
        'diffusion.py': f'--data_dir={d} --batch_size=16 --micro_batch_size=16 --max_iters=3 '
                        '--warmup_iters=1 --sample_interval=0 --ckpt_interval=3 --log_interval=1 '
                        '--num_sampling_steps=2 --n_recon=16',
        'prior.py': '--batch_size=16 --micro_batch_size=16 --max_iters=3 --warmup_iters=1 '
                    '--eval_interval=3 --n_eval=64 --log_interval=1 --ckpt_interval=3',
        'text2dlc.py': f'--data_dir={d} --captions_path={d}/{{split}}_captions_varied.txt '
                       '--batch_size=16 --micro_batch_size=16 --max_iters=3 --warmup_iters=1 '
                       '--eval_interval=0 --log_interval=1 --ckpt_interval=3',
        'sample.py': f'--data_dir={d} --n_samples=14 --batch_size=14 --dit_steps=2 '
                     '--prior_steps=4',
    }
    result = run_script('data/shapes/demo.py', [f'--out_dir={out}', f'--data_dir={d}',
                                                f'--extra={extra!r}'])
    return out, d, result.stdout


def table_of(stdout):
    return stdout[stdout.index('stage  '):]


def test_the_table_gives_every_stage_its_time_and_every_floor_its_verdict(tiny_demo):
    out, _, stdout = tiny_demo
    table = table_of(stdout)
    rows = table.splitlines()[2:-2]
    for stage in STAGES:                     # each stage named once, with a wall time
        row = next(r for r in rows if r.startswith(stage + ' '))
        assert ' min ' in row, row
    for op, floor in demo.FLOORS.values():
        assert f'{op} {floor}' in table
    assert len(rows) == len(demo.METRICS)
    assert table.splitlines()[-2].startswith('total wall time ')
    assert 'floors met: ' in table and f'of {len(demo.FLOORS)}' in table
    for stage in ['dit', 'prior', 'text']:   # the lanes: each stage's log, its last lines shown
        assert os.path.exists(f'{out}/logs/{stage}.log')
        assert f'== {stage} done in ' in stdout


def test_demo_json_holds_every_number_and_the_picture_every_panel(tiny_demo):
    out, _, _ = tiny_demo
    with open(f'{out}/demo.json') as f:
        res = json.load(f)
    assert set(res['seconds']) == set(STAGES) and res['config']['parallel'] is True
    assert res['total_seconds'] >= max(res['seconds'].values())
    for key, (op, floor) in demo.FLOORS.items():
        m = res['metrics'][key]
        assert isinstance(m['value'], float), key          # read from the stages' files
        assert m['floor'] == [op, floor] and m['met'] == demo.meets(m['value'], (op, floor))
    assert 'sample.py' in res['commands']['samples'][0]
    assert [t.split(' ')[0] for t in res['gallery']['panels']] == ['val', 'prior', 'source',
                                                                   'short']
    picture = Image.open(f'{out}/demo.png')
    assert picture.width < 1000 and picture.height > 4 * demo.TILE


def test_report_only_draws_the_same_report_from_the_folder_alone(tiny_demo, capsys):
    out, d, stdout = tiny_demo
    os.remove(f'{out}/demo.png')
    demo.main(dict(demo.CONFIG, out_dir=out, data_dir=d, report_only=True))
    assert table_of(capsys.readouterr().out) == table_of(stdout)
    assert os.path.exists(f'{out}/demo.png')


def test_a_stage_that_fails_stops_the_other_lane_and_names_its_log(tmp_path):
    python = lambda code: [sys.executable, '-c', code]
    commands = {'dit': [python('import time; time.sleep(60)')],
                'prior': [python('open("never", "w")')],
                'text': [python('import sys; print("bad codes"); sys.exit(3)')]}
    os.makedirs(tmp_path / 'logs')
    t0 = time.monotonic()
    with pytest.raises(SystemExit, match=r'stage text failed \(exit 3\).*\n.*logs/text.log'):
        demo.run_lanes(commands, str(tmp_path))
    assert time.monotonic() - t0 < 30                      # the DiT's lane did not run on
    assert 'bad codes' in (tmp_path / 'logs' / 'text.log').read_text()
    assert not os.path.exists(os.path.join(demo.ROOT, 'never'))
