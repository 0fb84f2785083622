"""Claims about the discrete prior (prior.py): the score-entropy loss, the samplers against an
exactly known distribution, infilling, loading SEDD weights, and training (DDP, resume, checks)."""
import itertools
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from codes import write_codes
from conftest import (ROOT, assert_two_runs_bitwise_equal, kill_then_continue_on_two,
                      run_script)
import prior as P


# -- the loss ------------------------------------------------------------------------------

def test_score_entropy_is_non_negative_and_zero_at_the_true_score():
    torch.manual_seed(0)
    V, B, T = 6, 64, 5
    x0 = torch.randint(0, V, (B, T))
    sigma = torch.rand(B) * 5 + 0.01
    x_t = torch.where(torch.rand(B, T) < 0.6, V, x0)
    assert (x_t == V).any() and (x_t != V).any()
    random_scores = torch.randn(B, T, V + 1) * 3
    loss = P.score_entropy(random_scores, sigma, x_t, x0, V)
    assert (loss >= 0).all() and (loss[x_t != V] == 0).all() and (loss[x_t == V] > 0).all()
    # given x0, the true ratio at a masked position is onehot(x0) / (e^sigma - 1)
    a = 1 / torch.expm1(sigma)
    true = torch.full((B, T, V + 1), -1e4)
    true.scatter_(-1, x0[..., None], a.log()[:, None, None].expand(B, T, 1))
    assert P.score_entropy(true, sigma, x_t, x0, V).abs().max() < 1e-5


def test_the_expected_loss_is_minimized_by_the_ratios_of_the_denoising_distribution():
    # one masked token whose clean value is y ~ p0: E_y[loss] is smallest at
    # s = log(p0 / (e^sigma - 1))
    V, sigma = 5, torch.tensor([0.7])
    p0 = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    def expected_loss(s):
        masked = torch.tensor([[V]])
        return sum(p0[y] * P.score_entropy(s, sigma, masked, torch.tensor([[y]]), V).sum()
                   for y in range(V))
    best = torch.cat([(p0 / torch.expm1(sigma)).log(), torch.zeros(1)]).view(1, 1, V + 1)
    best.requires_grad_(True)
    expected_loss(best).backward()
    assert best.grad.abs().max() < 1e-6
    for _ in range(5):
        other = best.detach() + 0.3 * torch.randn_like(best)
        assert expected_loss(other) > expected_loss(best.detach())


# -- the samplers, driven by the exact ratios of a known distribution --------------------------

L_TOY, V_TOY = 3, 3
SEQS = torch.tensor(list(itertools.product(range(V_TOY), repeat=L_TOY)))       # all 27 sequences
PROB = (torch.rand(len(SEQS), generator=torch.Generator().manual_seed(0)) ** 3).double()
PROB /= PROB.sum()


def exact_log_ratios(x, sigma):
    """log p0(x_l = y | the unmasked tokens of x) - log(e^sigma - 1), by enumeration."""
    weights = ((x[:, None] == V_TOY) | (x[:, None] == SEQS[None])).all(-1).double() * PROB[None]
    out = torch.zeros(len(x), L_TOY, V_TOY + 1, dtype=torch.float64)
    for l in range(L_TOY):
        cond = weights @ F.one_hot(SEQS[:, l], V_TOY).double()
        out[:, l, :V_TOY] = (cond / cond.sum(1, keepdim=True)).clamp_min(1e-30).log()
    out[..., :V_TOY] -= torch.expm1(sigma.double()).log()[:, None, None]
    return out.scatter(-1, x[..., None], 0.0)


def tv_to(codes, prob):
    index = (codes * torch.tensor([V_TOY ** 2, V_TOY, 1])).sum(1)
    empirical = torch.bincount(index, minlength=len(SEQS)).double() / len(codes)
    return 0.5 * (empirical - prob).abs().sum().item()


@pytest.mark.parametrize('sampler', ['analytic', 'euler'])
def test_samplers_with_the_exact_score_reproduce_the_distribution(sampler):
    n = 4000
    codes = P.sample(exact_log_ratios, n, L_TOY, V_TOY, 64, range(n), sampler)
    assert codes.min() >= 0 and codes.max() < V_TOY                       # no mask survives
    # the expected TV of n draws is below 0.4 sqrt(K / n); sqrt(K / n) leaves room for the steps
    assert tv_to(codes, PROB) < math.sqrt(len(SEQS) / n)
    # one step unmasks every token independently: the dependence between positions is lost
    assert tv_to(P.sample(exact_log_ratios, n, L_TOY, V_TOY, 1, range(n), sampler), PROB) > 0.15


def test_the_random_order_sampler_reproduces_the_distribution_and_a_low_temperature_sharpens_it():
    n = 4000
    codes = P.sample(exact_log_ratios, n, L_TOY, V_TOY, L_TOY, range(n), 'random_order')
    assert codes.min() >= 0 and codes.max() < V_TOY
    assert tv_to(codes, PROB) < math.sqrt(len(SEQS) / n)
    # all at once, each token from its own marginal: the dependence between positions is lost
    at_once = P.sample(exact_log_ratios, n, L_TOY, V_TOY, 1, range(n), 'random_order')
    assert tv_to(at_once, PROB) > 0.15
    # T = 0.2 piles the draws onto the likeliest sequences: the top one far above its probability
    cold = P.sample(exact_log_ratios, n, L_TOY, V_TOY, L_TOY, range(n), 'random_order',
                    temperature=0.2)
    top = PROB.argmax()
    assert (cold == SEQS[top]).all(1).double().mean() > PROB[top] + 0.2
    assert_infills(n, L_TOY, sampler='random_order')


def test_the_confidence_sampler_fills_the_surest_position_first_and_keeps_the_distribution():
    n = 4000
    seen = []

    def recording(x, sigma):
        seen.append(x.clone())
        return exact_log_ratios(x, sigma)
    codes = P.sample(recording, n, L_TOY, V_TOY, L_TOY, range(n), 'confidence')
    # the order depends only on the tokens already drawn, so exact conditionals stay exact
    assert codes.min() >= 0 and codes.max() < V_TOY
    assert tv_to(codes, PROB) < math.sqrt(len(SEQS) / n)
    # step 1 fills, in every sequence, the position whose marginal peaks highest
    peak = exact_log_ratios(seen[0][:1], torch.tensor([1.0]))[0, :, :V_TOY].exp().amax(-1)
    filled = (seen[1] != V_TOY).double().mean(0)
    assert filled.argmax() == peak.argmax() and filled.max() == 1 and filled.sum() == 1
    assert [int((x != V_TOY).sum(1).max()) for x in seen] == list(range(L_TOY))    # one a step
    assert_infills(n, L_TOY, sampler='confidence')


def assert_infills(n, steps, **kw):
    """With position 1 given as token 2: kept, and the rest drawn from the conditional."""
    given = torch.full((n, L_TOY), -1)
    given[:, 1] = 2
    codes = P.sample(exact_log_ratios, n, L_TOY, V_TOY, steps, range(n), given=given, **kw)
    assert (codes[:, 1] == 2).all()
    conditional = PROB * (SEQS[:, 1] == 2)
    assert tv_to(codes, conditional / conditional.sum()) < math.sqrt(V_TOY ** 2 / n)


def test_infilling_keeps_the_given_tokens_and_samples_the_conditional():
    assert_infills(3000, 48, remask_eta=0.05)


def test_the_remasking_corrector_keeps_the_distribution():
    n = 4000
    codes = P.sample(exact_log_ratios, n, L_TOY, V_TOY, 64, range(n), remask_eta=0.1)
    assert tv_to(codes, PROB) < math.sqrt(len(SEQS) / n)
    # and it does act: with the same seeds, many codes come out other than without it
    plain = P.sample(exact_log_ratios, 500, L_TOY, V_TOY, 64, range(500))
    assert (codes[:500] != plain).any(1).double().mean() > 0.3


def with_times(record, eps=1e-3):
    """exact_log_ratios, recording (t, x) of every call; t from sigma = -log(1 - (1 - eps) t)."""
    def fn(x, sigma):
        record.append((float(-torch.expm1(-sigma[0].double()) / (1 - eps)), x.clone()))
        return exact_log_ratios(x, sigma)
    return fn


def test_the_papers_corrector_moves_eta_times_the_unmasked_mass_from_the_top_entry_to_the_mask():
    eta = 0.02
    probs = torch.tensor([[0.50, 0.20, 0.10, 0.20],     # masked, a code likeliest
                          [0.10, 0.05, 0.05, 0.80],     # masked, the mask likeliest
                          [0.00, 1.00, 0.00, 0.00]],    # unmasked token 1: it stays put
                         dtype=torch.float64)
    out = P.paper_renoise(probs, eta)
    moved = eta * (1 - probs[:, -1])
    f64 = lambda values: torch.tensor(values, dtype=torch.float64)
    assert torch.allclose(out[0], probs[0] + moved[0] * f64([-1.0, 0, 0, 1]))
    assert torch.allclose(out[0].sum(), torch.tensor(1.0, dtype=torch.float64))          # mass kept
    # the fork's code: the mask's entry of the move is overwritten, so the mask only gains
    assert torch.allclose(out[1], probs[1] + moved[1] * f64([0.0, 0, 0, 1]))
    assert torch.allclose(out[2], f64([0, 1 - eta, 0, eta]))                # re-masked w.p. eta
    # on random peaked rows: mass kept, only the top code and the mask change, no code gains
    gen = torch.Generator().manual_seed(0)
    rows = torch.softmax(4 * torch.randn(200, 9, generator=gen, dtype=torch.float64), -1)
    rows = rows[rows[:, :-1].amax(-1) > rows[:, -1]]
    new = P.paper_renoise(rows, eta)
    top = rows.argmax(-1)
    assert torch.allclose(new.sum(-1), rows.sum(-1))
    assert torch.allclose(rows.gather(-1, top[:, None]) - new.gather(-1, top[:, None]),
                          eta * (1 - rows[:, -1:]))
    untouched = torch.ones_like(rows, dtype=torch.bool).scatter(-1, top[:, None], False)
    untouched[:, -1] = False
    assert torch.equal(new[untouched], rows[untouched]) and (new[:, :-1] <= rows[:, :-1]).all()


def test_the_papers_corrector_remasks_only_inside_its_window_and_still_samples_the_distribution():
    n, steps, eta = 500, 64, 0.05
    plain, paper = [], []
    base = P.sample(with_times(plain), n, L_TOY, V_TOY, steps, range(n), t_end=1e-5)
    codes = P.sample(with_times(paper), n, L_TOY, V_TOY, steps, range(n), t_end=1e-5,
                     corrector='paper', remask_eta=eta)
    remasked_inside = 0
    for (t, before), (_, after) in zip(paper[:-1], paper[1:]):          # the steps, from t
        remasked = int(((before != V_TOY) & (after == V_TOY)).sum())
        if 0.3 < t < 0.55:
            remasked_inside += remasked
        else:
            assert remasked == 0, t                 # outside the window: the plain analytic step
    assert remasked_inside > 20
    # up to the window, the very draws of the plain analytic sampler; from its first step on, others
    first = next(k for k, (t, _) in enumerate(paper) if t < 0.55)
    assert all(torch.equal(plain[k][1], paper[k][1]) for k in range(first + 1))
    assert not torch.equal(plain[first + 1][1], paper[first + 1][1])
    assert codes.min() >= 0 and codes.max() < V_TOY                       # no mask survives
    assert (codes != base).any(1).double().mean() > 0.3
    assert tv_to(codes, PROB) < math.sqrt(len(SEQS) / n)


def test_the_steps_end_at_t_end_while_the_schedule_keeps_its_eps():
    for t_end, last in [(1e-5, 1e-5), (None, 1e-3)]:
        record = []
        P.sample(with_times(record), 4, L_TOY, V_TOY, 8, range(4), eps=1e-3, t_end=t_end)
        times = [t for t, _ in record]
        assert len(times) == 9 and abs(times[0] - 1) < 1e-6      # 8 steps, then the final one
        assert abs(times[-1] - last) < 1e-3 * last, (t_end, times[-1])
        assert np.allclose(np.diff(times), -(1 - last) / 8, atol=1e-6)       # equal steps


def test_a_code_depends_on_its_seed_only_not_on_its_batch():
    model = tiny_model(dropout=0.0)
    fn = P.model_score_fn(model)
    together = P.sample(fn, 6, 8, 8, 10, [5, 6, 7, 8, 9, 10])
    alone = P.sample(fn, 2, 8, 8, 10, [7, 8])
    assert torch.equal(together[2:4], alone)


# -- the model -------------------------------------------------------------------------------

def tiny_model(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=8, seq_len=8, n_blocks=2, hidden_size=32, n_heads=2, cond_dim=16,
                dropout=0.0)
    args.update(kw)
    model = P.SEDD(**args).eval()
    for p in model.parameters():            # adaLN-Zero starts at the identity: perturb it
        p.data += 0.05 * torch.randn_like(p)
    return model


def test_the_network_gives_log_ratios_for_every_token_and_zero_for_staying():
    model = tiny_model()
    x = torch.tensor([[0, 8, 3, 8, 7, 8, 8, 1]])
    out = model(x, torch.tensor([1.3]))
    assert out.shape == (1, 8, 9) and out.dtype == torch.float32
    assert (out.gather(-1, x[..., None]) == 0).all()
    # scale_by_sigma: the untrained network guesses ratio 1 / (V (e^sigma - 1)) for every token
    fresh = P.SEDD(vocab_size=8, seq_len=8, n_blocks=1, hidden_size=16, n_heads=2, cond_dim=16)
    out = fresh(torch.full((1, 8), 8), torch.tensor([0.4]))
    uniform = torch.full((8,), -math.log(8 * math.expm1(0.4)))
    assert torch.allclose(out[0, 0, :8], uniform, atol=1e-5)


def ddit_body_shapes(n_tokens, d, blocks, cond):
    """SEDD's DDiT parameters after the embeddings, names and shapes by hand, in module order:
    the noise-level map, the blocks, the output layer (n_tokens = vocabulary + the mask)."""
    shapes = {'sigma_map.mlp.0.weight': (cond, 256), 'sigma_map.mlp.0.bias': (cond,),
              'sigma_map.mlp.2.weight': (cond, cond), 'sigma_map.mlp.2.bias': (cond,)}
    for i in range(blocks):
        shapes.update({f'blocks.{i}.norm1.weight': (d,), f'blocks.{i}.attn_qkv.weight': (3 * d, d),
                       f'blocks.{i}.attn_out.weight': (d, d), f'blocks.{i}.norm2.weight': (d,),
                       f'blocks.{i}.mlp.0.weight': (4 * d, d), f'blocks.{i}.mlp.0.bias': (4 * d,),
                       f'blocks.{i}.mlp.2.weight': (d, 4 * d), f'blocks.{i}.mlp.2.bias': (d,),
                       f'blocks.{i}.adaLN_modulation.weight': (6 * d, cond),
                       f'blocks.{i}.adaLN_modulation.bias': (6 * d,)})
    shapes.update({'output_layer.norm_final.weight': (d,),
                   'output_layer.linear.weight': (n_tokens, d),
                   'output_layer.linear.bias': (n_tokens,),
                   'output_layer.adaLN_modulation.weight': (2 * d, cond),
                   'output_layer.adaLN_modulation.bias': (2 * d,)})
    return shapes


def sedd_small_state_dict(vocab=50257, d=768, blocks=12, cond=128):
    """The key names and shapes of louaaron/sedd-small (absorbing: vocabulary + 1), by hand."""
    state = {'vocab_embed.embedding': (vocab + 1, d), 'rotary_emb.inv_freq': (d // 12 // 2,)}
    state.update(ddit_body_shapes(vocab + 1, d, blocks, cond))
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in state.items()}


def test_a_sedd_small_checkpoint_loads_with_every_key_but_the_position_embedding(tmp_path):
    state = sedd_small_state_dict()
    torch.save({'model': {'module.' + k: v for k, v in state.items()}, 'step': 1},
               tmp_path / 'checkpoint.pth')
    model = P.SEDD(vocab_size=50257, seq_len=64, **P.PRIOR_MODELS['small'])
    P.load_sedd(model, str(tmp_path / 'checkpoint.pth'))
    loaded = model.state_dict()
    assert set(loaded) == set(state) | {'pos_embed'}
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    del state['blocks.3.attn_out.weight']
    torch.save(state, tmp_path / 'broken.pth')
    with pytest.raises(ValueError, match='blocks.3.attn_out.weight'):
        P.load_sedd(model, str(tmp_path / 'broken.pth'))
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        P.load_sedd(model, str(tmp_path / 'nowhere.pth'))


def fork_parameters(L, V, d, blocks, heads, cond, seed):
    """The parameters of the paper's SEDD fork (sedd/model/transformer.py, shared_embedding), names
    and shapes by hand, in its order: pos_embed (L, D) first, then its modules in turn."""
    shapes = {'pos_embed': (L, d), 'vocab_embed.embedding': (V + 1, d)}
    shapes.update(ddit_body_shapes(V + 1, d, blocks, cond))
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) * 0.1 + (1.0 if 'norm' in k else 0.0)
            for k, shape in shapes.items()}


def test_a_checkpoint_of_the_papers_sedd_fork_loads_strictly_with_its_ema_weights(tmp_path):
    L, V, d, heads, cond = 6, 8, 32, 2, 16
    weights, ema = (fork_parameters(L, V, d, 2, heads, cond, seed) for seed in (0, 1))
    # its state dict: the rotary buffer right after sigma_map (module order), as run_train saves it
    model_state = {}
    for k, v in weights.items():
        model_state[k] = v
        if k == 'sigma_map.mlp.2.bias':
            head = d // heads
            inv_freq = 1.0 / 10000 ** (torch.arange(0, head, 2).float() / head)
            model_state['rotary_emb.inv_freq'] = inv_freq
    torch.save({'optimizer': {}, 'model': model_state, 'step': 7,
                'ema': {'decay': 0.9999, 'num_updates': 7, 'shadow_params': list(ema.values())}},
               tmp_path / 'checkpoint.pth')
    model = P.SEDD(vocab_size=V, seq_len=L, n_blocks=2, hidden_size=d, n_heads=heads, cond_dim=cond,
                   dropout=0.0).eval()
    P.load_sedd(model, str(tmp_path / 'checkpoint.pth'))
    loaded = model.state_dict()
    assert set(loaded) == set(model_state)                          # strictly: no key missing
    for k, v in ema.items():                                        # the EMA, as the fork samples
        assert torch.equal(loaded[k].reshape(v.shape), v), k
    assert torch.equal(loaded['pos_embed'][0, 3], ema['pos_embed'][3])      # position l is row l
    # the same outputs as a network given those weights by hand
    by_hand = P.SEDD(vocab_size=V, seq_len=L, n_blocks=2, hidden_size=d, n_heads=heads,
                     cond_dim=cond, dropout=0.0).eval()
    by_hand.load_state_dict({**model_state, **ema, 'pos_embed': ema['pos_embed'][None]})
    x, sigma = torch.tensor([[0, 8, 3, 8, 7, 8], [8, 8, 8, 1, 2, 8]]), torch.tensor([0.3, 2.0])
    assert torch.equal(model(x, sigma), by_hand(x, sigma))
    # a bare state dict of the fork (the weights alone) loads too; another length is refused
    torch.save(model_state, tmp_path / 'bare.pth')
    P.load_sedd(model, str(tmp_path / 'bare.pth'))
    key = 'blocks.1.attn_qkv.weight'
    assert torch.equal(model.state_dict()[key], weights[key])
    with pytest.raises(ValueError, match='position embedding'):
        longer = P.SEDD(vocab_size=V, seq_len=L + 2, n_blocks=2, hidden_size=d, n_heads=heads,
                        cond_dim=cond)
        P.load_sedd(longer, str(tmp_path / 'bare.pth'))


# -- training --------------------------------------------------------------------------------

def toy_codes(n, seed):
    """L = 8, V = 8 codes with hard rules: token 2 = token 1, token 5 = token 4 + 1 (mod 8)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 8, size=(n, 8))
    codes[:, 2] = codes[:, 1]
    codes[:, 5] = (codes[:, 4] + 1) % 8
    return codes.astype(np.uint16)


def rules_hold(codes):
    codes = np.asarray(codes)
    return (codes[:, 2] == codes[:, 1]) & (codes[:, 5] == (codes[:, 4] + 1) % 8)


@pytest.fixture(scope='module')
def toy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('toy_codes')
    write_codes(out, 'train', toy_codes(4096, 0), 8, 8, 32, 'toy codes')   # + the sidecar
    write_codes(out, 'val', toy_codes(512, 1), 8, 8, 32, 'toy codes')
    return str(out)


def tiny_cfg(codes_dir, out_dir, **kw):
    cfg = dict(P.CONFIG, codes_dir=codes_dir, out_dir=str(out_dir), device='cpu', model='tiny',
               dropout=0.0, batch_size=16, micro_batch_size=8, max_iters=4, learning_rate=1e-3,
               warmup_iters=2, ema_decay=0.9, eval_interval=0, log_interval=1, ckpt_interval=2,
               n_eval=64, n_samples=64, sample_batch_size=32, num_steps=16)
    cfg.update(kw)
    return cfg


def test_a_briefly_trained_prior_learns_a_hard_dependency_between_positions(toy_dir, tmp_path):
    cfg = tiny_cfg(toy_dir, tmp_path, batch_size=64, micro_batch_size=64, max_iters=300,
                   learning_rate=1e-3, warmup_iters=20, ema_decay=0.98, log_interval=50,
                   eval_interval=300, ckpt_interval=300)
    _, _, history = P.train(cfg)
    codes, report = P.sample_mode(dict(cfg, n_samples=400, num_steps=32, sample_batch_size=200))
    assert codes.shape == (400, 8) and codes.dtype == np.uint16
    assert np.load(tmp_path / 'samples.npy').shape == (400, 8)
    held = rules_hold(codes).mean()
    assert held > 0.8, held                                                # chance: 1/64
    # the ELBO beats coding each position on its own (3 bits), the truth being 2.25 bits
    scores = P.eval_mode(dict(cfg, n_eval=512))
    assert scores['elbo_bits'] < scores['marginal_cross_entropy_bits'] - 0.3, scores
    assert history[-1]['val_bits'] < history[0]['train_bits']


def as_args(cfg):
    return [f'--{k}={v!r}' if isinstance(v, (str, tuple)) else f'--{k}={v}'
            for k, v in cfg.items() if v != P.CONFIG[k]]


def test_two_processes_take_the_same_step_as_one_with_accumulation(toy_dir, tmp_path):
    # with dropout: its masks are seeded by the micro-batch's place in the global batch
    for name, nproc in [('one', 1), ('two', 2)]:
        cfg = tiny_cfg(toy_dir, tmp_path / name, max_iters=2, dropout=0.1)
        run_script('prior.py', as_args(cfg), nproc)
    a = torch.load(tmp_path / 'one' / 'prior.pt', weights_only=True)
    b = torch.load(tmp_path / 'two' / 'prior.pt', weights_only=True)
    assert (a['world_size'], b['world_size']) == (1, 2)    # one run of two processes, split
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], rtol=1e-5, atol=1e-6, msg=k)
    assert max((a['model'][k] - a['ema'][k]).abs().max().item() for k in a['model']) > 0


def test_two_processes_sample_the_same_codes_as_one(toy_dir, tmp_path):
    cfg = tiny_cfg(toy_dir, tmp_path, max_iters=2)
    P.train(cfg)
    for name, nproc in [('one', 1), ('two', 2)]:
        args = as_args(dict(cfg, mode='sample', n_samples=10, sample_batch_size=4, num_steps=8,
                            sample_path=str(tmp_path / f'{name}.npy')))
        out = run_script('prior.py', args, nproc).stdout
        # 3 chunks of 4 codes, shared out between the processes
        shares = ['rank 0 of 1: drew 3'] if nproc == 1 else ['rank 0 of 2: drew 2',
                                                             'rank 1 of 2: drew 1']
        assert all(f'{share} of 3 chunks (0 were already done)' in out for share in shares), out
    assert np.array_equal(np.load(tmp_path / 'one.npy'), np.load(tmp_path / 'two.npy'))
    # a tokenizer that makes other codes than the prior models is refused by sample and eval
    other = tmp_path / 'other_tokenizer'
    other.mkdir()
    write_codes(other, 'train', np.zeros((4, 16), np.uint16), 16, 8, 32, 'other codes')
    for fn in (P.sample_mode, P.eval_mode):
        with pytest.raises(ValueError, match=r'L=16, V=8.*prior.*trained on L=8, V=8'):
            fn(dict(cfg, codes_dir=str(other)))


def test_stop_and_resume_equals_an_uninterrupted_run(toy_dir, tmp_path):
    P.train(tiny_cfg(toy_dir, tmp_path / 'a', max_iters=6, dropout=0.1))
    split = tiny_cfg(toy_dir, tmp_path / 'b', max_iters=6, run_iters=3, dropout=0.1)
    P.train(split)
    P.train(dict(split, init_from='resume', run_iters=-1))
    a = torch.load(tmp_path / 'a' / 'prior.pt', weights_only=True)
    b = torch.load(tmp_path / 'b' / 'prior.pt', weights_only=True)
    assert a['iter_num'] == b['iter_num'] == 6
    for part in ['model', 'ema', 'optimizer']:
        for k, v in (a[part] if part != 'optimizer' else a[part]['state']).items():
            w = b[part][k] if part != 'optimizer' else b[part]['state'][k]
            if isinstance(v, dict):
                assert all(torch.equal(v[j], w[j]) for j in v), (part, k)
            else:
                assert torch.equal(v, w), (part, k)


@pytest.mark.parametrize('bad, message', [
    (lambda c: np.where(c == 7, 8, c).astype(np.uint16), r'token 8 >= V=8'),
    (lambda c: c[:, :5], r'shape \(4096, 5\).*L=8'),
    (lambda c: c.astype(np.int64), r'dtype int64'),
])
def test_a_dump_that_does_not_fit_the_tokenizer_is_refused(toy_dir, tmp_path, bad, message):
    bad_dir = tmp_path / 'codes'
    bad_dir.mkdir()
    shutil.copy(os.path.join(toy_dir, 'codes.json'), bad_dir / 'codes.json')
    np.save(bad_dir / 'codes_train.npy', bad(np.load(os.path.join(toy_dir, 'codes_train.npy'))))
    with pytest.raises(ValueError, match=message) as err:
        P.train(tiny_cfg(str(bad_dir), tmp_path / 'out'))
    assert 'codes_train.npy' in str(err.value) and 'tokenizer.py --mode=dump' in str(err.value)
    assert not (tmp_path / 'out' / 'prior.pt').exists()


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(toy_dir, tmp_path,
                                                                     monkeypatch):
    real, calls = P.diffusion_loss, []
    def loss_that_turns_nan(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float('nan') if len(calls) == 7 else loss    # iteration 3, micro-batch 1
    monkeypatch.setattr(P, 'diffusion_loss', loss_that_turns_nan)
    with pytest.raises(FloatingPointError, match=r'loss is nan.*at iteration 3.*prior.pt'):
        P.train(tiny_cfg(toy_dir, tmp_path, max_iters=8))
    assert torch.load(tmp_path / 'prior.pt', weights_only=True)['iter_num'] == 2


def test_bench_reports_prior_throughput():
    result = subprocess.run([sys.executable, 'bench.py', '--component=prior', '--prior_model=tiny',
                             '--L=16', '--V=8', '--batch_size=4', '--steps=1', '--warmup=1',
                             '--sample_steps=4'],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'tok/s' in result.stdout and 'codes/s' in result.stdout


# -- resumable sampling ----------------------------------------------------------------------

def test_a_killed_sample_run_continues_on_any_number_of_processes_as_if_uninterrupted(
        toy_dir, tmp_path, capsys):
    cfg = tiny_cfg(toy_dir, tmp_path, max_iters=2)
    P.train(cfg)
    sample = dict(cfg, mode='sample', n_samples=31, sample_batch_size=2, num_steps=100)  # 16 chunks
    whole, _ = P.sample_mode(dict(sample, sample_path=str(tmp_path / 'whole.npy')))
    path = tmp_path / 'killed.npy'
    parts, args = str(path) + '.parts', as_args(dict(sample, sample_path=str(path)))
    during = kill_then_continue_on_two('prior.py', args, parts, 16, tmp_path)
    (tmp_path / 'killed.npy.parts' / '000015.tmp.npz').write_bytes(b'torn')   # a kill's leftover
    # another setting is refused while the folder holds this run
    with pytest.raises(ValueError, match=r'killed.npy.parts.*num_steps: 100 there, 50 now.*delete'):
        P.sample_mode(dict(sample, sample_path=str(path), num_steps=50))
    # one process finishes it: the codes of the uninterrupted run, and the chunks are gone
    capsys.readouterr()
    codes, _ = P.sample_mode(dict(sample, sample_path=str(path)))
    assert f'rank 0 of 1: drew {16 - len(during)} of 16 chunks ({len(during)} were already done)' \
        in capsys.readouterr().out
    assert np.array_equal(np.load(path), whole) and np.array_equal(codes, whole)
    assert not os.path.exists(parts)


def test_two_runs_on_the_same_codes_end_with_bitwise_equal_weights(toy_dir, tmp_path):
    # the token embedding's backward once summed in an order that changed from run to run
    assert_two_runs_bitwise_equal(P.train, [tiny_cfg(toy_dir, tmp_path / run, max_iters=6,
                                                     batch_size=64, micro_batch_size=64)
                                            for run in 'ab'], 'prior.pt')


def test_the_prior_learning_rate_warms_up_holds_and_cools_down_to_zero_when_asked():
    c = dict(P.CONFIG, learning_rate=1e-3, warmup_iters=10, max_iters=100)
    constant = [P.learning_rate_at(it, c) for it in range(100)]
    assert constant[0] == pytest.approx(1e-4) and constant[9] == constant[99] == 1e-3
    cooled = [P.learning_rate_at(it, dict(c, cooldown_frac=0.4)) for it in range(100)]
    assert cooled[:60] == constant[:60] and cooled[80] == pytest.approx(5e-4)
    assert all(a > b for a, b in zip(cooled[60:], cooled[61:])) and cooled[99] < 3e-5
