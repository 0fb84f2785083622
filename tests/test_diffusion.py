"""Claims about the image generator (diffusion.py): the DiT and its code embedder, loading the
public DiT weights, the samplers, guidance, training (DDP, resume) and its input checks."""
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from codes import write_codes
from conftest import ROOT, assert_two_runs_bitwise_equal, run_script
from configurator import UserError, configure
from test_vae import write_safetensors
import diffusion as D
from data.shapes import score as SC
import tokenizer as T


# -- the model -----------------------------------------------------------------------------

def tiny_dit(**kw):
    args = dict(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                learn_sigma=True, cond='dlc', L=5, V=7)
    args.update(kw)
    torch.manual_seed(0)
    model = D.DiT(**args).eval()
    for p in model.parameters():            # adaLN-Zero starts at the identity: perturb it
        p.data += 0.05 * torch.randn_like(p)
    return model


def test_the_code_embedding_is_the_mean_of_per_position_rows_and_the_null_code_is_row_V():
    model = tiny_dit()
    table = model.sem_embedder.embedding_table                          # (L, V+1, D)
    assert table.shape == (5, 8, 32)
    codes = torch.tensor([[0, 6, 3, 3, 1]])
    expected = torch.stack([table[l, codes[0, l]] for l in range(5)]).mean(0)
    assert torch.allclose(model.sem_embedder(codes)[0], expected)
    dropped = torch.full((1, 5), model.null)
    assert model.null == 7
    assert torch.allclose(model.sem_embedder(dropped)[0], table[:, 7].mean(0))
    one_hot = torch.nn.functional.one_hot(codes, 7).float()            # soft codes at a vertex
    assert torch.allclose(model.sem_embedder(one_hot), model.sem_embedder(codes), atol=1e-6)


def test_guidance_scale_one_is_the_conditional_model_and_guides_every_eps_channel():
    model = tiny_dit()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([10, 500, 999])
    y = torch.randint(0, 7, (3, 5))
    null = torch.full_like(y, model.null)
    both = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 1.0)
    assert torch.allclose(both[:3], model(x, t, y), atol=1e-5)
    out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]),
                                 4.0)[:3]
    cond, uncond = model(x, t, y), model(x, t, null)
    guided = uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3])
    assert torch.allclose(out[:, :3], guided, atol=1e-4)
    assert torch.allclose(out[:, 3:], cond[:, 3:], atol=1e-5)        # the variance is not guided


def test_the_guidance_interval_leaves_the_steps_outside_it_unguided():
    model = tiny_dit()
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 7, (2, 5))
    null = torch.full_like(y, model.null)
    for objective, t_low, t_high, scale in [('flow', 0.05, 0.5, 1000), ('eps', 50, 500, 1)]:
        fn = D.guided(model, y, 3.0, objective, interval=(0.1, 1.0))
        low, high = torch.full((2,), t_low), torch.full((2,), t_high)
        assert torch.allclose(fn(x, low), model(x, low * scale, y), atol=1e-6)
        cond, uncond = model(x, high * scale, y), model(x, high * scale, null)
        guided = uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3])
        assert torch.allclose(fn(x, high)[:, :3], guided, atol=1e-4)
    # the built-in config's 25 Euler steps with interval (0.1, 1): the last two (t = 0.08, 0.04)
    # unguided
    model = tiny_dit(learn_sigma=False)                     # a flow network: 3 output channels
    batches, plain = [], model.forward  # swapped, not hooked: forward_with_cfg calls self.forward
    model.forward = lambda x, t, y: batches.append(len(x)) or plain(x, t, y)
    D.sample(D.guided(model, y, 3.0, 'flow', (0.1, 1.0)), (3, 16, 16), [0, 1], 'flow', 'euler', 25,
             'cpu', flow_output='x0')
    model.forward = plain
    assert batches == [4] * 23 + [2] * 2


def dit_key_shapes(D_, depth, patch, in_channels, tokens, condition):
    """The exact key names and shapes of a learned-sigma DiT of facebookresearch/DiT's models.py
    (timm's PatchEmbed, Attention and Mlp: no parameters but these), with the condition's keys."""
    sd = {'pos_embed': (1, tokens, D_), 'x_embedder.proj.weight': (D_, in_channels, patch, patch),
          'x_embedder.proj.bias': (D_,), 't_embedder.mlp.0.weight': (D_, 256),
          't_embedder.mlp.0.bias': (D_,), 't_embedder.mlp.2.weight': (D_, D_),
          't_embedder.mlp.2.bias': (D_,), **condition}
    for i in range(depth):
        b = f'blocks.{i}.'
        sd.update({b + 'attn.qkv.weight': (3 * D_, D_), b + 'attn.qkv.bias': (3 * D_,),
                   b + 'attn.proj.weight': (D_, D_), b + 'attn.proj.bias': (D_,),
                   b + 'mlp.fc1.weight': (4 * D_, D_), b + 'mlp.fc1.bias': (4 * D_,),
                   b + 'mlp.fc2.weight': (D_, 4 * D_), b + 'mlp.fc2.bias': (D_,),
                   b + 'adaLN_modulation.1.weight': (6 * D_, D_),
                   b + 'adaLN_modulation.1.bias': (6 * D_,)})
    out = patch * patch * 2 * in_channels
    sd.update({'final_layer.linear.weight': (out, D_), 'final_layer.linear.bias': (out,),
               'final_layer.adaLN_modulation.1.weight': (2 * D_, D_),
               'final_layer.adaLN_modulation.1.bias': (2 * D_,)})
    return sd


def dit_s2_state_dict():
    """DiT-S/2 at 256 px (class-conditional: 32 x 32 x 4 latents, 1000 classes + the null)."""
    shapes = dit_key_shapes(384, 12, 2, 4, 256, {'y_embedder.embedding_table.weight': (1001, 384)})
    return {k: torch.randn(v) for k, v in shapes.items()}


def test_public_dit_s2_weights_load_strictly(tmp_path):
    sd = dit_s2_state_dict()
    path = tmp_path / 'DiT-S-2-256x256.pt'
    torch.save(sd, path)
    model = D.DiT(input_size=32, in_channels=4, cond='class', num_classes=1000, learn_sigma=True,
                  **D.DiT_models['DiT-S/2'])
    D.load_public_dit(model, str(path))
    assert set(model.state_dict()) == set(sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    out = model(torch.randn(1, 4, 32, 32), torch.tensor([5]), torch.tensor([3]))
    assert out.shape == (1, 8, 32, 32)
    with pytest.raises(FileNotFoundError, match='DiT-XL-2-256x256.pt'):
        D.load_public_dit(model, str(tmp_path / 'missing.pt'))


def test_the_paper_ditsem_weights_load_strictly_as_its_fork_saves_them(tmp_path):
    # the fork's DiTSEM (dit/models.py) is DiT with y_embedder = None and a SEMEmbedder whose one
    # parameter is the (L, V+1, D) table (V+1 rows: trained with class dropout 0.1)
    L, V, D_ = 5, 7, 32
    shapes = dit_key_shapes(D_, 2, 2, 4, 16, {'sem_embedder.embedding_table': (L, V + 1, D_)})
    new = lambda: D.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=D_, depth=2,
                        num_heads=2, cond='dlc', L=L, V=V)
    assert {k: tuple(v.shape) for k, v in new().state_dict().items()} == shapes
    sd = {k: torch.randn(v) for k, v in shapes.items()}
    # it trains a torch.compile'd model: model.safetensors and the EMA's custom_checkpoint_0.pkl
    # prefix every key with '_orig_mod.'
    compiled = {'_orig_mod.' + k: v for k, v in sd.items()}
    torch.save(compiled, tmp_path / 'custom_checkpoint_0.pkl')
    write_safetensors(tmp_path / 'model.safetensors', compiled)
    torch.save(sd, tmp_path / 'plain.pt')
    for name in ['custom_checkpoint_0.pkl', 'model.safetensors', 'plain.pt']:
        model = new()
        D.load_public_dit(model, str(tmp_path / name))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items()), name
    # and embeds a code as the fork does: one-hot (N, L, V+1) times each position's table, mean
    # over L
    codes = torch.tensor([[0, 6, 3, 3, 1], [7, 7, 7, 7, 7]])
    one_hot = torch.nn.functional.one_hot(codes, V + 1).float()
    expected = (one_hot.transpose(0, 1) @ sd['sem_embedder.embedding_table']).mean(0)
    assert torch.allclose(model.sem_embedder(codes), expected, atol=1e-6)


def test_the_null_token_starts_as_one_vector_shared_by_all_positions_as_in_the_paper():
    torch.manual_seed(0)
    L, V, D_ = 64, 16, 256
    embedder = D.SEMEmbedder(L, V, D_)
    table = embedder.embedding_table.detach()                          # (L, V+1, D)
    null = table[:, V]
    assert torch.equal(null, null[:1].expand_as(null))
    assert table[:, :V].std().item() == pytest.approx(D_ ** -0.5, rel=0.02)   # the rows: N(0, 1/D)
    # so the dropped code starts at norm ~1, a real code (a mean of L independent rows) at
    # ~1/sqrt(L)
    with torch.no_grad():
        dropped, code = embedder(torch.full((1, L), V)), embedder(torch.randint(0, V, (1, L)))
    assert 0.9 < dropped.norm() < 1.1
    assert 0.9 / 8 < code.norm() < 1.1 / 8


def test_a_hidden_layer_in_the_final_layer_adds_two_keys_and_comes_back_from_a_checkpoint(
        shapes_dir, codes_dir, tmp_path):
    plain, wide = tiny_dit(), tiny_dit(head_hidden=24)
    plain_keys, wide_keys = plain.state_dict(), wide.state_dict()
    assert set(wide_keys) - set(plain_keys) == {'final_layer.hidden.weight',
                                                'final_layer.hidden.bias'}
    assert set(plain_keys) <= set(wide_keys)         # head_hidden=0 keeps DiT's layout (test above)
    assert wide_keys['final_layer.hidden.weight'].shape == (24, 32)
    assert wide_keys['final_layer.linear.weight'].shape == (4 * 4 * 6, 24)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.randint(0, 7, (2, 5))
    assert wide(x, t, y).shape == plain(x, t, y).shape == (2, 6, 16, 16)
    cfg = tiny_cfg(shapes_dir, codes_dir, tmp_path, objective='flow', max_iters=2, head_hidden=24)
    model, _, _ = D.train(cfg)
    ckpt = D.load_checkpoint(str(tmp_path / 'diffusion.pt'))
    restored = D.model_from_checkpoint(ckpt, weights='model')
    assert restored.final_layer.hidden.out_features == 24
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in restored.state_dict().items())


def test_a_narrower_mlp_comes_back_from_its_checkpoint_and_a_ratio_too_small_is_refused(
        shapes_dir, codes_dir, tmp_path):
    cfg = tiny_cfg(shapes_dir, codes_dir, tmp_path, objective='flow', max_iters=2, mlp_ratio=2.0)
    model, _, _ = D.train(cfg)
    assert model.blocks[0].mlp.fc1.out_features == 2 * 128        # DiT-Ti/8: width 128
    restored = D.model_from_checkpoint(D.load_checkpoint(str(tmp_path / 'diffusion.pt')), 'model')
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in restored.state_dict().items())
    with pytest.raises(UserError, match='mlp_ratio=0.0'):
        D.train(dict(cfg, mlp_ratio=0.0, out_dir=str(tmp_path / 'refused')))
    assert not os.path.exists(tmp_path / 'refused')


# -- samplers, with the exact denoiser of Gaussian data ------------------------------------

MU = torch.tensor([0.5, -0.3, 0.0, 0.2]).view(1, 4, 1, 1)
STD = torch.tensor([0.6, 1.2, 0.3, 1.0]).view(1, 4, 1, 1)


def exact_eps(x, t, diffusion):
    """E[eps | x_t] for x_0 ~ N(MU, STD^2) per channel, plus v = -1 (posterior variance)."""
    abar = torch.as_tensor(diffusion.abar, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    eps = (1 - abar).sqrt() * (x - abar.sqrt() * MU) / (abar * STD ** 2 + 1 - abar)
    return torch.cat([eps, -torch.ones_like(eps)], dim=1)


def exact_velocity(x, t):
    """E[noise - x_0 | x_t] for x_t = (1 - t) x_0 + t noise."""
    t = t.view(-1, 1, 1, 1)
    var = (1 - t) ** 2 * STD ** 2 + t ** 2
    centered = x - (1 - t) * MU
    return t * centered / var - (MU + (1 - t) * STD ** 2 * centered / var)


def exact_x0(x, t):
    """E[x_0 | x_t], what a flow network with flow_output='x0' predicts."""
    t = t.view(-1, 1, 1, 1)
    return MU + (1 - t) * STD ** 2 * (x - (1 - t) * MU) / ((1 - t) ** 2 * STD ** 2 + t ** 2)


@pytest.mark.parametrize('objective, sampler, steps, output', [
    ('eps', 'ddpm', 250, None), ('eps', 'ddim', 100, None), ('flow', 'euler', 100, 'velocity'),
    ('flow', 'heun', 30, 'velocity'), ('flow', 'euler', 100, 'x0'), ('flow', 'heun', 30, 'x0')])
def test_samplers_driven_by_the_exact_denoiser_reproduce_gaussian_data(objective, sampler, steps,
                                                                        output):
    full = D.GaussianDiffusion.linear()
    fn = {None: lambda x, t: exact_eps(x, t, full), 'velocity': exact_velocity,
          'x0': exact_x0}[output]
    x = D.sample(fn, (4, 1, 1), range(3000), objective, sampler, steps, 'cpu',
                 flow_output=output or 'velocity')
    mean, std = x.mean(dim=0).view(4), x.std(dim=0).view(4)
    assert torch.allclose(mean, MU.view(4), atol=0.06), mean
    assert torch.allclose(std, STD.view(4), rtol=0.08), std


def test_respacing_keeps_the_timesteps_dit_keeps_and_refuses_a_single_step():
    full = D.GaussianDiffusion.linear()
    assert list(full.respaced(1000).timesteps) == list(range(1000))
    spaced = full.respaced(250)                     # DiT's default: stride 999 / 249, rounded
    assert list(spaced.timesteps[:4]) == [0, 4, 8, 12]
    assert list(spaced.timesteps[-3:]) == [991, 995, 999]
    # DiT sums the stride in floating point: ten strides of 49.95 fall just short of 499.5
    assert list(full.respaced(21).timesteps[9:12]) == [450, 499, 549]
    assert np.allclose(np.cumprod(1 - spaced.betas), full.abar[spaced.timesteps], rtol=1e-12)
    # one step would keep t = 0 alone (DiT's space_timesteps does, then its samplers fail on it)
    for steps in [0, 1, 1001]:
        with pytest.raises(ValueError, match=f'num_sampling_steps={steps}: .*2 to 1000 steps'):
            full.respaced(steps)
    with pytest.raises(ValueError, match='num_sampling_steps=1'):
        D.sample(lambda x, t: x, (4, 1, 1), range(2), 'eps', 'ddpm', 1, 'cpu')


def test_the_velocity_of_the_exact_clean_image_prediction_is_the_exact_velocity():
    x, t = torch.randn(16, 4, 1, 1), torch.rand(16) * 0.9 + 0.05
    u = D.flow_velocity(exact_x0(x, t), x, t, 'x0')
    assert torch.allclose(u, exact_velocity(x, t), atol=1e-5)


def test_a_sample_depends_on_its_seed_only_not_on_its_batch():
    model = tiny_dit()
    y = torch.randint(0, 7, (4, 5))
    fn = D.guided(model, y, 2.0, 'eps')
    batch = D.sample(fn, (3, 16, 16), [11, 12, 13, 14], 'eps', 'ddpm', 10, 'cpu')
    alone = D.sample(D.guided(model, y[2:3], 2.0, 'eps'), (3, 16, 16), [13], 'eps', 'ddpm', 10,
                     'cpu')
    assert torch.allclose(batch[2:3], alone, atol=1e-5)


def test_the_loss_is_the_eps_mse_plus_the_vlb_and_the_vlb_trains_the_variance_alone():
    full = D.GaussianDiffusion.linear()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(40, 216, (8, 4, 2, 2), generator=gen).float() / 127.5 - 1   # 8-bit levels
    t = torch.tensor([0, 0, 1, 2, 3, 5, 8, 10])                # small t, where the VLB weighs most
    noise = torch.randn(x0.shape, generator=gen)
    x_t = full.q_sample(x0, t, noise)
    eps_hat = noise + 0.3 * torch.randn(x0.shape, generator=gen)
    v = 2 * torch.rand(x0.shape, generator=gen) - 1         # the variance output, in [-1, 1]
    out = torch.cat([eps_hat, v], dim=1).requires_grad_(True)
    loss = full.training_losses(out, x0, x_t, t, noise)

    # DiT's _vb_terms_bpd written out from the schedule, in float64: KL(q(x_{t-1} | x_t, x_0) ||
    # p(x_{t-1} | x_t)) in bits per dimension, and at t = 0 the discretized decoder NLL instead
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    tilde = betas * (1 - abar_prev) / (1 - abar)
    at = lambda a: torch.as_tensor(a)[t].view(-1, 1, 1, 1)
    b, a, ap = at(betas), at(abar), at(abar_prev)
    log_tilde = at(np.log(np.append(tilde[1], tilde[1:])))
    x0_, x_t_, eps_, v_ = x0.double(), x_t.double(), eps_hat.double(), v.double()
    mean_of = lambda start: (b * ap.sqrt() * start + (1 - ap) * (1 - b).sqrt() * x_t_) / (1 - a)
    true_mean, model_mean = mean_of(x0_), mean_of((x_t_ - (1 - a).sqrt() * eps_) / a.sqrt())
    model_log_var = (v_ + 1) / 2 * b.log() + (1 - v_) / 2 * log_tilde
    kl = 0.5 * (-1 + model_log_var - log_tilde + (log_tilde - model_log_var).exp()
                + (true_mean - model_mean) ** 2 * (-model_log_var).exp())
    std = (0.5 * model_log_var).exp()
    Phi = torch.special.ndtr
    nll = -torch.log(Phi((x0_ - model_mean + 1 / 255) / std)
                     - Phi((x0_ - model_mean - 1 / 255) / std))
    vb = torch.where(t == 0, nll.mean(dim=(1, 2, 3)), kl.mean(dim=(1, 2, 3))) / math.log(2)
    mse = (noise - eps_hat).pow(2).mean(dim=(1, 2, 3))
    assert torch.all(vb > 0.005), vb                 # at every t, far above the tolerance below
    # (DiT's CDF is a tanh approximation: within 1e-3 of the exact one, relative)
    torch.testing.assert_close(loss.double(), mse.double() + vb, rtol=1e-3, atol=1e-5)

    # the VLB sees eps through a detached copy (DiT's frozen_out): eps gets the MSE's gradient only,
    # the variance output gets the VLB's
    loss.sum().backward()
    torch.testing.assert_close(out.grad[:, :4], -2 * (noise - eps_hat) / 16, rtol=1e-5, atol=1e-7)
    assert out.grad[:, 4:].abs().mean() > 1e-3

    # with the true eps and v = -1 (the posterior variance) both terms vanish for t >= 1
    exact = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    assert full.training_losses(exact, x0, x_t, t, noise)[t > 0].abs().max() < 1e-4


# -- training ------------------------------------------------------------------------------

def tiny_cfg(shapes_dir, codes_dir, out_dir, **overrides):
    cfg = dict(D.CONFIG, data_dir=shapes_dir, codes_dir=str(codes_dir), out_dir=str(out_dir),
               device='cpu', model='DiT-Ti/8', image_size=32, cond='dlc', objective='eps',
               batch_size=16, micro_batch_size=8, max_iters=4, learning_rate=1e-3, ema_decay=0.9,
               sample_interval=0, log_interval=1, ckpt_interval=2, num_sampling_steps=5,
               sampler='euler' if overrides.get('objective') == 'flow' else 'ddpm')
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope='module')
def codes_dir(shapes_dir, tmp_path_factory):
    """A tiny tokenizer and its dumps of the test dataset's train and val splits."""
    out = tmp_path_factory.mktemp('tok')
    cfg = dict(T.CONFIG, data_dir=shapes_dir, out_dir=str(out), device='cpu', patch_size=8,
               embed_dim=32, depth=1, num_heads=2, image_size=32, L=4, V=8, ssl_loss='infonce',
               n_local_crops=0, head_hidden_dim=32, head_bottleneck_dim=16, batch_size=32,
               max_iters=1, warmup_iters=1,
               color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0, 0.0),
               solarize_prob=(0.0, 0.0, 0.0), log_interval=1)
    T.train(cfg)
    T.dump(dict(cfg, dump_split='train,val'))
    return out


def as_args(cfg):
    return [f'--{k}={v!r}' if isinstance(v, (str, tuple)) else f'--{k}={v}'
            for k, v in cfg.items() if v != D.CONFIG[k]]


@pytest.mark.parametrize('objective', ['eps', 'flow'])
def test_two_processes_take_the_same_step_as_one_with_accumulation(shapes_dir, codes_dir, tmp_path,
                                                                    objective):
    # one process: 2 micro-batches of 8 accumulated; two processes: one micro-batch of 8 each
    one = tiny_cfg(shapes_dir, codes_dir, tmp_path / 'one', objective=objective, max_iters=2)
    two = tiny_cfg(shapes_dir, codes_dir, tmp_path / 'two', objective=objective, max_iters=2)
    for cfg, nproc in [(one, 1), (two, 2)]:
        run_script('diffusion.py', as_args(cfg), nproc)
    a = torch.load(tmp_path / 'one' / 'diffusion.pt', weights_only=True)
    b = torch.load(tmp_path / 'two' / 'diffusion.pt', weights_only=True)
    assert (a['world_size'], b['world_size']) == (1, 2)    # one run of two processes, split
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], rtol=1e-5, atol=1e-6, msg=k)
    assert max((a['model'][k] - a['ema'][k]).abs().max().item() for k in a['model']) > 0


@pytest.mark.parametrize('objective', ['eps', 'flow'])
def test_stop_and_resume_equals_an_uninterrupted_run(shapes_dir, codes_dir, tmp_path, objective):
    straight = tiny_cfg(shapes_dir, codes_dir, tmp_path / 'a', objective=objective, max_iters=6)
    D.train(straight)
    split = tiny_cfg(shapes_dir, codes_dir, tmp_path / 'b', objective=objective, max_iters=6,
                     run_iters=3)
    D.train(split)
    D.train(dict(split, init_from='resume', run_iters=-1))
    a = torch.load(tmp_path / 'a' / 'diffusion.pt', weights_only=True)
    b = torch.load(tmp_path / 'b' / 'diffusion.pt', weights_only=True)
    assert a['iter_num'] == b['iter_num'] == 6
    for part in ['model', 'ema']:
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_training_on_pixels_lowers_the_loss_and_writes_a_sample_grid(shapes_dir, codes_dir,
                                                                      tmp_path):
    cfg = tiny_cfg(shapes_dir, codes_dir, tmp_path, objective='flow', max_iters=40,
                   sample_interval=40, n_grid=4, learning_rate=2e-3, log_interval=1,
                   clip_denoised=True, sampler='euler')
    _, _, history = D.train(cfg)
    losses = [h['loss'] for h in history]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
    assert (tmp_path / 'samples_0000040.png').exists()
    ckpt = D.load_checkpoint(str(tmp_path / 'diffusion.pt'))
    assert ckpt['L'] == 4 and ckpt['V'] == 8 and ckpt['space'] == 'pixel' and ckpt['cond'] == 'dlc'
    recons = D.recon(dict(cfg, split='val', n_recon=8, micro_batch_size=4))
    assert (tmp_path / 'recon_val.png').exists()
    assert np.array_equal(np.load(tmp_path / 'recon_val.npz')['arr_0'], recons)
    # the scorer reads the written reconstructions against the split's items
    scores = SC.score_images(str(tmp_path / 'recon_val.npz'), shapes_dir, 'val')
    assert set(scores) >= {'valid', 'shape', 'shape_and_color'}
    # any code dump (here the val codes again, as prior samples would be) decodes to images
    codes_path = tmp_path / 'some_codes.npy'
    np.save(codes_path, np.load(os.path.join(codes_dir, 'codes_val.npy'))[:6])
    D.decode(dict(cfg, mode='decode', codes_path=str(codes_path), micro_batch_size=4))
    assert np.load(tmp_path / 'some_codes_images.npz')['arr_0'].shape == (6, 32, 32, 3)
    scores = SC.score_images(str(tmp_path / 'some_codes_images.npz'), shapes_dir)
    assert 'valid' in scores and 'tv_shape' in scores
    np.save(codes_path, np.full((6, 4), 8, dtype=np.uint16))
    with pytest.raises(ValueError, match='V=8'):
        D.decode(dict(cfg, mode='decode', codes_path=str(codes_path)))


def test_decode_draws_every_code_of_the_dump_into_out_dir_and_resumes_on_two_processes(
        shapes_dir, codes_dir, tmp_path, monkeypatch):
    cfg = tiny_cfg(shapes_dir, codes_dir, tmp_path / 'dit', max_iters=1, n_recon=3,
                   micro_batch_size=4)
    D.train(cfg)
    (tmp_path / 'prior').mkdir()
    codes_path = tmp_path / 'prior' / 'samples.npy'
    np.save(codes_path, np.load(os.path.join(codes_dir, 'codes_val.npy'))[:10])
    cfg = dict(cfg, mode='decode', codes_path=str(codes_path))
    with monkeypatch.context() as m:
        m.setattr(D.shutil, 'rmtree', lambda path: None)        # keep the chunks, as a kill would
        one = D.decode(cfg)
    assert one.shape == (10, 32, 32, 3)                 # all 10, not the first n_recon
    assert np.array_equal(np.load(tmp_path / 'dit' / 'samples_images.npz')['arr_0'], one)
    assert sorted(os.listdir(tmp_path / 'prior')) == ['samples.npy']     # nothing beside the dump
    # a run killed after chunk 1 of 3, relaunched on two processes: they draw only 0 and 2
    parts = tmp_path / 'two' / 'samples_images.parts'
    parts.mkdir(parents=True)
    shutil.copy(tmp_path / 'dit' / 'diffusion.pt', tmp_path / 'two')
    for name in ('run.json', '000001.npz'):
        shutil.copy(tmp_path / 'dit' / 'samples_images.parts' / name, parts)
    result = run_script('diffusion.py', as_args(dict(cfg, out_dir=str(tmp_path / 'two'))), nproc=2)
    assert result.stdout.count('drew 1 of 3 chunks') == 2, result.stdout
    assert np.array_equal(np.load(tmp_path / 'two' / 'samples_images.npz')['arr_0'], one)
    assert not parts.exists()


@pytest.mark.parametrize('bad, message', [
    (lambda c: c[:, :3], r'shape \(512, 3\).*L=4'),
    (lambda c: np.where(c == c.max(), 8, c).astype(np.uint16), r'token 8 >= V=8'),
    (lambda c: c[:100], r'100 codes.*512'),
])
def test_codes_that_do_not_match_the_tokenizer_or_the_data_are_refused(shapes_dir, codes_dir,
                                                                        tmp_path, bad, message):
    good = np.load(os.path.join(codes_dir, 'codes_train.npy'))
    bad_dir = tmp_path / 'codes'
    bad_dir.mkdir()
    shutil.copy(os.path.join(codes_dir, 'codes.json'), bad_dir / 'codes.json')
    np.save(bad_dir / 'codes_train.npy', bad(good))
    with pytest.raises(ValueError, match=message) as err:
        D.train(tiny_cfg(shapes_dir, bad_dir, tmp_path / 'out'))
    assert 'codes_train.npy' in str(err.value) and 'tokenizer.py --mode=dump' in str(err.value)


def test_the_imagenet_config_trains_with_the_recipe_of_the_paper_fork():
    cfg = configure(D.CONFIG, [os.path.join(ROOT, 'config', 'diffusion_imagenet.py')])
    # dit/train_diffusion.py and dit/train_scripts/launch_dit_L512.sh of the paper's code
    paper = dict(model='DiT-XL/2', image_size=256, cond='dlc', objective='eps', learn_sigma=True,
                 class_dropout_prob=0.1, batch_size=256, learning_rate=1e-4, weight_decay=0.0,
                 warmup_iters=0, ema_decay=0.9999, ema_warmup=False, grad_clip=0.0,
                 max_iters=100 * (1_281_167 // 256), sampler='ddpm', num_sampling_steps=250,
                 optimizer='adamw', cooldown_frac=0.0, mlp_ratio=4.0)
    assert {k: cfg[k] for k in paper} == paper


def test_without_the_warm_up_the_ema_takes_one_minus_its_decay_from_the_first_step(shapes_dir,
                                                                                    codes_dir,
                                                                                    tmp_path):
    for warmup, weight in [(False, 0.1), (True, 0.9)]:      # the warm-up's decay at step 0: 1 / 10
        cfg = tiny_cfg(shapes_dir, codes_dir, tmp_path / str(warmup), max_iters=1, ema_decay=0.9,
                       ema_warmup=warmup)
        model, ema, _ = D.train(cfg)
        torch.manual_seed(cfg['seed'])                     # the trainer's initial network, again
        ckpt = D.load_checkpoint(str(tmp_path / str(warmup) / 'diffusion.pt'))
        init = D.DiT(**ckpt['model_args']).state_dict()
        for k, v in ema.state_dict().items():
            want = (1 - weight) * init[k] + weight * model.state_dict()[k]
            torch.testing.assert_close(v, want, msg=k)
    assert D.ema_decay_at(89990, dict(D.CONFIG, ema_warmup=True)) == 0.9999


def test_the_learning_rate_warms_up_then_stays_constant():
    c = dict(D.CONFIG, learning_rate=1e-3, warmup_iters=10, max_iters=110)
    lrs = [D.learning_rate_at(it, c, 1e-3) for it in range(111)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[4] == pytest.approx(5e-4)
    assert lrs[9] == lrs[10] == lrs[60] == lrs[110] == 1e-3


def test_the_cooldown_takes_the_learning_rate_linearly_to_zero_at_the_end():
    c = dict(D.CONFIG, warmup_iters=10, max_iters=110, cooldown_frac=0.5)
    lrs = [D.learning_rate_at(it, c, 2e-3) for it in range(110)]
    assert lrs[9] == lrs[54] == 2e-3                       # warm-up done, stable until 55
    assert lrs[55] == pytest.approx(2e-3) and lrs[82] == pytest.approx(1e-3, rel=0.05)
    assert all(a > b for a, b in zip(lrs[55:], lrs[56:])) and lrs[109] < 5e-5


def test_muon_orthogonalizes_each_matrix_of_a_batch():
    """Newton-Schulz maps every matrix near U V^T: singular values near 1 (Muon's quintic
    iteration leaves them in about (0.6, 1.2)), whatever their scale and shape."""
    torch.manual_seed(0)
    for shape in ((3, 64, 128), (2, 384, 128)):
        G = torch.randn(*shape) * torch.tensor([1e-3, 10.0, 1.0][:shape[0]]).view(-1, 1, 1)
        s = torch.linalg.svdvals(D.orthogonalize(G))
        assert s.min() > 0.5 and s.max() < 1.3
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)           # and aligned with U V^T
        cos = (D.orthogonalize(G) * (U @ Vh)).sum((1, 2)) / (U @ Vh).norm(dim=(1, 2)) ** 2
        assert (cos > 0.8).all()


def test_muon_trains_the_blocks_matrices_and_adamw_the_rest_and_both_resume(shapes_dir, codes_dir,
                                                                             tmp_path):
    cfg = tiny_cfg(shapes_dir, codes_dir, tmp_path / 'm', optimizer='muon', max_iters=4)
    D.train(cfg)
    ckpt = D.load_checkpoint(str(tmp_path / 'm' / 'diffusion.pt'))
    muon_ids = {i for g in ckpt['muon']['param_groups'] for i in g['params']}
    model = D.DiT(**ckpt['model_args'])
    opts = D.make_optimizers(model, cfg)
    assert len(opts) == 2 and all(p.ndim == 2 for p in opts[1].param_groups[0]['params'])
    assert len(muon_ids) == 5 * len(model.blocks)     # qkv, proj, fc1, fc2, adaLN per block
    D.train(dict(cfg, max_iters=6, init_from='resume'))
    assert D.load_checkpoint(str(tmp_path / 'm' / 'diffusion.pt'))['iter_num'] == 6


def test_the_condition_tables_can_train_at_a_multiple_of_the_lr():
    cfg = dict(D.CONFIG, learning_rate=1e-3, cond_lr_mult=10.0)
    model = tiny_dit()
    (adamw,) = D.make_optimizers(model, cfg)
    table = model.sem_embedder.embedding_table
    peak = {id(p): g['peak_lr'] for g in adamw.param_groups for p in g['params']}
    assert peak[id(table)] == pytest.approx(1e-2) and peak[id(model.x_embedder.proj.weight)] == 1e-3
    assert len(peak) == sum(p.requires_grad for p in model.parameters())   # each trained one, once


def test_flow_draws_its_training_t_from_a_logit_normal_of_constant_mean():
    c = dict(D.CONFIG, objective='flow', flow_t_mean=0.8, flow_t_std=0.8, batch_size=4096)
    for it in (0, c['max_iters'] - 1):
        t, _, _ = D.draw_global_batch(it, c, (1, 1, 1))
        logit = torch.logit(t.double())
        assert abs(logit.mean().item() - 0.8) < 0.05 and abs(logit.std().item() - 0.8) < 0.05
    t, _, _ = D.draw_global_batch(0, dict(c, flow_t_std=0.0), (1, 1, 1))
    assert 0.45 < t.mean().item() < 0.55 and t.min() >= 0 and t.max() < 1    # uniform


def test_bench_reports_dit_training_throughput():
    result = subprocess.run([sys.executable, 'bench.py', '--model=DiT-Ti/8', '--image_size=32',
                             '--batch_size=4', '--steps=1', '--warmup=1', '--L=4', '--V=8'],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'img/s' in result.stdout and 'TFLOP/s' in result.stdout


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shapes_dir, codes_dir,
                                                                     tmp_path, monkeypatch):
    cfg = tiny_cfg(shapes_dir, codes_dir, tmp_path, objective='flow', max_iters=8, ckpt_interval=2,
                   micro_batch_size=16)
    real, calls = D.flow_loss, []
    def loss_that_turns_nan(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float('nan') if len(calls) == 4 else loss
    monkeypatch.setattr(D, 'flow_loss', loss_that_turns_nan)
    with pytest.raises(FloatingPointError, match=r'loss is nan.*at iteration 3.*diffusion.pt'):
        D.train(cfg)
    state = torch.load(tmp_path / 'diffusion.pt', weights_only=True)
    assert state['iter_num'] == 2
    assert all(torch.isfinite(v).all() for v in state['model'].values())


def test_two_runs_on_the_same_codes_end_with_bitwise_equal_weights(shapes_dir, codes_dir,
                                                                   tmp_path):
    # the code embedding's backward once summed in an order that changed from run to run
    assert_two_runs_bitwise_equal(D.train, [tiny_cfg(shapes_dir, codes_dir, tmp_path / run,
                                                     max_iters=6, batch_size=64,
                                                     micro_batch_size=64) for run in 'ab'],
                                  'diffusion.pt')
