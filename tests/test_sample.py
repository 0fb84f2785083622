"""Claims about the pipeline (sample.py): composition takes each token from a source, one
source is recon, the images do not depend on the number of processes, and the models are
checked against each other before anything runs."""
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, kill_then_continue_on_two, run_script
from configurator import configure
import diffusion as D
import prior as P
import sample as S
import text2dlc as X
import tokenizer as T


# -- composition, the pure function ----------------------------------------------------------

def compose_many(logits, n, tau=0.001):
    return torch.stack([S.compose_code(logits, tau, torch.Generator().manual_seed(s))
                        for s in range(n)])


def test_composing_two_codes_takes_each_token_from_either_with_equal_odds():
    torch.manual_seed(0)
    L, V, n = 16, 10, 400
    # two sources whose top logit stands out by more than tau (as a trained SEM's does)
    logits = 0.3 * torch.randn(2, L, V) + 3 * F.one_hot(torch.randint(V, (2, L)), V)
    a, b = logits[0].argmax(-1), logits[1].argmax(-1)
    codes = compose_many(logits, n)                                 # (n, L)
    from_a, from_b = codes == a, codes == b
    assert (from_a | from_b).all()                                  # every token from a source
    differ = a != b
    assert differ.sum() >= 8
    share_a = from_a[:, differ].float().mean().item()
    assert abs(share_a - 0.5) < 4 * 0.5 / np.sqrt(n * differ.sum().item()), share_a
    # the average of K near-one-hot distributions: of three sources, two are a
    codes3 = compose_many(torch.stack([logits[0], logits[1], logits[0]]), n)
    assert abs((codes3 == a)[:, differ].float().mean().item() - 2 / 3) < 0.05


def test_composing_one_code_gives_back_its_argmax_and_a_high_temperature_does_not():
    torch.manual_seed(1)
    logits = 0.3 * torch.randn(1, 64, 8) + 3 * F.one_hot(torch.randint(8, (1, 64)), 8)
    assert (compose_many(logits, 20) == logits[0].argmax(-1)).all()
    assert not (compose_many(logits, 20, tau=1.0) == logits[0].argmax(-1)).all()


# -- a tiny trained pipeline on the built-in data ---------------------------------------------

@pytest.fixture(scope='module')
def pipeline(shapes_dir, tmp_path_factory):
    """A tokenizer (L=4, V=8), a DLC DiT, a class DiT, an unconditional DiT, a prior and a text
    model, each briefly trained."""
    root = tmp_path_factory.mktemp('pipeline')
    tok = dict(T.CONFIG, data_dir=shapes_dir, out_dir=str(root / 'tok'), device='cpu', patch_size=8,
               embed_dim=32, depth=1, num_heads=2, image_size=32, L=4, V=8, ssl_loss='infonce',
               n_local_crops=0, layerscale_init=1.0, head_hidden_dim=32, head_bottleneck_dim=16,
               batch_size=32, max_iters=5, warmup_iters=1, learning_rate=2e-3,
               color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0, 0.0),
               solarize_prob=(0.0, 0.0, 0.0), log_interval=1)
    T.train(tok)
    for split in ['train', 'val']:
        T.dump(dict(tok, dump_split=split))
    dit = dict(D.CONFIG, data_dir=shapes_dir, codes_dir=tok['out_dir'], device='cpu',
               model='DiT-Ti/8', image_size=32, objective='flow', flow_output='x0', batch_size=16,
               micro_batch_size=16, max_iters=3, learning_rate=1e-3, sample_interval=0,
               log_interval=1, ckpt_interval=3, sampler='euler', num_sampling_steps=4)
    D.train(dict(dit, out_dir=str(root / 'dit')))
    D.train(dict(dit, out_dir=str(root / 'dit_class'), cond='class', num_classes=18))
    D.train(dict(dit, out_dir=str(root / 'dit_plain'), cond='none'))
    P.train(dict(P.CONFIG, codes_dir=tok['out_dir'], out_dir=str(root / 'prior'), device='cpu',
                 model='tiny', dropout=0.0, batch_size=16, micro_batch_size=16, max_iters=3,
                 warmup_iters=1, eval_interval=0, log_interval=1, ckpt_interval=3))
    X.train(dict(X.CONFIG, codes_dir=tok['out_dir'], data_dir=shapes_dir, device='cpu',
                 out_dir=str(root / 'text'), text_encoding='words',
                 captions_path=os.path.join(shapes_dir, '{split}_captions_varied.txt'),
                 caption_len=16, model='tiny', dropout=0.0, batch_size=16, micro_batch_size=16,
                 max_iters=3, learning_rate=1e-3, warmup_iters=1, eval_interval=0, log_interval=1,
                 ckpt_interval=3))
    return dict(root=root, shapes=shapes_dir, tok=tok['out_dir'], dit=str(root / 'dit'),
                dit_class=str(root / 'dit_class' / 'diffusion.pt'), prior=str(root / 'prior'),
                dit_plain=str(root / 'dit_plain' / 'diffusion.pt'),
                text=str(root / 'text'))


def sample_cfg(p, out_dir, **kw):
    cfg = dict(S.CONFIG, out_dir=str(out_dir), device='cpu', n_samples=6, diffusion_dir=p['dit'],
               class_dit=p['dit_class'], plain_dit=p['dit_plain'], tokenizer_dir=p['tok'],
               prior_dir=p['prior'],
               text2dlc_dir=p['text'], data_dir=p['shapes'],
               prompts='a red square|a small blue triangle on a white background, top|a shape',
               split='val', dit_sampler='euler', dit_steps=3, cfg_scale=2.0, clip_denoised=True,
               prior_steps=4, batch_size=4, n_grid=6)
    cfg.update(kw)
    return cfg


def as_args(cfg):
    return [f'--{k}={v!r}' if isinstance(v, (str, tuple)) else f'--{k}={v}'
            for k, v in cfg.items() if v != S.CONFIG[k]]


def test_two_processes_write_the_same_images_as_one(pipeline, tmp_path):
    modes = 'recon,uncond,compose,class,plain,text'
    for name, nproc in [('one', 1), ('two', 2)]:
        cfg = sample_cfg(pipeline, tmp_path / name, mode=modes, n_samples=5, batch_size=2)
        out = run_script('sample.py', as_args(cfg), nproc).stdout
        # (rank, world, chunks drawn): 3 chunks of 2 images, shared out between the processes
        shares = [(0, 1, 3)] if nproc == 1 else [(0, 2, 2), (1, 2, 1)]
        drawn = re.findall(r'rank (\d) of (\d): drew (\d) of 3 chunks \(0 were already done\)', out)
        assert sorted(tuple(map(int, d)) for d in drawn) == sorted(shares * 6), out
    for mode in modes.split(','):
        a = np.load(tmp_path / 'one' / f'{mode}.npz')['arr_0']
        b = np.load(tmp_path / 'two' / f'{mode}.npz')['arr_0']
        assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b), mode
        assert len({image.tobytes() for image in a}) == len(a), mode    # each image its own draw
        assert (tmp_path / 'two' / f'{mode}.png').exists()
        if mode not in ('class', 'plain'):                            # no code to keep
            assert np.array_equal(np.load(tmp_path / 'one' / f'{mode}_codes.npy'),
                                  np.load(tmp_path / 'two' / f'{mode}_codes.npy')), mode
    assert not list((tmp_path / 'two').glob('*.parts'))              # the chunks are gone
    scores = json.loads((tmp_path / 'one' / 'scores.json').read_text())['text']
    assert {'valid', 'kept', 'shape_kept', 'color_kept', 'background_kept', 'size_kept'} \
        <= set(scores)


def test_compose_has_its_own_guidance_which_defaults_to_cfg_scale(pipeline, tmp_path):
    runs = {}
    for name, scale in [('default', -1.0), ('same', 2.0), ('own', 6.0)]:
        S.main(sample_cfg(pipeline, tmp_path / name, mode='recon,compose', n_samples=2,
                          compose_cfg_scale=scale))
        runs[name] = {m: np.load(tmp_path / name / f'{m}.npz')['arr_0']
                      for m in ('recon', 'compose')}
    assert np.array_equal(runs['default']['compose'], runs['same']['compose'])   # -1: cfg_scale
    assert not np.array_equal(runs['default']['compose'], runs['own']['compose'])
    assert np.array_equal(runs['default']['recon'], runs['own']['recon'])        # recon: cfg_scale


def test_the_imagenet_configs_are_the_papers_two_fid_runs():
    # scripts/gen_50k_sedd-1024_cfg-1.7.sh and gen_50k_sedd-4096-remask.sh of the paper's code
    a, b = (configure(S.CONFIG, [os.path.join(ROOT, 'config', name)])
            for name in ('sample_imagenet.py', 'sample_imagenet_corrector.py'))
    for cfg in (a, b):
        assert (cfg['dit_sampler'], cfg['dit_steps'], cfg['clip_denoised'],
                cfg['guidance_interval']) == ('ddpm', 256, False, (0.0, 1.0))
        assert (cfg['prior_sampler'], cfg['prior_sample_eps'], cfg['n_samples']) == \
            ('analytic', 1e-5, 50000)
    assert (a['prior_steps'], a['remask_eta'], a['cfg_scale'], a['compose_cfg_scale']) == \
        (1024, 0.0, 1.7, 4.0)
    assert (b['prior_steps'], b['prior_corrector'], b['remask_eta'], b['cfg_scale']) == \
        (4096, 'paper', 0.01, 1.0)
    assert a['out_dir'] != b['out_dir']


def test_text_mode_scores_the_factors_each_prompt_names(pipeline):
    """The reader's verdict on text images: true images of the prompts' factors keep them all."""
    val = np.load(os.path.join(pipeline['shapes'], 'val_images.npy'))[:20]
    captions = (open(os.path.join(pipeline['shapes'], 'val_captions.txt')).read().splitlines())[:20]
    cfg = sample_cfg(pipeline, '/unused')
    right = S.reader_scores(cfg, 'text', val, dict(prompts=captions))
    assert right['kept'] > 0.9 and right['size_kept'] > 0.9 and right['background_kept'] > 0.9
    wrong = S.reader_scores(cfg, 'text', val, dict(prompts=captions[1:] + captions[:1]))
    assert wrong['kept'] < 0.5
    # a prompt that names only a color is scored on color alone
    prompt = 'something red' if 'red' in captions[0] else 'a red one'
    only = S.reader_scores(cfg, 'text', val[:1], dict(prompts=[prompt]))
    assert set(only) == {'n', 'valid', 'color_kept'}


def test_compose_with_one_source_is_recon_of_that_source(pipeline, tmp_path):
    sources = '0,3,5,7,11,12'
    results = S.main(sample_cfg(pipeline, tmp_path, mode='recon,compose', sources=sources,
                                save_pngs=True))
    recon, compose = (np.load(tmp_path / f'{m}_codes.npy') for m in ('recon', 'compose'))
    dump = np.load(os.path.join(pipeline['tok'], 'codes_val.npy'))
    assert np.array_equal(recon, dump[[0, 3, 5, 7, 11, 12]])        # recon encodes as the dump did
    assert np.array_equal(compose, recon)                   # the same codes, so the same images
    assert np.array_equal(np.load(tmp_path / 'recon.npz')['arr_0'],
                          np.load(tmp_path / 'compose.npz')['arr_0'])
    assert len(list((tmp_path / 'recon').glob('*.png'))) == 6
    # what eval_fid.py reads: the .npz and the folder of PNGs hold the same images
    import eval_fid as E
    npz = E.read_images(str(tmp_path / 'recon.npz'))
    assert np.array_equal(npz, E.read_images(str(tmp_path / 'recon'), npz.shape[1]))
    assert set(results['recon']) >= {'valid', 'kept'}
    assert set(results['compose']) >= {'novel', 'from_sources'}


def test_compose_with_two_sources_takes_every_token_from_one_of_them(pipeline, tmp_path):
    S.main(sample_cfg(pipeline, tmp_path, mode='compose', n_samples=40, dit_steps=1))
    codes = np.load(tmp_path / 'compose_codes.npy')                 # pairs (2i, 2i+1) of val
    dump = np.load(os.path.join(pipeline['tok'], 'codes_val.npy'))
    a, b = dump[0:80:2], dump[1:80:2]
    assert ((codes == a) | (codes == b)).all()
    differ = a != b
    assert 0.3 < (codes == a)[differ].mean() < 0.7                  # both sources give tokens
    # sources as image files give the codes of those images; groups may have more sources
    from PIL import Image
    images = np.load(os.path.join(pipeline['shapes'], 'val_images.npy'))
    files = [str(tmp_path / f'{i}.png') for i in (0, 1)]
    for i, f in enumerate(files):
        Image.fromarray(images[i]).save(f)
    S.main(sample_cfg(pipeline, tmp_path / 'files', mode='compose', n_samples=4, dit_steps=1,
                      sources='+'.join(files) + ',2+3+4'))
    mixed = np.load(tmp_path / 'files' / 'compose_codes.npy')
    assert ((mixed[0::2] == dump[0]) | (mixed[0::2] == dump[1])).all()
    assert ((mixed[1::2] == dump[2]) | (mixed[1::2] == dump[3]) | (mixed[1::2] == dump[4])).all()


def test_the_reader_calls_a_copy_of_a_source_not_novel_and_a_recon_of_the_source_kept(pipeline):
    images = np.load(os.path.join(pipeline['shapes'], 'val_images.npy'))[:40]
    cfg = sample_cfg(pipeline, '/unused')
    pairs = [[2 * i, 2 * i + 1] for i in range(20)]
    copies = images[0:40:2]                         # each "composition" is its first source
    scores = S.reader_scores(cfg, 'compose', copies, dict(groups=pairs))
    assert scores['from_sources'] == scores['valid'] > 0.9 and scores['novel'] == 0.0
    scores = S.reader_scores(cfg, 'recon', images[:20], dict(groups=[[i] for i in range(20)]))
    assert scores['kept'] > 0.9
    wrong = S.reader_scores(cfg, 'recon', images[20:40], dict(groups=[[i] for i in range(20)]))
    assert wrong['kept'] < 0.6


def test_models_that_do_not_fit_together_are_refused(pipeline, tmp_path):
    # a tokenizer of other codes than the DiT's
    other = tmp_path / 'tok'
    other.mkdir()
    ckpt = torch.load(os.path.join(pipeline['tok'], 'tokenizer.pt'), weights_only=True)
    torch.save(dict(ckpt, L=6), other / 'tokenizer.pt')
    with pytest.raises(ValueError, match=r'L=6, V=8.*trained on L=4, V=8'):
        S.main(sample_cfg(pipeline, tmp_path / 'a', mode='recon', tokenizer_dir=str(other)))
    # a prior of other codes
    prior_ckpt = torch.load(os.path.join(pipeline['prior'], 'prior.pt'), weights_only=True)
    (tmp_path / 'prior').mkdir()
    torch.save(dict(prior_ckpt, V=16), tmp_path / 'prior' / 'prior.pt')
    with pytest.raises(ValueError, match=r'prior.*V=16.*trained on L=4, V=8'):
        S.main(sample_cfg(pipeline, tmp_path / 'b', mode='uncond',
                          prior_dir=str(tmp_path / 'prior')))
    # a text model of other codes
    text_ckpt = torch.load(os.path.join(pipeline['text'], 'text2dlc.pt'), weights_only=True)
    (tmp_path / 'text').mkdir()
    torch.save(dict(text_ckpt, L=6), tmp_path / 'text' / 'text2dlc.pt')
    with pytest.raises(ValueError, match=r'text model.*L=6, V=8.*trained on L=4, V=8'):
        S.main(sample_cfg(pipeline, tmp_path / 'b2', mode='text',
                          text2dlc_dir=str(tmp_path / 'text')))
    # the wrong conditioning for the mode, a sampler of the other objective, a missing VAE
    with pytest.raises(ValueError, match="cond='dlc'"):
        S.main(sample_cfg(pipeline, tmp_path / 'c', mode='class', class_dit=''))
    with pytest.raises(ValueError, match="sampler 'ddpm'"):
        S.main(sample_cfg(pipeline, tmp_path / 'd', mode='uncond', dit_sampler='ddpm'))
    dit_ckpt = torch.load(os.path.join(pipeline['dit'], 'diffusion.pt'), weights_only=True)
    (tmp_path / 'latent').mkdir()
    torch.save(dict(dit_ckpt, space='latent'), tmp_path / 'latent' / 'diffusion.pt')
    with pytest.raises(ValueError, match='vae_path'):
        S.main(sample_cfg(pipeline, tmp_path / 'e', mode='uncond',
                          diffusion_dir=str(tmp_path / 'latent')))
    # sources that do not exist
    with pytest.raises(ValueError, match='source index 9999'):
        S.main(sample_cfg(pipeline, tmp_path / 'f', mode='compose', sources='1+9999'))
    with pytest.raises(FileNotFoundError, match='nope.png'):
        S.main(sample_cfg(pipeline, tmp_path / 'g', mode='compose', sources='1+nope.png'))
    with pytest.raises(ValueError, match='one image per group'):
        S.main(sample_cfg(pipeline, tmp_path / 'h', mode='recon', sources='1+2'))


def test_a_bare_class_conditional_state_dict_is_rebuilt_from_its_shapes_and_samples(pipeline,
                                                                                    tmp_path):
    # the public DiT-XL-2-256x256.pt is a bare state dict; DiT-S/2 has the same layout
    reference = D.DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=12,
                      num_heads=6, learn_sigma=True, cond='class', num_classes=1000)
    model, info = S.public_dit_from_weights('DiT-S-2.pt', reference.state_dict())
    assert info['space'] == 'latent' and info['image_size'] == 256 and info['objective'] == 'eps'
    assert model.blocks[0].attn.num_heads == 6 and len(model.blocks) == 12 and model.null == 1000
    # a small pixel-space one samples through class mode, labels as given
    small = D.DiT(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                  learn_sigma=True, cond='class', num_classes=5)
    torch.save(small.state_dict(), tmp_path / 'bare.pt')
    S.main(sample_cfg(pipeline, tmp_path, mode='class', class_dit=str(tmp_path / 'bare.pt'),
                      dit_sampler='ddim', dit_steps=3, labels='1,4', n_samples=4))
    assert np.load(tmp_path / 'class.npz')['arr_0'].shape == (4, 32, 32, 3)
    with pytest.raises(ValueError, match='label 7'):
        S.main(sample_cfg(pipeline, tmp_path, mode='class', class_dit=str(tmp_path / 'bare.pt'),
                          dit_sampler='ddim', labels='7'))


def test_a_killed_run_continues_on_two_processes_and_writes_what_an_uninterrupted_one_does(
        pipeline, tmp_path):
    cfg = sample_cfg(pipeline, tmp_path / 'whole', mode='recon', n_samples=16, batch_size=1,
                     dit_steps=40)                                          # 16 chunks
    S.main(cfg)
    out = tmp_path / 'killed'
    parts, args = str(out / 'recon.parts'), as_args(dict(cfg, out_dir=str(out)))
    kill_then_continue_on_two('sample.py', args, parts, 16, tmp_path)
    with pytest.raises(ValueError, match=r'recon.parts.*dit_steps: 40 there, 3 now.*delete'):
        S.main(dict(cfg, out_dir=str(out), dit_steps=3))
    S.main(dict(cfg, out_dir=str(out)))                             # one process finishes it
    whole = tmp_path / 'whole'
    images = [np.load(d / 'recon.npz')['arr_0'] for d in (whole, out)]
    assert np.array_equal(*images)
    assert np.array_equal(np.load(whole / 'recon_codes.npy'), np.load(out / 'recon_codes.npy'))
    assert not os.path.exists(parts)


def test_the_plain_baseline_draws_without_a_condition_and_is_scored_as_uncond(pipeline, tmp_path):
    results = S.main(sample_cfg(pipeline, tmp_path, mode='plain,uncond', n_samples=8))
    assert np.load(tmp_path / 'plain.npz')['arr_0'].shape == (8, 32, 32, 3)
    assert not (tmp_path / 'plain_codes.npy').exists()              # no code: nothing to keep
    for mode in ('plain', 'uncond'):
        assert {'valid', 'tv_shape', 'tv_joint', 'coverage', 'nearest'} <= set(results[mode])
    with pytest.raises(ValueError, match=r"cond='none'.*cond='dlc'.*--plain_dit"):
        S.main(sample_cfg(pipeline, tmp_path / 'refused', mode='plain', plain_dit=''))


def test_dit_weights_model_samples_the_raw_weights_not_the_ema(pipeline, tmp_path):
    ckpt = torch.load(pipeline['dit_plain'], map_location='cpu', weights_only=True)
    raw_as_ema = dict(ckpt, ema=ckpt['model'])              # the raw weights in the ema slot
    torch.save(raw_as_ema, tmp_path / 'raw_as_ema.pt')
    draw = lambda out, **kw: (S.main(sample_cfg(pipeline, tmp_path / out, mode='plain',
                                                n_samples=4, **kw)),
                              np.load(tmp_path / out / 'plain.npz')['arr_0'])[1]
    raw = draw('raw', dit_weights='model')
    assert np.array_equal(raw, draw('swapped', plain_dit=str(tmp_path / 'raw_as_ema.pt')))
    assert not np.array_equal(raw, draw('ema'))
    with pytest.raises(ValueError, match="dit_weights='last'"):
        draw('bad', dit_weights='last')


def test_class_labels_drawn_from_the_training_split_are_never_a_held_out_pair(pipeline):
    cfg = sample_cfg(pipeline, pipeline['root'] / 'labels', mode='class', labels='train',
                     n_samples=48, batch_size=48, dit_steps=1)
    _, _, extra = S.run_mode(cfg, 'class', 0, 1, 'cpu')
    meta = json.load(open(os.path.join(pipeline['shapes'], 'meta.json')))
    held_out = {s * len(meta['color']) + c for s, c in meta['held_out']}
    train = np.load(os.path.join(pipeline['shapes'], 'train_factors.npy'))
    in_train = set(train[:, 0] * len(meta['color']) + train[:, 1])
    assert set(extra['labels']) <= in_train and not set(extra['labels']) & held_out
    assert len(set(extra['labels'])) > 5                            # drawn, not one label
    again = S.run_mode(dict(cfg, out_dir=str(pipeline['root'] / 'labels2')), 'class', 0, 1, 'cpu')
    assert again[2]['labels'] == extra['labels']                    # seeded by the index


def test_held_out_sources_pair_one_items_shape_with_anothers_color_into_an_unseen_pair(pipeline):
    meta = json.load(open(os.path.join(pipeline['shapes'], 'meta.json')))
    val = np.load(os.path.join(pipeline['shapes'], 'val_factors.npy'))
    for k in (2, 3):
        cfg = sample_cfg(pipeline, pipeline['root'] / f'held_out{k}', mode='compose',
                         sources=f'held_out:{k}', n_samples=8, batch_size=8, dit_steps=1)
        _, codes, extra = S.run_mode(cfg, 'compose', 0, 1, 'cpu')
        assert codes.shape == (8, 4) and all(len(g) == k for g in extra['groups'])
        assert all([val[g[0], 0], val[g[1], 1]] in meta['held_out'] for g in extra['groups'])


def test_soft_composition_gives_the_dit_the_averaged_distributions(pipeline, tmp_path, monkeypatch):
    seen = []
    real = D.DiT.forward
    def spy(self, x, t, y):
        seen.append(y)
        return real(self, x, t, y)
    monkeypatch.setattr(D.DiT, 'forward', spy)
    cfg = sample_cfg(pipeline, tmp_path, mode='compose', compose_soft=True, cfg_scale=1.0,
                     n_samples=4, batch_size=4, dit_steps=1)
    _, codes, extra = S.run_mode(cfg, 'compose', 0, 1, 'cpu')
    y = seen[0]
    assert y.shape == (4, 4, 8) and y.is_floating_point()          # (N, L, V) distributions
    torch.testing.assert_close(y.sum(-1), torch.ones(4, 4))
    # each position holds the mean of two near-one-hot rows: mass 1 or 1/2 on the sources' tokens
    assert set(np.round(y.max(-1).values.numpy(), 3).ravel()) <= {0.5, 1.0}
    assert np.array_equal(codes, y.argmax(-1).numpy())

