"""Claims about the SEM encoder (tokenizer.py): the head, the DLC, loading DINOv2 weights,
training (loss, DDP, resume, crash safety) and the code dumps."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import conftest
from conftest import ROOT
import tokenizer as T


def tiny(shapes_dir, out_dir, **overrides):
    """A config small enough to train a step in well under a second on a CPU."""
    cfg = dict(T.CONFIG, data_dir=shapes_dir, out_dir=str(out_dir), device='cpu',
               patch_size=8, embed_dim=32, depth=2, num_heads=2, image_size=32, drop_path_rate=0.0,
               layerscale_init=0.1, L=4, V=8, n_prototypes=64, head_hidden_dim=64,
               head_bottleneck_dim=16, ssl_loss='infonce', global_crop_scale=(0.6, 1.0),
               n_local_crops=2, local_crop_size=16, local_crop_scale=(0.2, 0.5),
               color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.5, 0.5, 0.5),
               solarize_prob=(0.0, 0.0, 0.0), batch_size=32, max_iters=6, warmup_iters=2,
               learning_rate=3e-3, layer_decay=0.9, freeze_last_layer_iters=1, log_interval=1,
               ckpt_interval=2, dump_batch_size=64, probe_iters=100)
    cfg.update(overrides)
    return cfg


def as_args(cfg):
    return [f'--{k}={v!r}' if isinstance(v, (str, tuple)) else f'--{k}={v}'
            for k, v in cfg.items() if v != T.CONFIG[k]]


def run_script(args, nproc=1, check=True):
    return conftest.run_script('tokenizer.py', args, nproc, check)


def model_of(cfg):
    torch.manual_seed(0)
    return T.SEMEncoder(**T.model_args_from(cfg)).eval()


# -- the SEM head and the DLC ----------------------------------------------------------------

def test_sem_shapes_and_the_code_is_the_argmax_of_each_group(shapes_dir, tmp_path):
    cfg = tiny(shapes_dir, tmp_path, L=6, V=10)
    model = model_of(cfg)
    x = torch.randn(5, 3, 32, 32)
    z, s, patches = model(x)
    assert z.shape == (5, 6, 10) and s.shape == (5, 32) and patches.shape == (5, 16, 32)
    codes = model.encode(x)
    assert codes.shape == (5, 6) and codes.dtype == torch.int64
    assert torch.equal(codes, z.argmax(-1))
    assert int(codes.min()) >= 0 and int(codes.max()) < 10


def test_code_is_the_zero_temperature_limit_of_the_sem(shapes_dir, tmp_path):
    cfg = tiny(shapes_dir, tmp_path, L=6, V=10)
    model = model_of(cfg)
    x = torch.randn(8, 3, 32, 32)
    h = model.backbone(x)[:, :5]
    one_hot = F.one_hot(model.encode(x), 10).float()
    gaps = []
    for tau in [1.0, 0.1, 0.01, 1e-4]:
        z, s = model.sem(h, tau)
        p = F.softmax(z / tau, dim=-1)
        gaps.append((p - one_hot).abs().max().item())
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 0.1 and gaps[-1] < 1e-3
    # and the SEM output at tau -> 0 is the projection of the one-hot code
    _, s = model.sem(h, 1e-6)
    assert torch.allclose(s, model.sem.proj_out(one_hot.flatten(1)), atol=1e-5)


# -- DINOv2 weights ---------------------------------------------------------------------------

def dinov2_vits14_reg4_state_dict():
    """The exact key names and shapes of dinov2_vits14_reg4_pretrain.pth (518 px, 37 x 37 grid)."""
    D, depth = 384, 12
    sd = {'cls_token': (1, 1, D), 'pos_embed': (1, 1 + 37 * 37, D), 'register_tokens': (1, 4, D),
          'mask_token': (1, D), 'patch_embed.proj.weight': (D, 3, 14, 14), 'patch_embed.proj.bias': (D,)}
    for i in range(depth):
        b = f'blocks.{i}.'
        sd.update({b + 'norm1.weight': (D,), b + 'norm1.bias': (D,),
                   b + 'attn.qkv.weight': (3 * D, D), b + 'attn.qkv.bias': (3 * D,),
                   b + 'attn.proj.weight': (D, D), b + 'attn.proj.bias': (D,),
                   b + 'ls1.gamma': (D,), b + 'norm2.weight': (D,), b + 'norm2.bias': (D,),
                   b + 'mlp.fc1.weight': (4 * D, D), b + 'mlp.fc1.bias': (4 * D,),
                   b + 'mlp.fc2.weight': (D, 4 * D), b + 'mlp.fc2.bias': (D,), b + 'ls2.gamma': (D,)})
    sd.update({'norm.weight': (D,), 'norm.bias': (D,)})
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=gen) for k, shape in sd.items()}


def test_dinov2_vits14_reg4_checkpoint_loads_strictly(tmp_path):
    sd = dinov2_vits14_reg4_state_dict()
    path = tmp_path / 'dinov2_vits14_reg4_pretrain.pth'
    torch.save(sd, path)
    backbone = T.DinoVisionTransformer(224, 14, 384, 12, 6, 4, 0.0, 1e-5)
    T.load_dinov2_backbone(backbone, str(path))
    loaded = backbone.state_dict()
    assert set(loaded) == set(sd)
    for k in sd:
        if k != 'pos_embed':
            assert torch.equal(loaded[k], sd[k]), k
    # position embeddings resized from the 37 x 37 grid to 16 x 16 (224 px); CLS kept
    assert loaded['pos_embed'].shape == (1, 1 + 16 * 16, 384)
    assert torch.equal(loaded['pos_embed'][:, 0], sd['pos_embed'][:, 0])
    out = backbone(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1 + 4 + 256, 384)


def test_dinov2_file_of_another_size_is_refused_with_the_settings_to_use(tmp_path):
    path = tmp_path / 'dinov2_vits14_reg4_pretrain.pth'
    torch.save(dinov2_vits14_reg4_state_dict(), path)
    backbone = T.DinoVisionTransformer(224, 14, 768, 12, 12, 4, 0.0, 1e-5)
    with pytest.raises(ValueError, match='vits14.*--embed_dim=384'):
        T.load_dinov2_backbone(backbone, str(path))
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        T.load_dinov2_backbone(backbone, str(tmp_path / 'missing.pth'))


# -- training -------------------------------------------------------------------------------

@pytest.mark.parametrize('ssl_loss', ['infonce', 'dino'])
def test_loss_decreases_on_the_built_in_data(shapes_dir, tmp_path, ssl_loss):
    cfg = tiny(shapes_dir, tmp_path, ssl_loss=ssl_loss, max_iters=30, warmup_iters=3,
               batch_size=64, ckpt_interval=100, ibot_weight=1.0, koleo_weight=0.1)
    _, history = T.train(cfg)
    losses = [h['loss'] for h in history]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses


def params_of(path):
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    return ckpt


@pytest.mark.parametrize('ssl_loss', ['infonce', 'dino'])
def test_two_processes_take_the_same_step_as_one(shapes_dir, tmp_path, ssl_loss):
    # KoLeo searches neighbours within each process's batch (as DINOv2), so it is off here.
    # Three steps: the first has lr 0 (warm-up), the third sees the centers the second set.
    common = dict(ssl_loss=ssl_loss, max_iters=3, koleo_weight=0.0, batch_size=16)
    one = tiny(shapes_dir, tmp_path / 'one', **common)
    two = tiny(shapes_dir, tmp_path / 'two', **common)
    run_script(as_args(one))
    run_script(as_args(two), nproc=2)
    a, b = params_of(tmp_path / 'one' / 'tokenizer.pt'), params_of(tmp_path / 'two' / 'tokenizer.pt')
    assert a['iter_num'] == b['iter_num'] == 3
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], rtol=1e-5, atol=1e-6, msg=k)
    moved = max((a['model'][k] - model_of(one).state_dict()[k]).abs().max().item() for k in a['model'])
    assert moved > 1e-4   # the step did something


@pytest.mark.parametrize('ssl_loss', ['infonce', 'dino'])
def test_stop_and_resume_equals_an_uninterrupted_run(shapes_dir, tmp_path, ssl_loss):
    straight = tiny(shapes_dir, tmp_path / 'straight', ssl_loss=ssl_loss, drop_path_rate=0.1)
    T.train(straight)
    split = tiny(shapes_dir, tmp_path / 'split', ssl_loss=ssl_loss, drop_path_rate=0.1, run_iters=3)
    T.train(split)
    assert params_of(tmp_path / 'split' / 'tokenizer.pt')['iter_num'] == 3
    T.train(dict(split, init_from='resume', run_iters=-1))
    a, b = params_of(tmp_path / 'straight' / 'tokenizer.pt'), params_of(tmp_path / 'split' / 'tokenizer.pt')
    assert a['iter_num'] == b['iter_num'] == 6
    for part in ['model', 'teacher'] if ssl_loss == 'dino' else ['model']:
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k in a['centers']:
        assert torch.equal(a['centers'][k], b['centers'][k])


def test_sigkill_at_a_random_moment_leaves_a_loadable_checkpoint_that_resumes(shapes_dir, tmp_path):
    cfg = tiny(shapes_dir, tmp_path, max_iters=10000, ckpt_interval=1, log_interval=50)
    proc = subprocess.Popen([sys.executable, 'tokenizer.py'] + as_args(cfg), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / 'tokenizer.pt'
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert ckpt.exists(), 'no checkpoint was written'
    time.sleep(np.random.default_rng().uniform(0.5, 2.5))   # checkpoints are written every step
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(ckpt, map_location='cpu', weights_only=True)
    killed_at = state['iter_num']
    assert killed_at >= 1
    T.train(dict(cfg, init_from='resume', run_iters=2))
    assert params_of(ckpt)['iter_num'] == killed_at + 2


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shapes_dir, tmp_path, monkeypatch):
    cfg = tiny(shapes_dir, tmp_path, max_iters=6, ckpt_interval=2)
    calls = []
    def loss_that_turns_nan(q, temp):
        calls.append(1)
        loss = T.F.cross_entropy(q @ q.t() / temp, torch.arange(len(q)))
        return loss * float('nan') if len(calls) == 4 else loss
    monkeypatch.setattr(T, 'infonce_loss', loss_that_turns_nan)
    with pytest.raises(FloatingPointError, match=r'loss is nan.*at iteration 3.*tokenizer.pt'):
        T.train(cfg)
    state = params_of(tmp_path / 'tokenizer.pt')
    assert state['iter_num'] == 2
    assert all(torch.isfinite(v).all() for v in state['model'].values())


# -- dumps and the probe --------------------------------------------------------------------

@pytest.fixture(scope='module')
def trained(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('trained')
    cfg = tiny(shapes_dir, out, max_iters=4, dump_split='val')
    T.train(cfg)
    T.dump(cfg)
    return cfg


def test_dump_writes_one_code_per_item_in_dataset_order(trained):
    ckpt = T.load_checkpoint(os.path.join(trained['out_dir'], 'tokenizer.pt'))
    codes = T.load_codes(os.path.join(trained['out_dir'], 'codes_val.npy'), ckpt['L'], ckpt['V'], 256)
    assert codes.dtype == np.uint16 and codes.shape == (256, 4)
    model = T.encoder_from_checkpoint(ckpt)
    images = np.load(os.path.join(trained['data_dir'], 'val_images.npy'))[[0, 7, 200]]
    direct = model.encode(T.normalize(T.to_float_images(torch.from_numpy(images), 'cpu')))
    assert np.array_equal(codes[[0, 7, 200]], direct.numpy())


@pytest.mark.parametrize('bad, message', [
    (lambda c: c[:, :3], r'shape \(256, 3\).*L=4'),
    (lambda c: np.where(c == c.max(), 8, c).astype(np.uint16), r'token 8 >= V=8'),
    (lambda c: c[:100], r'100 rows.*256 items'),
    (lambda c: c.astype(np.float32), r'dtype float32'),
])
def test_a_dump_that_disagrees_with_its_checkpoint_is_refused(trained, tmp_path, bad, message):
    good = np.load(os.path.join(trained['out_dir'], 'codes_val.npy'))
    path = tmp_path / 'codes_val.npy'
    np.save(path, bad(good))
    with pytest.raises(ValueError, match=message) as err:
        T.load_codes(str(path), 4, 8, 256)
    assert str(path) in str(err.value) and 'tokenizer.py --mode=dump' in str(err.value)


def test_probe_reads_a_factor_that_the_codes_hold():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 8, size=(2000, 4)).astype(np.uint16)
    labels = codes[:, 2] % 3                      # the label is a function of one position
    weight, bias = T.fit_probe(codes[:1500], labels[:1500], 8, 3, iters=200)
    probe = dict(L=4, V=8, labels={'f': dict(weight=weight, bias=bias)})
    assert (T.probe_predict(probe, codes[1500:])['f'] == labels[1500:]).mean() == 1.0
    noise = rng.integers(0, 3, size=2000)         # and finds nothing where there is nothing
    weight, bias = T.fit_probe(codes[:1500], noise[:1500], 8, 3, iters=200)
    probe['labels']['f'] = dict(weight=weight, bias=bias)
    assert (T.probe_predict(probe, codes[1500:])['f'] == noise[1500:]).mean() < 0.45


def test_probe_mode_reports_every_factor_and_saves_the_probe(trained, capsys):
    result = T.probe(dict(trained, probe_train_split='train', probe_eval_split='val'))
    assert set(result['accuracy']) == {'shape', 'color', 'background', 'size', 'position'}
    assert len(result['usage']['distinct']) == 4
    saved = torch.load(os.path.join(trained['out_dir'], 'probe.pt'), weights_only=True)
    codes = np.load(os.path.join(trained['out_dir'], 'codes_val.npy'))
    factors = np.load(os.path.join(trained['data_dir'], 'val_factors.npy'))
    pred = T.probe_predict(saved, codes)
    assert (pred['color'] == factors[:, 1]).mean() == pytest.approx(result['accuracy']['color'])
    assert 'distinct tokens per position' in capsys.readouterr().out


# -- image folders --------------------------------------------------------------------------

def test_image_folders_are_read_in_sorted_order_and_a_corrupt_image_is_named(trained, tmp_path):
    from PIL import Image
    root = tmp_path / 'folder' / 'val'
    rng = np.random.default_rng(0)
    for c in ['b_class', 'a_class']:
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / c / f'{i}.png')
    out = tmp_path / 'out'
    out.mkdir()
    shutil.copy(os.path.join(trained['out_dir'], 'tokenizer.pt'), out / 'tokenizer.pt')
    ckpt = T.load_checkpoint(str(out / 'tokenizer.pt'))
    cfg = dict(trained, data_dir=str(tmp_path / 'folder'), out_dir=str(out), dump_split='val')
    T.dump(cfg)
    codes = T.load_codes(str(out / 'codes_val.npy'), ckpt['L'], ckpt['V'], 6)
    dataset = T.open_split(str(tmp_path / 'folder'), 'val', 37)
    assert dataset.labels == [0, 0, 0, 1, 1, 1] and dataset.files[0].endswith('a_class/0.png')
    assert codes.shape == (6, 4)
    (root / 'a_class' / '1.png').write_bytes(b'not an image')
    with pytest.raises(RuntimeError, match='a_class/1.png'):
        T.dump(cfg)
