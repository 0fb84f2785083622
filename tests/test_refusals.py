"""Claims about bad input and runs that do not belong together: each is refused with one line,
`error: ...`, naming the key or file, exit status 2, no traceback, and the folder the run would
write to unchanged. A deliberate mix goes through with --allow_mix=True; artifacts written before
runs had ids still load, with a note; --help works on every script."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import data.shapes.prepare as shapes
import diffusion as D
import prior as P
import sample as S
import text2dlc as X
import tokenizer as T
from codes import read_identity, write_identity
from conftest import ROOT, run_script
from configurator import command_line
from data.shapes import demo
from data.shapes import score as SC
from images import load_image

SCRIPTS = ['tokenizer.py', 'diffusion.py', 'prior.py', 'text2dlc.py', 'sample.py', 'eval_fid.py',
           'bench.py', 'data/shapes/prepare.py', 'data/shapes/score.py', 'data/shapes/results.py',
           'data/shapes/demo.py']
MODULES = {'tokenizer': T, 'diffusion': D, 'prior': P, 'text2dlc': X, 'sample': S, 'score': SC,
           'prepare': shapes, 'demo': demo}


@pytest.fixture(scope='module')
def runs(shapes_dir, tmp_path_factory):
    """Tokenizer run A (dumps of the built-in data, and of another dataset with the same split
    sizes), run B (A's weights under another run id, its own dumps), and a DiT, a prior and a text
    model trained on A's codes, with the prior's samples and the text model's codes."""
    root = tmp_path_factory.mktemp('runs')
    other_data = str(root / 'other_data')
    shapes.make_dataset(other_data, image_size=32, n_train=512, n_val=256, n_ood=64, seed=1)
    tok = dict(T.CONFIG, data_dir=shapes_dir, out_dir=str(root / 'tok_a'), device='cpu',
               patch_size=8, embed_dim=32, depth=1, num_heads=2, image_size=32, L=4, V=8,
               ssl_loss='infonce', n_local_crops=0, layerscale_init=1.0, head_hidden_dim=32,
               head_bottleneck_dim=16, batch_size=32, max_iters=2, warmup_iters=1,
               color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0, 0.0),
               solarize_prob=(0.0, 0.0, 0.0), log_interval=1, dump_split='train,val')
    T.train(tok)
    T.dump(tok)
    os.makedirs(root / 'tok_a_other_data')
    shutil.copy(root / 'tok_a' / 'tokenizer.pt', root / 'tok_a_other_data' / 'tokenizer.pt')
    T.dump(dict(tok, data_dir=other_data, out_dir=str(root / 'tok_a_other_data')))
    os.makedirs(root / 'tok_b')
    ckpt = torch.load(root / 'tok_a' / 'tokenizer.pt', weights_only=True)
    torch.save(dict(ckpt, run_id='bbbbbbbbbbbb'), root / 'tok_b' / 'tokenizer.pt')
    T.dump(dict(tok, out_dir=str(root / 'tok_b')))
    D.train(dict(D.CONFIG, data_dir=shapes_dir, codes_dir=tok['out_dir'], out_dir=str(root / 'dit'),
                 device='cpu', model='DiT-Ti/8', image_size=32, objective='flow',
                 flow_output='x0', batch_size=16, micro_batch_size=16, max_iters=2,
                 sample_interval=0, log_interval=1, ckpt_interval=2, sampler='euler',
                 num_sampling_steps=2, n_recon=4))
    prior = dict(P.CONFIG, codes_dir=tok['out_dir'], out_dir=str(root / 'prior'), device='cpu',
                 model='tiny', batch_size=16, micro_batch_size=16, max_iters=2, warmup_iters=1,
                 eval_interval=0, log_interval=1, ckpt_interval=2, n_samples=4,
                 sample_batch_size=4, num_steps=2)
    P.train(prior)
    P.sample_mode(prior)
    text = dict(X.CONFIG, codes_dir=tok['out_dir'], data_dir=shapes_dir, device='cpu',
                out_dir=str(root / 'text'), text_encoding='words',
                captions_path=os.path.join(shapes_dir, '{split}_captions.txt'), caption_len=16,
                model='tiny', batch_size=16, micro_batch_size=16, max_iters=2, warmup_iters=1,
                eval_interval=0, log_interval=1, ckpt_interval=2, prompts='a red square',
                sample_batch_size=4)
    X.train(text)
    X.sample_mode(text)
    return dict(root=root, shapes=shapes_dir, other_data=other_data, **{
        k: str(root / k) for k in ('tok_a', 'tok_b', 'tok_a_other_data', 'dit', 'prior', 'text')})


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    found = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def run(script, argv, capfd):
    """script's command line in this process: (exit status, stdout, stderr)."""
    module = MODULES[os.path.basename(script)[:-3]]
    try:
        command_line(module.CONFIG, argv, module.main, module.__file__)
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capfd.readouterr()
    return status, out, err


def assert_refused(script, argv, capfd, folder, *named):
    """The run ends with status 2 and one line 'error: ...' holding each of named, no traceback,
    and folder (where the run would write) byte-for-byte as before."""
    before = snapshot(folder)
    status, out, err = run(script, argv, capfd)
    lines = err.strip().splitlines()        # progress bars before it may share stderr
    assert status == 2, (status, out[-2000:], err[-2000:])
    assert lines[-1].startswith('error: ') and 'error' not in ''.join(lines[:-1]), err
    assert 'Traceback' not in out + err
    for name in named:
        assert name in lines[-1], (name, lines[-1])
    assert snapshot(folder) == before
    return lines[-1]


# -- --help -----------------------------------------------------------------------------------

@pytest.mark.parametrize('script', SCRIPTS)
def test_help_gives_the_purpose_the_modes_and_every_config_key(script):
    result = run_script(script, ['--help'])
    assert result.returncode == 0 and 'Traceback' not in result.stderr
    text = result.stdout
    module = MODULES.get(os.path.basename(script)[:-3])
    if module is not None:
        assert 'config keys' in text
        for key, value in module.CONFIG.items():
            assert f"--{key}={value!r}" in text, key
    if script in ('prior.py', 'diffusion.py'):
        assert '--mode=sample' in text or '--mode=recon' in text
        assert "'train' |" in text                  # the comment of the mode key


def test_the_help_list_holds_every_script_of_the_repository():
    scripts = [os.path.relpath(os.path.join(folder, name), ROOT)
               for folder in (ROOT, os.path.join(ROOT, 'data', 'shapes'))
               for name in sorted(os.listdir(folder)) if name.endswith('.py')
               and "if __name__ == '__main__':" in open(os.path.join(folder, name)).read()]
    assert sorted(scripts) == sorted(SCRIPTS)


# -- runs that do not belong together ---------------------------------------------------------

def with_identity(runs, path, identity):
    """A copy of sampled codes whose .json records another tokenizer run."""
    copy = runs['root'] / 'relabelled' / os.path.basename(path)
    os.makedirs(copy.parent, exist_ok=True)
    shutil.copy(path, copy)
    write_identity(str(copy), identity, 'a model of another tokenizer')
    return str(copy)


def test_codes_of_another_tokenizer_are_refused_by_every_consumer(runs, capfd):
    a, b, dit = runs['tok_a'], runs['tok_b'], runs['dit']
    other = 'bbbbbbbbbbbb@2'
    # the DiT's reconstructions and decoding of another run's dump
    assert_refused('diffusion.py', [f'--out_dir={dit}', f'--codes_dir={b}', '--mode=recon',
                                    f"--data_dir={runs['shapes']}", '--device=cpu'],
                   capfd, dit, f'{b}/codes.json', f'{dit}/diffusion.pt', other, '--allow_mix')
    assert_refused('diffusion.py', [f'--out_dir={dit}', '--mode=decode', '--device=cpu',
                                    f'--codes_path={b}/codes_val.npy'],
                   capfd, dit, f'{b}/codes.json', 'diffusion.pt')
    # a prior's samples and a text model's codes, recorded as of another run
    for name in ('prior/samples.npy', 'text/text_codes.npy'):
        codes = with_identity(runs, str(runs['root'] / name), other)
        assert_refused('diffusion.py', [f'--out_dir={dit}', '--mode=decode', '--device=cpu',
                                        f'--codes_path={codes}'],
                       capfd, dit, codes[:-4] + '.json', 'diffusion.pt')
    # the prior's and the text model's sampling, pointed at another run's dumps
    assert_refused('prior.py', [f"--out_dir={runs['prior']}", f'--codes_dir={b}', '--mode=sample',
                                '--device=cpu'], capfd, runs['prior'], f'{b}/codes.json', 'prior.pt')
    assert_refused('text2dlc.py', [f"--out_dir={runs['text']}", f'--codes_dir={b}', '--mode=sample',
                                   '--device=cpu', '--prompts=a red square'],
                   capfd, runs['text'], f'{b}/codes.json', 'text2dlc.pt')
    # score.py: samples read by another run's probe
    assert_refused('data/shapes/score.py', [f"--samples={runs['prior']}/samples.npy",
                                            f'--codes_dir={b}', f"--data_dir={runs['shapes']}"],
                   capfd, b, 'samples.json', f'{b}/codes.json')


def test_sample_py_refuses_a_tokenizer_prior_or_text_model_of_other_codes_than_the_dits(runs,
                                                                                         capfd,
                                                                                         tmp_path):
    out = tmp_path / 'samples'
    base = [f"--diffusion_dir={runs['dit']}", f"--tokenizer_dir={runs['tok_a']}",
            f"--prior_dir={runs['prior']}", f"--text2dlc_dir={runs['text']}",
            f"--data_dir={runs['shapes']}", f'--out_dir={out}', '--device=cpu', '--n_samples=2',
            '--dit_sampler=euler', '--dit_steps=2', '--prior_steps=2', '--batch_size=2',
            "--prompts=a red square"]
    assert_refused('sample.py', base + ['--mode=recon', f"--tokenizer_dir={runs['tok_b']}"],
                   capfd, tmp_path, f"{runs['tok_b']}/tokenizer.pt", 'diffusion.pt')
    for what, name in (('prior', 'prior.pt'), ('text2dlc', 'text2dlc.pt')):
        ckpt = torch.load(os.path.join(runs[what if what == 'prior' else 'text'], name),
                          weights_only=True)
        os.makedirs(tmp_path / what)
        torch.save(dict(ckpt, codes_id='bbbbbbbbbbbb@2'), tmp_path / what / name)
        mode = 'uncond' if what == 'prior' else 'text'
        assert_refused('sample.py', base + [f'--mode={mode}', f'--{what}_dir={tmp_path / what}'],
                       capfd, tmp_path / 'samples', f'{tmp_path / what}/{name}', 'diffusion.pt')


def test_a_dump_of_another_dataset_with_the_same_split_sizes_is_refused(runs, capfd):
    codes, dit = runs['tok_a_other_data'], runs['dit']
    line = assert_refused('diffusion.py', [f'--out_dir={dit}', f'--codes_dir={codes}',
                                           '--mode=recon', f"--data_dir={runs['shapes']}",
                                           '--device=cpu'],
                          capfd, dit, f'{codes}/codes_val.npy', runs['shapes'], '--data_dir')
    assert 'encodes other images' in line
    assert_refused('data/shapes/score.py', [f'--codes_dir={codes}', f"--data_dir={runs['shapes']}"],
                   capfd, codes, f'{codes}/codes_train.npy')


def test_allow_mix_uses_another_runs_codes_deliberately(runs, capfd, tmp_path):
    codes, dit = tmp_path / 'codes_val.npy', tmp_path / 'dit'
    np.save(codes, np.load(os.path.join(runs['tok_b'], 'codes_val.npy'))[:2])
    write_identity(str(codes), 'bbbbbbbbbbbb@2', 'tok_b')
    shutil.copytree(runs['dit'], dit)
    argv = [f'--out_dir={dit}', '--mode=decode', '--device=cpu', f'--codes_path={codes}',
            '--num_sampling_steps=2', '--sampler=euler']
    assert run('diffusion.py', argv, capfd)[0] == 2
    status, out, err = run('diffusion.py', argv + ['--allow_mix=True'], capfd)
    assert status == 0, err[-2000:]
    assert np.load(dit / 'codes_val_images.npz')['arr_0'].shape[0] == 2


# -- values out of range: refused before anything is written ----------------------------------

@pytest.mark.parametrize('script, where, argv, key', [
    ('prior.py', 'prior', ['--mode=sample', '--n_samples=-5'], 'n_samples'),
    ('prior.py', 'prior', ['--mode=sample', '--sample_batch_size=0'], 'sample_batch_size'),
    ('prior.py', 'prior', ['--mode=sample', '--num_steps=0'], 'num_steps'),
    ('prior.py', 'prior', ['--mode=sample', '--temperature=-1.0'], 'temperature'),
    ('prior.py', 'prior', ['--mode=sample', '--sampler=bogus'], 'bogus'),
    ('prior.py', 'prior', ['--mode=train', '--batch_size=0'], 'batch_size'),
    ('prior.py', 'prior', ['--mode=train', '--learning_rate=-1.0'], 'learning_rate'),
    ('diffusion.py', 'dit', ['--mode=recon', '--n_recon=0'], 'n_recon'),
    ('diffusion.py', 'dit', ['--mode=train', '--micro_batch_size=0'], 'micro_batch_size'),
    ('diffusion.py', 'dit', ['--mode=train', '--ema_decay=1.5'], 'ema_decay'),
    ('diffusion.py', 'dit', ['--mode=train', '--optimizer=sgd'], 'optimizer'),
    ('diffusion.py', 'dit', ['--mode=train', '--cooldown_frac=1.5'], 'cooldown_frac'),
    ('prior.py', 'prior', ['--mode=train', '--cooldown_frac=-0.1'], 'cooldown_frac'),
    ('text2dlc.py', 'text', ['--mode=sample', '--sample_batch_size=0', '--prompts=a'],
     'sample_batch_size'),
    ('text2dlc.py', 'text', ['--mode=sample', '--n_samples=-1', '--prompts=a'], 'n_samples'),
    ('tokenizer.py', 'tok_a', ['--mode=dump', '--dump_batch_size=0'], 'dump_batch_size'),
    ('tokenizer.py', 'tok_a', ['--mode=train', '--max_iters=0'], 'max_iters'),
    ('sample.py', 'dit', ['--mode=uncond', '--n_samples=0'], 'n_samples'),
    ('sample.py', 'dit', ['--mode=uncond', '--batch_size=-2'], 'batch_size'),
    ('sample.py', 'dit', ['--mode=compose', '--compose_tau=0.0'], 'compose_tau'),
    ('data/shapes/prepare.py', 'tok_a', ['--n_train=0'], 'n_train'),
])
def test_a_count_size_or_scale_out_of_range_is_refused_before_anything_is_written(
        runs, capfd, script, where, argv, key):
    folder = runs[where]
    outs = {'prepare.py': f'--out_dir={folder}', 'sample.py': f'--out_dir={folder}/samples'}
    args = [outs.get(os.path.basename(script), f'--out_dir={folder}'), '--device=cpu'] \
        if 'prepare' not in script else [outs['prepare.py']]
    if script in ('prior.py', 'text2dlc.py', 'tokenizer.py', 'diffusion.py'):
        args.append(f"--codes_dir={runs['tok_a']}" if script != 'tokenizer.py'
                    else f"--data_dir={runs['shapes']}")
    assert_refused(script, args + argv, capfd, folder, f'--{key}' if key != 'bogus' else key)
    assert not os.path.exists(os.path.join(folder, 'samples.npy.parts'))


def test_the_prior_run_the_issue_tried_as_a_process(runs):
    """prior.py --mode=sample --n_samples=-5: one line, status 2, no chunk folder left behind."""
    before = snapshot(runs['prior'])
    result = run_script('prior.py', [f"--out_dir={runs['prior']}", f"--codes_dir={runs['tok_a']}",
                                     '--mode=sample', '--n_samples=-5', '--device=cpu'],
                        check=False)
    assert result.returncode == 2 and 'Traceback' not in result.stderr + result.stdout
    assert result.stderr.strip() == 'error: --n_samples=-5 must be at least 1'
    assert snapshot(runs['prior']) == before


# -- corrupt files ----------------------------------------------------------------------------

def test_a_truncated_dump_and_a_truncated_checkpoint_are_named_with_how_to_rewrite_them(
        runs, capfd, tmp_path):
    codes = tmp_path / 'codes'
    shutil.copytree(runs['tok_a'], codes)
    dump = codes / 'codes_val.npy'
    dump.write_bytes(dump.read_bytes()[:200])
    dit = runs['dit']
    line = assert_refused('diffusion.py', [f'--out_dir={dit}', f'--codes_dir={codes}',
                                           '--mode=recon', f"--data_dir={runs['shapes']}",
                                           '--device=cpu'], capfd, tmp_path, str(dump))
    assert 'tokenizer.py --mode=dump' in line
    broken = tmp_path / 'dit'
    broken.mkdir()
    data = open(os.path.join(dit, 'diffusion.pt'), 'rb').read()
    (broken / 'diffusion.pt').write_bytes(data[:len(data) // 2])
    line = assert_refused('diffusion.py', [f'--out_dir={broken}', f"--codes_dir={runs['tok_a']}",
                                           '--mode=recon', f"--data_dir={runs['shapes']}",
                                           '--device=cpu'], capfd, tmp_path,
                          f'{broken}/diffusion.pt')
    assert 'python diffusion.py' in line


def test_an_unreadable_image_is_named_and_odd_imagenet_files_still_load(runs, capfd, tmp_path):
    from PIL import Image
    folder = tmp_path / 'images' / 'val' / 'n01'
    folder.mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert('CMYK').save(folder / 'cmyk.JPEG')
    Image.fromarray(rgb).convert('L').save(folder / 'gray.JPEG')
    Image.fromarray(rgb).save(folder / 'png_inside.JPEG', format='PNG')
    for name in ('cmyk', 'gray', 'png_inside'):
        assert load_image(str(folder / f'{name}.JPEG'), 32).shape == (32, 32, 3)
    out = tmp_path / 'out'
    out.mkdir()
    shutil.copy(os.path.join(runs['tok_a'], 'tokenizer.pt'), out / 'tokenizer.pt')
    (folder / 'torn.JPEG').write_bytes(b'\xff\xd8\xff\xe0 not a whole image')
    assert_refused('tokenizer.py', [f'--out_dir={out}', f"--data_dir={tmp_path / 'images'}",
                                    '--mode=dump', '--device=cpu', '--dump_batch_size=2'],
                   capfd, out, 'n01/torn.JPEG')


# -- prompts ----------------------------------------------------------------------------------

def test_prompt_words_the_text_model_never_saw_are_named_and_sampling_goes_on(runs, capfd,
                                                                               tmp_path):
    status, out, err = run('text2dlc.py', [
        f"--out_dir={runs['text']}", f"--codes_dir={runs['tok_a']}", '--mode=sample',
        '--device=cpu', "--prompts=a purple hexagon|a red square",
        f"--sample_path={tmp_path / 'codes.npy'}"], capfd)
    assert status == 0, err[-2000:]
    warnings = [line for line in out.splitlines() if line.startswith('warning:')]
    assert len(warnings) == 1
    assert "'purple', 'hexagon'" in warnings[0] and 'a red square' not in warnings[0]
    assert np.load(tmp_path / 'codes.npy').shape[0] == 2


# -- artifacts written before runs had ids ----------------------------------------------------

def test_a_dump_and_checkpoints_written_before_identities_still_load(runs, capfd, tmp_path):
    old_codes, old_dit = tmp_path / 'codes', tmp_path / 'dit'
    shutil.copytree(runs['tok_a'], old_codes)
    with open(old_codes / 'codes.json') as f:
        sidecar = json.load(f)
    with open(old_codes / 'codes.json', 'w') as f:
        json.dump({k: v for k, v in sidecar.items()
                   if k not in ('tokenizer_id', 'fingerprints')}, f)
    old_dit.mkdir()
    ckpt = torch.load(os.path.join(runs['dit'], 'diffusion.pt'), weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != 'codes_id'}, old_dit / 'diffusion.pt')
    status, out, err = run('diffusion.py', [f'--out_dir={old_dit}', f'--codes_dir={old_codes}',
                                            '--mode=recon', f"--data_dir={runs['shapes']}",
                                            '--device=cpu', '--n_recon=2', '--sampler=euler',
                                            '--num_sampling_steps=2'], capfd)
    assert status == 0, err[-2000:]
    notes = [line for line in out.splitlines() if line.startswith('note:')]
    assert len(notes) == 1 and 'records no tokenizer identity' in notes[0]
    assert (old_dit / 'recon_val.npz').exists()
    # a tokenizer checkpoint without a run id dumps, with a note; sampled codes with no .json
    ckpt = torch.load(os.path.join(runs['tok_a'], 'tokenizer.pt'), weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != 'run_id'}, old_codes / 'tokenizer.pt')
    status, out, _ = run('tokenizer.py', [f'--out_dir={old_codes}', f"--data_dir={runs['shapes']}",
                                          '--mode=dump', '--device=cpu'], capfd)
    assert status == 0 and 'no run id' in out
    samples = tmp_path / 'samples.npy'
    shutil.copy(os.path.join(runs['prior'], 'samples.npy'), samples)
    assert read_identity(str(samples)) == (None, None)
    status, out, err = run('diffusion.py', [f'--out_dir={old_dit}', '--mode=decode',
                                            '--device=cpu', f'--codes_path={samples}',
                                            '--num_sampling_steps=2', '--sampler=euler'], capfd)
    assert status == 0 and 'note:' in out, err[-2000:]
    assert (old_dit / 'samples_images.npz').exists()
