"""The path from a folder of your own images to FID, end to end as README's "Your own images" runs
it: a small folder in ImageNet's layout (train/<class>/ of JPEG and PNG images of mixed sizes, a
flat val/ as ImageNet's official val), every stage on its config/*_folder.py with only its sizes
made tiny (tiny models, a few iterations, a random-weight SD-VAE and Inception)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion as D
import eval_fid as E
import prior as P
import sample as S
import text2dlc as X
import tokenizer as T
from configurator import configure
from conftest import ROOT
from test_eval_fid import fid_inception_key_shapes
from vae import AutoencoderKL

SIZES = [(48, 64), (80, 60), (40, 40), (33, 90), (120, 100), (64, 48)]
COLORS = {'n01': (220, 40, 40), 'n02': (40, 40, 220)}


def photo(rng, color, h, w):
    """A colored square on a noisy background, at a random place."""
    image = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    s = min(h, w) // 2
    y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
    image[y:y + s, x:x + s] = color
    return Image.fromarray(image)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('folder')
    rng = np.random.default_rng(0)
    captions = {'train': [], 'val': []}
    for wnid, color in COLORS.items():
        (root / 'train' / wnid).mkdir(parents=True)
        for i, (h, w) in enumerate(SIZES):
            name = f'{wnid}_{i}.{("JPEG", "png")[i % 2]}'
            photo(rng, color, h, w).save(root / 'train' / wnid / name)
            captions['train'].append(f"a {('red', 'blue')[wnid == 'n02']} square")
    (root / 'val').mkdir()
    val_classes = ['n02', 'n01', 'n01', 'n02']
    for i, wnid in enumerate(val_classes):
        h, w = SIZES[i]
        photo(rng, COLORS[wnid], h, w).save(root / 'val' / f'ILSVRC2012_val_{i + 1:08d}.JPEG')
        captions['val'].append(f"a {('red', 'blue')[wnid == 'n02']} square")
    (root / 'val_labels.txt').write_text('\n'.join(val_classes) + '\n')
    for split, lines in captions.items():
        (root / f'{split}_captions.txt').write_text('\n'.join(lines) + '\n')
    return root


def cfg_of(module, config, **overrides):
    """module's config: config/<config> then --key=value overrides, as the command line gives."""
    argv = [os.path.join(ROOT, 'config', config)] + [f'--{k}={v}' for k, v in overrides.items()]
    return configure(module.CONFIG, argv)


def test_a_folder_of_images_goes_from_the_tokenizer_to_fid(folder, tmp_path):
    out = {name: str(tmp_path / name) for name in
           ('tok', 'latents', 'dit', 'class', 'prior', 'text', 'samples')}
    data, cpu = str(folder), dict(device='cpu', compile=False)
    vae_path = str(tmp_path / 'vae.pt')
    torch.manual_seed(0)
    torch.save(AutoencoderKL().state_dict(), vae_path)       # the SD-VAE's layout, random weights

    # tokenizer: train, dump train (class folders) and val (flat), probe with val's labels file
    tok = dict(cpu, data_dir=data, out_dir=out['tok'], init_from='scratch', num_workers=0,
               patch_size=8, embed_dim=32, depth=1, num_heads=2, image_size=32, local_crop_size=16,
               n_local_crops=2, L=4, V=8, n_prototypes=64, head_hidden_dim=32,
               head_bottleneck_dim=16, batch_size=4, max_iters=2, warmup_iters=1, probe_iters=5)
    T.train(cfg_of(T, 'tokenizer_folder.py', **tok))
    T.dump(cfg_of(T, 'tokenizer_folder.py', **tok, mode='dump', dump_split='train,val'))
    assert np.load(os.path.join(out['tok'], 'codes_val.npy')).shape == (4, 4)
    T.probe(cfg_of(T, 'tokenizer_folder.py', **tok, mode='probe'))

    # the DiT: SD-VAE latents of train, once; a DiT on them; a class DiT on the folders' classes
    dit = dict(cpu, data_dir=data, codes_dir=out['tok'], latents_dir=out['latents'],
               vae_path=vae_path, model='DiT-Ti/2', image_size=32, batch_size=4,
               micro_batch_size=4, max_iters=2, num_workers=0, sample_interval=0,
               num_sampling_steps=3, log_interval=1)
    D.extract(cfg_of(D, 'diffusion_folder.py', **dit, mode='extract', split='train',
                     out_dir=out['latents']))
    assert np.load(os.path.join(out['latents'], 'latents_train.npy')).shape == (12, 4, 4, 4)
    D.train(cfg_of(D, 'diffusion_folder.py', **dit, out_dir=out['dit']))
    D.train(cfg_of(D, 'diffusion_folder.py', **dit, out_dir=out['class'], cond='class',
                   num_classes=2))

    # the prior, its samples, and every one of them decoded by the DiT
    pri = dict(cpu, codes_dir=out['tok'], out_dir=out['prior'], model='tiny', batch_size=4,
               micro_batch_size=4, max_iters=2, warmup_iters=1, n_eval=4, eval_interval=2)
    P.train(cfg_of(P, 'prior_folder.py', **pri))
    P.sample_mode(cfg_of(P, 'prior_folder.py', **pri, mode='sample', n_samples=5, num_steps=3,
                         sample_batch_size=4))
    decoded = D.decode(cfg_of(D, 'diffusion_folder.py', **dit, out_dir=out['dit'], mode='decode',
                              codes_path=os.path.join(out['prior'], 'samples.npy')))
    assert decoded.shape == (5, 32, 32, 3)

    # the text model on the captions files, {split} in their path
    txt = dict(cpu, codes_dir=out['tok'], out_dir=out['text'], init_from='scratch',
               text_encoding='bytes', model='tiny', caption_len=16, batch_size=4,
               micro_batch_size=4, max_iters=2, warmup_iters=1, eval_interval=2, n_eval=4,
               captions_path=os.path.join(data, '{split}_captions.txt'))
    X.train(cfg_of(X, 'text2dlc_folder.py', **txt))

    # every mode of the pipeline, sources by index (the documented form) and numeric prompts
    sample = dict(device='cpu', data_dir=data, out_dir=out['samples'], n_samples=4, dit_steps=3,
                  prior_steps=3, batch_size=4, vae_path=vae_path, diffusion_dir=out['dit'],
                  tokenizer_dir=out['tok'], prior_dir=out['prior'], text2dlc_dir=out['text'],
                  class_dit=os.path.join(out['class'], 'diffusion.pt'))
    S.main(cfg_of(S, 'sample_folder.py', **sample, mode='recon,uncond,class,text', labels='0,1',
                  prompts='a red square|42'))
    S.main(cfg_of(S, 'sample_folder.py', **sample, mode='compose', sources='0+3,1+2'))
    for mode in ('recon', 'uncond', 'compose', 'class', 'text'):
        assert np.load(os.path.join(out['samples'], f'{mode}.npz'))['arr_0'].shape == \
            (4, 32, 32, 3), mode

    # FID of the samples against the real val images, read in ADM's view at the samples' 32 px
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(shape, generator=gen) * (2 / np.prod(shape[1:])) ** 0.5
                 if k.endswith('conv.weight') or k == 'fc.weight' else
                 torch.ones(shape) if k.endswith(('bn.weight', 'running_var')) else
                 torch.zeros(shape)) for k, shape in fid_inception_key_shapes().items()}
    torch.save(state, tmp_path / 'inception.pth')
    scores = E.evaluate(configure(E.CONFIG, [
        f"--samples={os.path.join(out['samples'], 'uncond.npz')}", f'--ref={data}/val',
        f"--inception_path={tmp_path / 'inception.pth'}", '--device=cpu', '--batch_size=4']))
    assert np.isfinite(scores['fid']) and set(scores) >= {'fid', 'precision', 'recall'}
