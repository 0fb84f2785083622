"""Claims about the SEM encoder (tokenizer.py): the head, the DLC, loading DINOv2 weights,
training (loss, DDP, resume, crash safety) and the code dumps."""
import json
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
from codes import load_codes, read_contract
from configurator import UserError
from conftest import ROOT
from images import load_image
import tokenizer as T
from data.shapes import score as SC


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
          'mask_token': (1, D), 'patch_embed.proj.weight': (D, 3, 14, 14),
          'patch_embed.proj.bias': (D,)}
    for i in range(depth):
        b = f'blocks.{i}.'
        sd.update({b + 'norm1.weight': (D,), b + 'norm1.bias': (D,),
                   b + 'attn.qkv.weight': (3 * D, D), b + 'attn.qkv.bias': (3 * D,),
                   b + 'attn.proj.weight': (D, D), b + 'attn.proj.bias': (D,),
                   b + 'ls1.gamma': (D,), b + 'norm2.weight': (D,), b + 'norm2.bias': (D,),
                   b + 'mlp.fc1.weight': (4 * D, D), b + 'mlp.fc1.bias': (4 * D,),
                   b + 'mlp.fc2.weight': (D, 4 * D), b + 'mlp.fc2.bias': (D,),
                   b + 'ls2.gamma': (D,)})
    sd.update({'norm.weight': (D,), 'norm.bias': (D,)})
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=gen) for k, shape in sd.items()}


def dinov2_resize(pos_embed, grid):
    """DINOv2's interpolate_pos_encoding for its register models (interpolate_antialias=True,
    interpolate_offset=0.0, so an output size and no scale factor): patch rows only."""
    D = pos_embed.shape[-1]
    m = int((pos_embed.shape[1] - 1) ** 0.5)
    square = pos_embed[:, 1:].reshape(1, m, m, D).permute(0, 3, 1, 2)
    out = F.interpolate(square, size=(grid, grid), mode='bicubic', antialias=True)
    return out.permute(0, 2, 3, 1).reshape(1, grid * grid, D)


@pytest.mark.parametrize('image_size', [224, 588])   # the 37 x 37 grid shrinks to 16, grows to 42
def test_dinov2_vits14_reg4_checkpoint_loads_strictly(tmp_path, image_size):
    sd = dinov2_vits14_reg4_state_dict()
    path = tmp_path / 'dinov2_vits14_reg4_pretrain.pth'
    torch.save(sd, path)
    backbone = T.DinoVisionTransformer(image_size, 14, 384, 12, 6, 4, 0.0, 1e-5)
    T.load_dinov2_backbone(backbone, str(path))
    loaded = backbone.state_dict()
    assert set(loaded) == set(sd)
    for k in sd:
        if k != 'pos_embed':
            assert torch.equal(loaded[k], sd[k]), k
    # position embeddings resized from the 37 x 37 grid as DINOv2 resizes them; CLS kept
    grid = image_size // 14
    assert loaded['pos_embed'].shape == (1, 1 + grid * grid, 384)
    assert torch.equal(loaded['pos_embed'][:, 0], sd['pos_embed'][:, 0])
    torch.testing.assert_close(loaded['pos_embed'][:, 1:], dinov2_resize(sd['pos_embed'], grid))
    # and at a forward at another resolution (a local crop, a larger image) the same way
    for other in [7, grid + 5]:
        resized = T.interpolate_pos_embed(backbone.pos_embed, other, other)
        torch.testing.assert_close(resized[:, 1:], dinov2_resize(loaded['pos_embed'], other))
    if image_size == 224:
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


# -- the paper's encoder: its DINOv2 fork's checkpoint -----------------------------------------

FORK = dict(D=32, depth=2, heads=2, L=4, V=8, K=16)   # small dims, the fork's names and layout


def fork_teacher_state_dict():
    """The key names and shapes of the fork's teacher (vit_*_sem, img_size 518, 4 registers,
    block_chunks 0; DINOHead with weight-normed prototypes) as its teacher_checkpoint.pth holds."""
    D, L, V, K = FORK['D'], FORK['L'], FORK['V'], FORK['K']
    vit = {'cls_token': (1, 1, D), 'pos_embed': (1, 1 + 37 * 37, D), 'register_tokens': (1, 4, D),
           'mask_token': (1, D), 'patch_embed.proj.weight': (D, 3, 14, 14),
           'patch_embed.proj.bias': (D,),
           'norm.weight': (D,), 'norm.bias': (D,), 'sem_embed.weight': (L * V, 5 * D),
           'sem_norm.weight': (L * V,), 'sem_norm.bias': (L * V,), 'sem_out.weight': (D, L * V),
           'sem_cls_norm.weight': (D,), 'sem_cls_norm.bias': (D,)}
    for i in range(FORK['depth']):
        b = f'blocks.{i}.'
        vit.update({b + 'norm1.weight': (D,), b + 'norm1.bias': (D,),
                    b + 'attn.qkv.weight': (3 * D, D), b + 'attn.qkv.bias': (3 * D,),
                    b + 'attn.proj.weight': (D, D), b + 'attn.proj.bias': (D,),
                    b + 'ls1.gamma': (D,), b + 'norm2.weight': (D,), b + 'norm2.bias': (D,),
                    b + 'mlp.fc1.weight': (4 * D, D), b + 'mlp.fc1.bias': (4 * D,),
                    b + 'mlp.fc2.weight': (D, 4 * D), b + 'mlp.fc2.bias': (D,),
                    b + 'ls2.gamma': (D,)})
    head = {'mlp.0.weight': (64, D), 'mlp.0.bias': (64,), 'mlp.2.weight': (64, 64),
            'mlp.2.bias': (64,),
            'mlp.4.weight': (16, 64), 'mlp.4.bias': (16,), 'last_layer.weight_g': (K, 1),
            'last_layer.weight_v': (K, 16)}
    gen = torch.Generator().manual_seed(0)
    sd = {'backbone.' + k: 0.2 * torch.randn(s, generator=gen) for k, s in vit.items()}
    sd.update({'dino_head.' + k: torch.randn(s, generator=gen) for k, s in head.items()})
    # a small SEM input scale, so that the SEM norm's eps (1e-6 in the fork) matters
    sd['backbone.sem_embed.weight'] *= 1e-3
    return sd


def fork_code_logits(sd, x):
    """The fork's SEM logits of normalized images x, written from its vision_transformer.py
    (prepare_tokens_with_masks, blocks, sem): position grid resized at the forward to the
    image's grid (size, bicubic, antialias), pre-norm CLS + registers -> sem_embed -> sem_norm
    (eps 1e-6)."""
    p = {k.removeprefix('backbone.'): v for k, v in sd.items() if k.startswith('backbone.')}
    D, heads, LV = FORK['D'], FORK['heads'], FORK['L'] * FORK['V']
    B, g = len(x), x.shape[-1] // 14
    t = F.conv2d(x, p['patch_embed.proj.weight'], p['patch_embed.proj.bias'], stride=14)
    t = t.flatten(2).transpose(1, 2)
    grid = p['pos_embed'][:, 1:].reshape(1, 37, 37, D).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g, g), mode='bicubic', antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, g * g, D)
    t = torch.cat([p['cls_token'].expand(B, -1, -1), t], 1)
    t = t + torch.cat([p['pos_embed'][:, :1], grid], 1)
    t = torch.cat([t[:, :1], p['register_tokens'].expand(B, -1, -1), t[:, 1:]], 1)
    N = t.shape[1]
    for i in range(FORK['depth']):
        prefix = f'blocks.{i}.'
        w = {k.removeprefix(prefix): v for k, v in p.items() if k.startswith(prefix)}
        h = F.layer_norm(t, (D,), w['norm1.weight'], w['norm1.bias'], eps=1e-6)
        qkv = F.linear(h, w['attn.qkv.weight'], w['attn.qkv.bias'])
        q, k, v = qkv.view(B, N, 3, heads, -1).unbind(2)
        att = torch.softmax(torch.einsum('bqhd,bkhd->bhqk', q, k) / (D // heads) ** 0.5, dim=-1)
        a = torch.einsum('bhqk,bkhd->bqhd', att, v).reshape(B, N, D)
        t = t + w['ls1.gamma'] * F.linear(a, w['attn.proj.weight'], w['attn.proj.bias'])
        h = F.layer_norm(t, (D,), w['norm2.weight'], w['norm2.bias'], eps=1e-6)
        h = F.gelu(F.linear(h, w['mlp.fc1.weight'], w['mlp.fc1.bias']))
        h = F.linear(h, w['mlp.fc2.weight'], w['mlp.fc2.bias'])
        t = t + w['ls2.gamma'] * h
    z = F.linear(t[:, :5].reshape(B, -1), p['sem_embed.weight'])
    z = F.layer_norm(z, (LV,), p['sem_norm.weight'], p['sem_norm.bias'], eps=1e-6)
    return z.view(B, FORK['L'], FORK['V'])


def fork_cfg(tmp_path, path):
    return dict(T.CONFIG, out_dir=str(tmp_path / 'imported'), init_from=str(path), device='cpu',
                patch_size=14, embed_dim=FORK['D'], depth=FORK['depth'], num_heads=FORK['heads'],
                image_size=224, L=FORK['L'], V=FORK['V'], n_prototypes=FORK['K'],
                head_hidden_dim=64, head_bottleneck_dim=16)


def test_the_papers_encoder_loads_from_its_fork_checkpoint_and_gives_its_codes(tmp_path):
    sd = fork_teacher_state_dict()
    path = tmp_path / 'teacher_checkpoint.pth'
    torch.save({'teacher': sd}, path)                      # as the fork's do_test writes it
    cfg = fork_cfg(tmp_path, path)
    T.import_fork(cfg)
    ckpt = T.load_checkpoint(os.path.join(cfg['out_dir'], 'tokenizer.pt'))
    model = T.encoder_from_checkpoint(ckpt)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    want = fork_code_logits(sd, x)
    torch.testing.assert_close(model.code_logits(x), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.encode(x), want.argmax(-1))
    # SEM output and norms under the fork's names
    assert torch.equal(model.sem.proj_out.weight, sd['backbone.sem_out.weight'])
    assert torch.equal(model.backbone.norm.weight, sd['backbone.norm.weight'])


def test_a_fork_checkpoint_that_does_not_fit_is_refused_naming_the_keys(tmp_path):
    sd = fork_teacher_state_dict()
    del sd['backbone.sem_norm.bias']
    sd['backbone.blocks.2.ls1.gamma'] = torch.ones(FORK['D'])
    path = tmp_path / 'teacher_checkpoint.pth'
    torch.save({'teacher': sd}, path)
    model = T.SEMEncoder(**T.model_args_from(fork_cfg(tmp_path, path)))
    with pytest.raises(ValueError, match=r"lacks \['sem_norm.bias'\] and has unexpected "
                                         r"\['backbone.blocks.2.ls1.gamma'\]"):
        T.load_fork_checkpoint(model, str(path))


# -- the losses and the optimizer, as DINOv2 weighs them ------------------------------------

def test_ibot_averages_each_masked_crop_and_divides_by_all_global_crops():
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(6, 10, dtype=torch.bool)           # 6 global crops, 2 of them masked
    masks[1, :3] = True
    masks[4, 2:9] = True
    student = torch.randn(10, 5, generator=gen)            # (M, K), M = 3 + 7 masked patches
    teacher = F.softmax(torch.randn(10, 5, generator=gen), dim=-1)
    ce = -(teacher * F.log_softmax(student / 0.1, dim=-1)).sum(-1)
    want = (ce[:3].mean() + ce[3:].mean()) / 6
    torch.testing.assert_close(T.ibot_loss(student, teacher, masks, 0.1), want)


def test_the_loss_adds_koleo_of_each_global_crop_without_averaging_them(shapes_dir, tmp_path):
    cfg = tiny(shapes_dir, tmp_path, ssl_loss='dino', koleo_weight=0.1, ibot_weight=1.0)
    model = model_of(cfg)
    teacher = model_of(cfg)
    B = 8
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(B, 3, 32, 32, generator=gen)
    global_views, local_views = T.make_views(x, cfg, gen, (B, slice(0, B)))
    masks = T.patch_masks(16, 0.5, (0.1, 0.5), gen, (B, slice(0, B)))
    centers = {'cls': torch.zeros(1, 64), 'patch': torch.zeros(1, 64)}
    loss, parts = T.dino_step(model, model, teacher, centers, global_views, local_views, masks,
                              cfg, 0.04, B)
    _, s, _ = model(global_views, masks=masks)             # the student's masked global crops
    koleo = T.koleo_loss(s[:B]) + T.koleo_loss(s[B:])
    torch.testing.assert_close(parts['koleo'], koleo.detach())
    torch.testing.assert_close(loss, parts['dino'] + parts['ibot'] + 0.1 * koleo)


def test_optimizer_groups_follow_dinov2(shapes_dir, tmp_path):
    model = model_of(tiny(shapes_dir, tmp_path, ssl_loss='dino'))    # depth 2: layers 0..3
    name_of = {id(p): n for n, p in model.named_parameters()}
    got = {name_of[id(p)]: (g['lr_scale'], g['wd_scale'], g['prototypes'])
           for g in T.param_groups(model, 0.5, 0.2) for p in g['params']}
    assert set(got) == set(name_of.values())
    want = {
        'backbone.patch_embed.proj.weight': (0.125 * 0.2, 1.0),    # embeddings: layer 0, 0.5^3
        'backbone.patch_embed.proj.bias': (0.125 * 0.2, 0.0),
        'backbone.pos_embed': (0.125, 1.0), 'backbone.cls_token': (0.125, 1.0),
        'backbone.register_tokens': (0.125, 1.0), 'backbone.mask_token': (0.125, 1.0),
        'backbone.blocks.0.attn.qkv.weight': (0.25, 1.0),
        'backbone.blocks.0.attn.qkv.bias': (0.25, 0.0),
        'backbone.blocks.0.norm1.weight': (0.25, 0.0), 'backbone.blocks.0.ls1.gamma': (0.25, 0.0),
        'backbone.blocks.1.mlp.fc1.weight': (0.5, 1.0), 'backbone.blocks.1.ls2.gamma': (0.5, 0.0),
        'backbone.norm.weight': (1.0, 0.0), 'backbone.norm.bias': (1.0, 0.0),
        'sem.proj_in.weight': (1.0, 1.0), 'sem.norm.weight': (1.0, 0.0),
        'sem.proj_out.weight': (1.0, 1.0),
        'head.mlp.0.weight': (1.0, 1.0), 'head.mlp.0.bias': (1.0, 0.0)}
    for name, (lr, wd) in want.items():
        assert got[name] == (pytest.approx(lr), wd, False), name
    assert got['head.last_layer.weight'] == (1.0, 1.0, True)


# -- training -------------------------------------------------------------------------------

# DINO's own term starts low on the near-identical outputs of the initial network and climbs
# towards log K as centering spreads the teacher; in 30 steps what training lowers is iBOT and
# KoLeo (the SEM outputs spread apart).
@pytest.mark.parametrize('ssl_loss, terms', [('infonce', ['loss']), ('dino', ['ibot', 'koleo'])])
def test_training_lowers_the_loss_on_the_built_in_data(shapes_dir, tmp_path, ssl_loss, terms):
    cfg = tiny(shapes_dir, tmp_path, ssl_loss=ssl_loss, max_iters=30, warmup_iters=3,
               batch_size=64, ckpt_interval=100, ibot_weight=1.0, koleo_weight=0.1)
    _, history = T.train(cfg)
    assert all(np.isfinite(h['loss']) for h in history)
    for term in terms:
        values = [h[term] for h in history]
        assert np.mean(values[-5:]) < np.mean(values[:5]) - 0.05, (term, values)


def params_of(path):
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    return ckpt


@pytest.mark.parametrize('ssl_loss, centering',
                         [('infonce', 'center'), ('dino', 'center'), ('dino', 'sinkhorn')])
def test_two_processes_take_the_same_step_as_one(shapes_dir, tmp_path, ssl_loss, centering):
    # KoLeo searches neighbours within each process's batch (as DINOv2), so it is off here.
    # Three steps: the first has lr 0 (warm-up), the third sees the centers the second set.
    # Sinkhorn-Knopp normalizes over the global batch, whose processes hold different numbers
    # of masked patches.
    common = dict(ssl_loss=ssl_loss, centering=centering, max_iters=3, koleo_weight=0.0,
                  batch_size=16)
    one = tiny(shapes_dir, tmp_path / 'one', **common)
    two = tiny(shapes_dir, tmp_path / 'two', **common)
    run_script(as_args(one))
    run_script(as_args(two), nproc=2)
    a = params_of(tmp_path / 'one' / 'tokenizer.pt')
    b = params_of(tmp_path / 'two' / 'tokenizer.pt')
    assert a['iter_num'] == b['iter_num'] == 3
    assert (a['world_size'], b['world_size']) == (1, 2)    # one run of two processes, split
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], rtol=1e-5, atol=1e-6, msg=k)
    start = model_of(one).state_dict()
    moved = max((a['model'][k] - start[k]).abs().max().item() for k in a['model'])
    assert moved > 1e-4   # the step did something


@pytest.mark.parametrize('ssl_loss', ['infonce', 'dino'])
def test_stop_and_resume_equals_an_uninterrupted_run(shapes_dir, tmp_path, ssl_loss):
    straight = tiny(shapes_dir, tmp_path / 'straight', ssl_loss=ssl_loss, drop_path_rate=0.1)
    T.train(straight)
    split = tiny(shapes_dir, tmp_path / 'split', ssl_loss=ssl_loss, drop_path_rate=0.1, run_iters=3)
    T.train(split)
    assert params_of(tmp_path / 'split' / 'tokenizer.pt')['iter_num'] == 3
    T.train(dict(split, init_from='resume', run_iters=-1))
    a = params_of(tmp_path / 'straight' / 'tokenizer.pt')
    b = params_of(tmp_path / 'split' / 'tokenizer.pt')
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


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shapes_dir, tmp_path,
                                                                     monkeypatch):
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
    cfg = tiny(shapes_dir, out, max_iters=4, dump_split='train,val,ood')
    T.train(cfg)
    T.dump(cfg)
    return cfg


def test_dump_writes_one_code_per_item_in_dataset_order_and_its_sidecar(trained):
    ckpt = T.load_checkpoint(os.path.join(trained['out_dir'], 'tokenizer.pt'))
    codes = load_codes(trained['out_dir'], 'val', 256)
    assert codes.dtype == np.uint16 and codes.shape == (256, 4)
    contract = read_contract(trained['out_dir'])
    n_items = {split: len(np.load(os.path.join(trained['data_dir'], f'{split}_factors.npy')))
               for split in ('train', 'val', 'ood')}
    assert (contract['L'], contract['V'], contract['image_size']) == (4, 8, ckpt['image_size'])
    assert contract['splits'] == n_items
    assert contract['source'] == os.path.join(trained['out_dir'], 'tokenizer.pt')
    model = T.encoder_from_checkpoint(ckpt)
    images = np.load(os.path.join(trained['data_dir'], 'val_images.npy'))[[0, 7, 200]]
    direct = model.encode(T.normalize(T.to_float_images(torch.from_numpy(images), 'cpu')))
    assert np.array_equal(codes[[0, 7, 200]], direct.numpy())


@pytest.mark.parametrize('bad, message', [
    (lambda c: c[:, :3], r'shape \(256, 3\).*L=4'),
    (lambda c: np.where(c == c.max(), 8, c).astype(np.uint16), r'token 8 >= V=8'),
    (lambda c: c[:100], r'100 codes.*256'),
    (lambda c: c.astype(np.float32), r'dtype float32'),
])
def test_a_dump_that_disagrees_with_its_sidecar_is_refused(trained, tmp_path, bad, message):
    good = np.load(os.path.join(trained['out_dir'], 'codes_val.npy'))
    shutil.copy(os.path.join(trained['out_dir'], 'codes.json'), tmp_path / 'codes.json')
    path = tmp_path / 'codes_val.npy'
    np.save(path, bad(good))
    with pytest.raises(ValueError, match=message) as err:
        load_codes(str(tmp_path), 'val', 256)
    assert str(path) in str(err.value) and 'dump' in str(err.value)


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


def test_the_scorer_reads_held_out_pairs_with_the_probe_and_reports_factorization(trained,
                                                                                   capsys):
    T.probe(dict(trained, probe_train_split='train', probe_eval_split='val'))
    report = SC.score_codes(trained['out_dir'], trained['data_dir'])
    out = capsys.readouterr().out
    assert 'factorization' in out and 'biased' in out and 'shape and not color' in out
    saved = torch.load(os.path.join(trained['out_dir'], 'probe.pt'), weights_only=True)
    ood_pred = T.probe_predict(saved, np.load(os.path.join(trained['out_dir'], 'codes_ood.npy')))
    ood_factors = np.load(os.path.join(trained['data_dir'], 'ood_factors.npy'))
    for i, name in enumerate(['shape', 'color']):
        read_right = (ood_pred[name] == ood_factors[:, i]).mean()
        assert report['compositionality']['ood']['probe'][name] == pytest.approx(read_right)
    assert np.asarray(report['share']).shape == (4, 4)
    with open(os.path.join(trained['out_dir'], 'factorization.json')) as f:
        assert json.load(f)['shape_not_color'] == report['shape_not_color']
    # sampled codes: the val dump stands in for a prior's samples and a text model's codes
    val_path = os.path.join(trained['out_dir'], 'codes_val.npy')
    tv = SC.score_samples(val_path, trained['out_dir'], trained['data_dir'])
    assert set(tv) >= {'tv_shape', 'tv_color', 'tv_shape_color_background'}
    captions = os.path.join(trained['data_dir'], 'val_captions.txt')
    kept = SC.score_samples(val_path, trained['out_dir'], trained['data_dir'], captions)
    val_pred = T.probe_predict(saved, np.load(val_path))
    val_factors = np.load(os.path.join(trained['data_dir'], 'val_factors.npy'))
    assert kept['color'] == pytest.approx((val_pred['color'] == val_factors[:, 1]).mean())


def test_factorization_tells_a_factorized_code_from_an_entangled_one():
    rng = np.random.default_rng(0)
    factors = np.stack([rng.integers(0, 3, 20000), rng.integers(0, 6, 20000),
                        rng.integers(0, 3, 20000), rng.integers(0, 2, 20000)], 1)
    oracle = SC.factorization(factors, factors)           # one factor per position, exactly
    assert np.allclose(np.diag(oracle['share']), 1, atol=0.01)
    assert oracle['alone'].tolist() == [1, 1, 1, 1]
    # shape and color in one token: it carries both, so neither alone; a token of noise: nothing
    entangled = np.stack([factors[:, 0] * 6 + factors[:, 1], rng.integers(0, 8, 20000)], 1)
    report = SC.factorization(entangled, factors)
    assert report['carrying'][:2].tolist() == [1, 1] and report['alone'].sum() == 0
    assert report['share'][1].max() < 0.01


def test_mutual_information_and_nearest_codes_measure_what_they_name():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=30000)
    codes = np.stack([labels * 2, rng.integers(0, 8, size=30000)], 1).astype(np.uint16)
    mi = SC.mutual_information(codes, labels, 8)
    assert mi[0] == pytest.approx(np.log(3), abs=2e-3)       # the token names the label: I = H(y)
    assert mi[1] < 2e-3                                       # independent of it: I = 0
    ref = np.array([[0, 0, 0], [0, 0, 1], [5, 5, 5]], dtype=np.uint16)
    ref_labels = {'f': np.array([0, 1, 1])}
    queries = np.array([[0, 0, 2], [5, 5, 5], [0, 0, 0]], dtype=np.uint16)
    dist, same = SC.nearest_codes(queries, {'f': np.array([0, 1, 0])}, ref, ref_labels)
    assert dist.tolist() == [1, 0, 0]
    # query 0 ties between a reference with its label and one without: half counts
    assert same['f'].tolist() == [0.5, 1.0, 1.0]


# -- image folders --------------------------------------------------------------------------

def test_image_folders_are_read_in_sorted_order_and_a_corrupt_image_is_named(trained, tmp_path):
    from PIL import Image
    root = tmp_path / 'folder' / 'val'
    rng = np.random.default_rng(0)
    for c in ['b_class', 'a_class']:
        (root / c).mkdir(parents=True)
        for i in range(3):
            image = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / c / f'{i}.png')
    out = tmp_path / 'out'
    out.mkdir()
    shutil.copy(os.path.join(trained['out_dir'], 'tokenizer.pt'), out / 'tokenizer.pt')
    ckpt = T.load_checkpoint(str(out / 'tokenizer.pt'))
    cfg = dict(trained, data_dir=str(tmp_path / 'folder'), out_dir=str(out), dump_split='val')
    T.dump(cfg)
    codes = load_codes(str(out), 'val', 6)
    dataset = T.open_split(str(tmp_path / 'folder'), 'val', 37)
    assert list(dataset.labels) == [0, 0, 0, 1, 1, 1] and dataset.files[0].endswith('a_class/0.png')
    assert codes.shape == (6, 4)
    (root / 'a_class' / '1.png').write_bytes(b'not an image')
    with pytest.raises(UserError, match='a_class/1.png'):
        T.dump(cfg)


def adm_center_crop(path, size):
    """guided-diffusion's center_crop_arr, which the paper's extract_features_withdlc.py and
    sample_comp_imgs.py apply at 224 before the encoder: while the short side is at least twice
    size, halve with a box filter; bicubic to a short side of size; the central square."""
    from PIL import Image
    im = Image.open(path).convert('RGB')
    while min(im.size) >= 2 * size:
        im = im.resize((im.size[0] // 2, im.size[1] // 2), resample=Image.BOX)
    scale = size / min(im.size)
    im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), resample=Image.BICUBIC)
    a = np.array(im)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top:top + size, left:left + size]


def test_load_image_is_adms_center_crop_at_224(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    # halved once, never, never, twice
    for h, w in [(460, 700), (375, 500), (300, 200), (1000, 900)]:
        path = tmp_path / f'{h}x{w}.png'
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        np.testing.assert_array_equal(load_image(str(path), 224),
                                      adm_center_crop(path, 224), err_msg=f'{h} x {w}')


def test_dumps_see_adms_view_of_folder_images_and_the_probe_dinov2s_eval_view(trained, tmp_path,
                                                                             monkeypatch):
    from PIL import Image
    rng = np.random.default_rng(0)
    paths = []
    for c, (h, w) in [('a', (97, 150)), ('b', (120, 70))]:
        (tmp_path / 'folder' / 'val' / c).mkdir(parents=True)
        paths.append(tmp_path / 'folder' / 'val' / c / '0.png')
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / 'out'
    out.mkdir()
    shutil.copy(os.path.join(trained['out_dir'], 'tokenizer.pt'), out / 'tokenizer.pt')
    cfg = dict(trained, data_dir=str(tmp_path / 'folder'), out_dir=str(out), dump_split='val',
               probe_train_split='val', probe_eval_split='val')
    seen = []
    encode = T.SEMEncoder.encode
    monkeypatch.setattr(T.SEMEncoder, 'encode', lambda self, x: seen.append(x) or encode(self, x))
    S = trained['image_size']
    def as_input(a):
        return T.normalize(torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255)[0]
    T.dump(cfg)
    for x, path in zip(seen[0], paths):
        torch.testing.assert_close(x, as_input(adm_center_crop(path, S)))
    seen.clear()
    T.probe(cfg)   # short side 256/224 of S, central S x S
    big = round(S * 256 / 224)
    for x, path in zip(seen[0], paths):
        top = (big - S) // 2
        central = adm_center_crop(path, big)[top:top + S, top:top + S]
        torch.testing.assert_close(x, as_input(central))
    assert os.path.exists(out / 'probe_codes_val.npy')
