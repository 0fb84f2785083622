"""
sample.py: the pipeline that makes images from the trained components.

Modes (--mode=, several joined by commas: 'recon,uncond'):
    recon    images -> tokenizer (the argmax DLC) -> DiT -> images: what the code keeps
    uncond   prior (SEDD) -> DLC -> DiT -> images: the paper's unconditional generation
    compose  two or more source images -> SEM distributions at a low temperature -> their
             average -> one token sampled per position -> DiT -> images
    class    class labels -> a class-conditional DiT (diffusion.py --cond=class, or the public
             DiT-XL-2-256x256.pt through --class_dit): the baseline that knows the labels
    plain    a DiT trained with no condition (diffusion.py --cond=none, through --plain_dit):
             the unconditional baseline that uncond is measured against
    text     prompts -> text2dlc (a text diffusion LM fine-tuned on (DLC, caption)) -> DLC -> DiT

Composition (Lavoie, Noukhovitch, Courville 2025, section 4). For source images x_1 .. x_K
with SEM logits z(x_k) in R^{L x V}, at temperature tau (0.001: near one-hot),

    p_l = (1/K) sum_k softmax(z_l(x_k) / tau),        c_l ~ p_l  independently for l = 1..L

so each token of the new code is, in effect, the token of one source chosen at random: the
code mixes the sources' parts, and the DiT renders a combination that need not exist in the
training data. With one source, c is the source's own DLC (the argmax), i.e. recon.

Sample i of a run is seeded by its global index alone: its code draw (prior or composition)
from  2 (seed * 1_000_003 + i) + 1  and its image noise from  2 (seed * 1_000_003 + i), so
`torchrun --nproc_per_node=8 sample.py ...` writes the same images as one process. Samples are
drawn in chunks of batch_size, each saved in out_dir/<mode>.parts/ once drawn: a killed run
launched again with the same command, on any number of processes, continues where it stopped and
writes the same outputs (other settings are refused: that folder holds the run's). Every mode
rebuilds its models from their checkpoints alone and checks that they agree: the codes' (L, V),
the DiT's conditioning, its image size and space (SD-VAE latents: then vae_path).

Outputs in out_dir, for each mode:
    <mode>.npz        arr_0: uint8 (N, H, W, 3), what eval_fid.py and the ADM suite read
    <mode>.png        a grid of the first n_grid images (sources beside results: recon, compose;
                      the prompt under each image: text)
    <mode>_codes.npy  the DLCs the images were drawn from (recon, uncond, compose, text)
    <mode>/000000.png ... one PNG per image, with save_pngs=True
On the built-in data, the attribute reader scores every set (reader_scores); mode may list
several modes, 'recon,uncond,compose,class': they run in turn and one table of their scores
ends the run (what `make demo` prints).

    python sample.py config/sample_shapes.py --mode=recon,uncond,compose,class
    python sample.py config/sample_shapes.py --mode=text --prompts='a red square|a blue circle'
    torchrun --nproc_per_node=8 sample.py --mode=uncond --n_samples=50000 --prior_dir=...
"""
import json
import math
import os
import shutil
import sys
import textwrap
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import diffusion as D
import prior as P
import text2dlc as T2D
import tokenizer as T
from cluster import draw_in_chunks, save_atomic, setup_distributed
from codes import (SIDECAR, check_fits, check_same_images, check_same_tokenizer, codes_identity,
                   dump_path, load_codes, read_contract, tokenizer_identity)
from configurator import MissingFile, UserError, check_counts, check_finite, command_line
from data.shapes.score import (composition_scores, factors_kept, held_out_pair_groups,
                               histogram_scores, load_meta, named_factors_kept, print_table,
                               read_builtin)
from images import has_split, load_image

# -----------------------------------------------------------------------------
# config: the defaults are the ImageNet 256 pipeline (DiT-XL/2 on SD-VAE latents, DLC512)
mode = 'uncond'                 # 'recon' | 'uncond' | 'compose' | 'class' | 'plain' | 'text' |
                                # several: 'recon,text'
out_dir = 'out-samples'
seed = 0
n_samples = 64                  # images per mode
# checkpoints
diffusion_dir = 'out-diffusion'             # diffusion.pt, trained by diffusion.py
class_dit = ''                  # class: a class-conditional DiT, its diffusion.pt or a bare
                                # state dict (DiT-XL-2-256x256.pt); '' = diffusion_dir's
tokenizer_dir = 'out-imagenet-tokenizer'    # tokenizer.pt: recon, compose (a folder of code
                                            # dumps alone: the split's codes, one-hot)
prior_dir = 'out-prior'                     # prior.pt: uncond
text2dlc_dir = 'out-text2dlc'               # text2dlc.pt: text
vae_path = ''                   # sd-vae-ft-ema weights, for a DiT on latents
# sources of recon and compose
data_dir = 'data/imagenet'
split = 'val'
sources = ''                    # groups by ',', members by '+': indices into `split` or image
                                # files ('3+17,5+9', 'cat.png+dog.png'); sample i: group i mod
                                # #groups. '' = recon: items 0..n-1; compose: pairs (2i, 2i+1).
                                # 'held_out' (built-in data): pairs whose shape of the first and
                                # color of the second are a held-out pair; 'held_out:3': + 1 more
compose_tau = 0.001             # the SEM temperature of composition (the paper's)
compose_soft = False            # give the DiT the averaged distributions (L, V) themselves, not
                                # a code drawn from them (<mode>_codes.npy: their argmax)
labels = ''                     # class: '207,360' (sample i: i mod #labels); '' = drawn per sample,
                                # uniformly; 'train': drawn from the training split's labels
plain_dit = ''                  # plain: a cond='none' DiT's diffusion.pt; '' = diffusion_dir's
dit_weights = 'ema'             # our DiT checkpoints' 'ema' weights (the paper's) or the raw 'model'
prompts = ''                    # text: 'a red square|a blue circle' or a file, one per line
                                # (sample i: i mod #prompts)
# image model sampling
dit_sampler = 'ddpm'            # eps: 'ddpm' | 'ddim';  flow: 'euler' | 'heun'
dit_steps = 250
cfg_scale = 1.0                 # 1.0 = no guidance (DiT-XL/2's class anchor, FID 2.27, used 1.5)
compose_cfg_scale = -1.0        # compose's guidance; -1 = cfg_scale (the paper's composition: 4.0)
guidance_interval = (0.0, 1.0)
clip_denoised = False           # clip the predicted x_0 to [-1, 1] (pixel space needs it)
# prior sampling
prior_sampler = 'analytic'      # 'analytic' | 'euler'
prior_steps = 1024
prior_sample_eps = 1e-5         # the prior's steps end at t = 1e-5 (SEDD's and the paper's)
prior_corrector = 'remdm'       # 'remdm' (ReMDM-cap) | 'paper' (the paper's, for t in (0.3, 0.55))
remask_eta = 0.0                # the corrector's eta; 0 = no corrector
# text model sampling (the paper's: one code token per step in random order, temperature 0.2)
text_sampler = 'random_order'   # 'random_order' | 'confidence' | 'analytic' | 'euler'
text_steps = 0                  # 0 = L
text_temperature = 0.2
text_cfg_scale = 1.0            # guidance on the prompt; 1 = none (the paper's)
# output
batch_size = 32                 # images per process per forward
n_grid = 64
save_pngs = False
allow_mix = False               # True: use a tokenizer, prior or text model whose codes are not
                                # the DiT's (another tokenizer run or dataset) anyway
device = 'cuda' if torch.cuda.is_available() else 'cpu'
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple))]
CONFIG = {k: globals()[k] for k in config_keys}
MODES = ('recon', 'uncond', 'compose', 'class', 'plain', 'text')
OUTPUT_ONLY = ('mode', 'out_dir', 'n_grid', 'save_pngs', 'device', 'allow_mix')     # what a relaunch may change


# -----------------------------------------------------------------------------
# Composition: a pure function of the sources' SEM logits

def compose_code(logits, tau, generator):
    """logits (K, L, V): the SEM logits of K source images. Returns one (L,) code, token l drawn
    from the average over the sources of softmax(z_l / tau), with `generator`. In float64, so
    that the average of K near-one-hot rows is exactly a mixture of the K argmax tokens."""
    p = torch.softmax(logits.double() / tau, dim=-1).mean(dim=0)        # (L, V)
    return torch.multinomial(p, 1, generator=generator).squeeze(1)


def seeds_of(cfg, indices):
    """(code seeds, image seeds) of global sample indices."""
    base = [cfg['seed'] * 1_000_003 + i for i in indices]
    return [2 * b + 1 for b in base], [2 * b for b in base]


# -----------------------------------------------------------------------------
# Models, each from its checkpoint alone, and the checks that they fit together

def public_dit_from_weights(path, state):
    """A class-conditional DiT rebuilt from a bare state dict (DiT-XL-2-256x256.pt and its kin):
    the size and patch are read off the tensor shapes, the heads from D.DiT_models. Returns
    (model, checkpoint-like info: objective eps, space, image size)."""
    state = state.get('ema', state)
    if 'y_embedder.embedding_table.weight' not in state:
        raise UserError(f"'{path}' is not a class-conditional DiT state dict "
                         "(no y_embedder.embedding_table)")
    hidden, in_channels, patch, _ = state['x_embedder.proj.weight'].shape
    depth = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
    sizes = [v for v in D.DiT_models.values()
             if (v['hidden_size'], v['depth'], v['patch_size']) == (hidden, depth, patch)]
    heads = sizes[0]['num_heads'] if sizes else \
        max(h for h in (16, 12, 8, 6, 4, 2, 1) if hidden % h == 0)
    input_size = int(math.sqrt(state['pos_embed'].shape[1])) * patch
    learn_sigma = state['final_layer.linear.weight'].shape[0] == 2 * in_channels * patch ** 2
    args = dict(input_size=input_size, patch_size=patch, in_channels=in_channels,
                hidden_size=hidden, depth=depth, num_heads=heads, learn_sigma=learn_sigma,
                cond='class', num_classes=state['y_embedder.embedding_table.weight'].shape[0] - 1)
    model = D.DiT(**args)
    model.load_state_dict(state, strict=True)
    latent = in_channels == 4
    info = dict(objective='eps', space='latent' if latent else 'pixel', cond='class',
                model_args=args, image_size=input_size * 8 if latent else input_size, config={})
    return model.eval(), info


def load_image_model(cfg, want_cond, device):
    """The DiT and what its checkpoint says about it (objective, space, image size, cond, L, V)."""
    source = os.path.join(cfg['diffusion_dir'], 'diffusion.pt')
    if want_cond == 'class' and cfg['class_dit']:
        source = cfg['class_dit']
    if want_cond == 'none' and cfg['plain_dit']:
        source = cfg['plain_dit']
    info = D.load_checkpoint(source)
    if cfg['dit_weights'] not in ('ema', 'model'):
        raise UserError(f"dit_weights='{cfg['dit_weights']}': 'ema' or 'model'")
    if 'model_args' in info:
        model = D.model_from_checkpoint(info, cfg['dit_weights'])
    else:                                       # a bare state dict: the public class DiT's
        model, info = public_dit_from_weights(source, info)
    if info['cond'] != want_cond:
        hint = {'class': " (or --class_dit at DiT-XL-2-256x256.pt)",
                'none': " (or --plain_dit at its diffusion.pt)"}.get(want_cond, '')
        raise UserError(f"this mode needs a DiT with cond='{want_cond}', but {source} has "
                         f"cond='{info['cond']}'; point --diffusion_dir at one trained with "
                         f"that conditioning{hint}")
    D.check_sampler(info['objective'], cfg['dit_sampler'])
    side = int(round(model.pos_embed.shape[1] ** 0.5)) * model.patch_size
    vae = None
    if info['space'] == 'latent':
        if not cfg['vae_path']:
            raise UserError(f"{source} generates SD-VAE latents: set --vae_path to "
                             "sd-vae-ft-ema's weights")
        vae = D.load_vae(cfg['vae_path']).to(device).eval()
        channels = vae.post_quant_conv.in_channels
        factor = 2 ** (len(vae.decoder.up_blocks) - 1)      # all but the last upsample
        if model.in_channels != channels or side * factor != info['image_size']:
            raise UserError(f"{source} makes {model.in_channels} x {side} x {side} latents of "
                             f"{info['image_size']} px images, which the VAE in {cfg['vae_path']} "
                             f"({channels} channels, {factor}x upsampling) "
                             "does not decode to that size")
    elif model.in_channels != 3 or side != info['image_size']:
        raise UserError(f"{source} is a pixel-space DiT of {model.in_channels} x {side} x {side}, "
                         "not of RGB images "
                         f"of {info['image_size']} px")
    return model.to(device), info, vae, source, (model.in_channels, side, side)


def check_code_contract(what, path, ckpt, identity, info, dit_source, cfg):
    """The tokenizer, prior or text model in path must make the codes the DiT was trained on:
    their (L, V), and the tokenizer run they come from (identity)."""
    if (ckpt['L'], ckpt['V']) != (info['L'], info['V']):
        raise UserError(f"the {what} in {path} makes codes of L={ckpt['L']}, V={ckpt['V']}, but "
                         f"the DiT in {dit_source} was trained on L={info['L']}, V={info['V']}; "
                         f"use the {what} the DiT's codes came from")
    fix = {'tokenizer': "point --tokenizer_dir at the tokenizer whose codes the DiT was trained "
                        "on, or --diffusion_dir at a DiT trained on this one's",
           'prior': "train the prior on the codes the DiT was trained on (python prior.py "
                    "--codes_dir=...), or point --prior_dir at such a prior",
           'text model': "train the text model on the codes the DiT was trained on (python "
                         "text2dlc.py --codes_dir=...), or point --text2dlc_dir at such a model"}
    check_same_tokenizer(identity, path, info.get('codes_id'), dit_source, fix[what],
                         cfg['allow_mix'])


# -----------------------------------------------------------------------------
# Sources: dataset items or image files, grouped

def parse_groups(cfg, mode, n_items):
    """The source groups: lists of ints (dataset indices) or strings (files)."""
    n = cfg['n_samples']
    if not cfg['sources']:
        groups = [[i] if mode == 'recon' else [2 * i, 2 * i + 1] for i in range(n)]
    elif cfg['sources'].startswith('held_out'):     # built-in data: 'held_out' or 'held_out:3'
        meta = load_meta(cfg['data_dir'])
        if meta is None:
            raise UserError(f"--sources={cfg['sources']} needs the built-in data; "
                             f"'{cfg['data_dir']}' has no meta.json")
        factors = np.load(os.path.join(cfg['data_dir'], f"{cfg['split']}_factors.npy"))
        k = int(cfg['sources'].partition(':')[2] or 2)
        groups = held_out_pair_groups(factors, meta, n, k, cfg['seed'])
    else:
        groups = [[int(m) if m.strip().isdigit() else m.strip() for m in g.split('+')]
                  for g in cfg['sources'].split(',') if g.strip()]
    for g in groups:
        if mode == 'recon' and len(g) != 1:
            raise UserError(f"recon reconstructs one image per group, got "
                             f"{'+'.join(map(str, g))} in --sources")
        for m in g:
            if isinstance(m, int) and not (n_items and m < n_items):
                raise UserError(f"source index {m} is outside split '{cfg['split']}' of "
                                 f"'{cfg['data_dir']}' ({n_items} items)")
            if isinstance(m, str) and not os.path.exists(m):
                raise MissingFile(f"source image '{m}' not found (--sources takes dataset "
                                        "indices or files)")
    return groups


class Sources:
    """Source images: items of the split, or files, in the view of the tokenizer's dumps (arrays:
    resized to the tokenizer's size; folders and files: ADM's center_crop_arr at that size, the
    view in which the paper encodes the images it composes)."""
    def __init__(self, cfg, size):
        self.size = size
        self.dataset = None
        if has_split(cfg['data_dir'], cfg['split']):
            self.dataset = T.open_split(cfg['data_dir'], cfg['split'], self.size)

    def __len__(self):
        return len(self.dataset) if self.dataset is not None else 0

    def __getitem__(self, member):
        """uint8 (H, W, 3)."""
        if isinstance(member, str):
            return torch.from_numpy(load_image(member, self.size))
        if self.dataset is None:
            raise MissingFile("dataset indices in --sources need --data_dir and --split of "
                                    "an existing split")
        return self.dataset[member]

    def logits(self, encoder, members, device):
        """SEM logits (len(members), L, V) of source images; for codes without an encoder (a
        dump (N, L) and V), the one-hot of the items' codes, which any tau leaves one-hot."""
        if isinstance(encoder, tuple):
            if any(isinstance(m, str) for m in members):
                raise UserError("image files in --sources need a tokenizer checkpoint in "
                                 "--tokenizer_dir; its folder holds only a code dump")
            codes, V = encoder
            codes = torch.from_numpy(codes[list(members)].astype(np.int64))
            return torch.nn.functional.one_hot(codes, V).float().to(device)
        x = torch.cat([T.encoder_input(self[m][None], self.size, False, device) for m in members])
        return encoder.code_logits(x).float()


# -----------------------------------------------------------------------------
# The run: chunks of batch_size consecutive samples, shared out among the processes and kept
# on disk as they are drawn (cluster.draw_in_chunks), so that a killed run can continue

@torch.no_grad()
def run_mode(cfg, mode, rank, world, device):
    """Draw cfg['n_samples'] images of one mode; rank 0 returns (images, codes, extra)."""
    info_cond = {'class': 'class', 'plain': 'none'}.get(mode, 'dlc')
    dit, info, vae, dit_source, x_shape = load_image_model(cfg, info_cond, device)
    n = cfg['n_samples']
    used = {dit_source: info.get('iter_num')}                   # the checkpoints and their iters
    groups, sources, labels, prompts = None, None, None, None
    if mode in ('recon', 'compose'):
        path = os.path.join(cfg['tokenizer_dir'], 'tokenizer.pt')
        if os.path.exists(path):
            tok_ckpt = T.load_checkpoint(path)
            check_code_contract('tokenizer', path, tok_ckpt, tokenizer_identity(tok_ckpt), info,
                                dit_source, cfg)
            encoder, size = T.encoder_from_checkpoint(tok_ckpt).to(device), tok_ckpt['image_size']
            used[path] = tok_ckpt.get('iter_num')
        else:       # codes with no encoder (the built-in data's oracle codes): the split's dump
            contract = read_contract(cfg['tokenizer_dir'])
            check_fits(contract, info['L'], info['V'], cfg['tokenizer_dir'], f"the DiT {dit_source}",
                       '--tokenizer_dir')
            check_code_contract('tokenizer', os.path.join(cfg['tokenizer_dir'], SIDECAR), contract,
                                codes_identity(contract), info, dit_source, cfg)
            check_same_images(contract, cfg['tokenizer_dir'], cfg['split'], cfg['data_dir'],
                              cfg['allow_mix'])
            encoder = (load_codes(cfg['tokenizer_dir'], cfg['split'], contract=contract),
                       contract['V'])
            size, used[dump_path(cfg['tokenizer_dir'], cfg['split'])] = contract['image_size'], None
        sources = Sources(cfg, size)
        groups = parse_groups(cfg, mode, len(sources))
    elif mode == 'uncond':
        prior, prior_ckpt = P.load_prior(cfg['prior_dir'], device)
        path = os.path.join(cfg['prior_dir'], 'prior.pt')
        check_code_contract('prior', path, prior_ckpt, prior_ckpt.get('codes_id'), info,
                            dit_source, cfg)
        used[path] = prior_ckpt.get('iter_num')
    elif mode == 'text':
        text_model, text_ckpt, enc = T2D.load_text2dlc(cfg['text2dlc_dir'], device)
        path = os.path.join(cfg['text2dlc_dir'], 'text2dlc.pt')
        check_code_contract('text model', path, text_ckpt, text_ckpt.get('codes_id'), info,
                            dit_source, cfg)
        prompts = T2D.read_prompts(cfg['prompts'])
        if rank == 0:
            T2D.warn_unseen_words(enc, text_ckpt, prompts)
        used[path] = text_ckpt.get('iter_num')
    elif mode == 'class':
        n_classes = dit.null
        if cfg['labels'] == 'train':            # the training split's label frequencies
            train = D.read_conditions(dict(cfg, cond='class', num_classes=n_classes,
                                           image_size=info['image_size']), 'train', None)[0]
            gens = [torch.Generator().manual_seed(s) for s in seeds_of(cfg, range(n))[0]]
            labels = [int(train[torch.randint(len(train), (1,), generator=g)]) for g in gens]
        elif cfg['labels']:
            labels = [int(x) for x in str(cfg['labels']).split(',')]
            if max(labels) >= n_classes:
                raise UserError(f"label {max(labels)} is not a class of {dit_source} "
                                 f"({n_classes} classes)")
        else:
            gens = [torch.Generator().manual_seed(s) for s in seeds_of(cfg, range(n))[0]]
            labels = [int(torch.randint(n_classes, (1,), generator=g)) for g in gens]

    # the prior samples in bf16 on CUDA, as prior.py does; the DiT and the tokenizer in fp32 (TF32)
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if 'cuda' in device else nullcontext()
    own_scale = mode == 'compose' and cfg['compose_cfg_scale'] >= 0
    scale = cfg['compose_cfg_scale'] if own_scale else cfg['cfg_scale']
    flow_output = info['config'].get('flow_output', 'velocity')

    def draw(idx):
        """The images (and codes) of the global sample indices idx."""
        code_seeds, image_seeds = seeds_of(cfg, idx)
        if mode in ('recon', 'compose'):
            batch_groups = [groups[i % len(groups)] for i in idx]
            members = sorted({m for g in batch_groups for m in g}, key=str)
            z = dict(zip(members, sources.logits(encoder, members, device)))
            if mode == 'recon':
                y = torch.stack([z[g[0]].argmax(-1) for g in batch_groups])
            elif cfg['compose_soft']:
                y = torch.stack([torch.softmax(torch.stack([z[m] for m in g]).double()
                                               / cfg['compose_tau'], -1).mean(0)
                                 for g in batch_groups]).float()
            else:
                y = torch.stack([compose_code(torch.stack([z[m] for m in g]), cfg['compose_tau'],
                                              torch.Generator().manual_seed(s))
                                 for g, s in zip(batch_groups, code_seeds)])
        elif mode == 'uncond':
            y = P.generate(prior, len(idx), cfg['prior_steps'], cfg['prior_sampler'],
                           prior_ckpt['noise_eps'], code_seeds, device, len(idx), cfg['remask_eta'],
                           autocast=autocast, progress=False, t_end=cfg['prior_sample_eps'],
                           corrector=cfg['prior_corrector'])
        elif mode == 'text':
            y = T2D.generate(text_model, enc, text_ckpt, [prompts[i % len(prompts)] for i in idx],
                             code_seeds, device, cfg['text_sampler'], cfg['text_steps'],
                             cfg['text_temperature'], cfg['text_cfg_scale'], len(idx),
                             autocast=autocast, progress=False)
        elif mode == 'class':
            y = torch.tensor([labels[i % len(labels)] for i in idx])
        else:                                           # plain: no condition
            y = None
        y = None if y is None else y.to(device)
        x = D.sample(D.guided(dit, y, scale, info['objective'], cfg['guidance_interval']), x_shape,
                     image_seeds, info['objective'], cfg['dit_sampler'], cfg['dit_steps'], device,
                     clip=cfg['clip_denoised'], flow_output=flow_output)
        out = dict(images=D.decode_to_uint8(x, vae))
        if mode not in ('class', 'plain'):
            y = y.argmax(-1) if y.is_floating_point() else y
            out['codes'] = y.cpu().numpy().astype(np.uint16 if info['V'] <= 65536 else np.uint32)
        return out

    # every setting that changes the images: a relaunch with others may not mix its chunks in
    settings = {k: v for k, v in cfg.items() if k not in OUTPUT_ONLY}
    run_info = dict(settings, mode=mode, checkpoints=used)
    parts = os.path.join(cfg['out_dir'], f'{mode}.parts')
    full = draw_in_chunks(n, cfg['batch_size'], parts, run_info, rank, world, draw, desc=mode)
    if rank != 0:
        return None
    extra = dict(groups=groups, sources=sources, labels=labels, prompts=prompts)
    return full['images'], full.get('codes'), extra


def fit(image, size):
    """A uint8 image resized to size x size, for the grid."""
    image = np.asarray(image)
    return image if image.shape[0] == size else \
        np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def write_outputs(cfg, mode, images, codes, extra):
    """<mode>.npz and <mode>_codes.npy (atomic), the grid, per-image PNGs; then the chunks go."""
    out = cfg['out_dir']
    save_atomic(dict(arr_0=images), os.path.join(out, f'{mode}.npz'))
    if codes is not None:
        save_atomic(np.asarray(codes), os.path.join(out, f'{mode}_codes.npy'))
    n_show, size, grid = min(cfg['n_grid'], len(images)), images.shape[1], f'{out}/{mode}.png'
    if extra['groups'] is not None:           # each entry: its sources, then the result
        groups = [extra['groups'][i % len(extra['groups'])] for i in range(n_show)]
        K = max(len(g) for g in groups)
        blank = np.full_like(images[0], 255)
        tiles = []
        for i, g in enumerate(groups):
            tiles += [fit(extra['sources'][m].numpy(), size) for m in g]
            tiles += [blank] * (K - len(g)) + [images[i]]
        D.save_grid(np.stack(tiles), grid, ncol=(K + 1) * max(1, 16 // (K + 1)))
    elif extra['prompts'] is not None:
        prompts = [extra['prompts'][i % len(extra['prompts'])] for i in range(n_show)]
        captioned_grid(images[:n_show], prompts, grid, ncol=min(8, n_show))
    else:
        D.save_grid(images[:n_show], grid, ncol=min(16, n_show))
    if cfg['save_pngs']:
        os.makedirs(os.path.join(out, mode), exist_ok=True)
        for i, im in enumerate(images):
            Image.fromarray(im).save(os.path.join(out, mode, f'{i:06d}.png'))
    shutil.rmtree(os.path.join(out, f'{mode}.parts'))       # only now that every output is whole
    print(f"wrote {out}/{mode}.npz ({len(images)} images), {grid}"
          + (f", {out}/{mode}_codes.npy" if codes is not None else '')
          + (f", {out}/{mode}/*.png" if cfg['save_pngs'] else ''))


def captioned_grid(images, captions, path, ncol, side=128, lines=4):
    """A grid of images, each enlarged to side x side with its caption wrapped beneath it."""
    line_height, width = 12, side // 6                          # the default bitmap font: 6 x 11 px
    tile_h = side + lines * line_height + 4
    nrow = math.ceil(len(images) / ncol)
    canvas = Image.new('RGB', (ncol * (side + 4), nrow * tile_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % ncol) * (side + 4), (i // ncol) * tile_h
        canvas.paste(Image.fromarray(np.asarray(image)).resize((side, side), Image.NEAREST), (x, y))
        for j, line in enumerate(textwrap.wrap(caption, width)[:lines]):
            draw.text((x + 2, y + side + 2 + j * line_height), line, fill=(0, 0, 0))
    canvas.save(path)


# -----------------------------------------------------------------------------
# Scores on the built-in data: the attribute reader of data/shapes

def reader_scores(cfg, mode, images, extra):
    """valid, and per mode: recon/class the source's (label's) shape and color kept; compose
    every factor taken from a source, a combination equal to no source, a (shape, color) pair
    held out of training; text the factors each prompt names kept; uncond the factor
    histograms' distance to the training set (uncond, plain and class: histogram_scores)."""
    if mode in ('uncond', 'plain'):
        scores = histogram_scores(cfg['data_dir'], images)
        return dict(n=len(images), **scores) if scores else {}
    read, meta = read_builtin(cfg['data_dir'], images)
    if read is None:
        return {}
    scores = dict(n=len(images), valid=float(read['valid'].mean()))
    at = lambda values: [values[i % len(values)] for i in range(len(images))]
    if mode == 'text':
        kept = named_factors_kept(read, at(extra['prompts']), meta)
        scores.update({('kept' if k == 'shape_and_color' else f'{k}_kept'): v
                       for k, v in kept.items()})
        shares = ', '.join(f"{k} {v:.3f}" for k, v in scores.items() if k.endswith('kept'))
        print('text: the factors the prompts name, kept in the images (share of the prompts '
              f'naming each): {shares}')
        return scores
    if mode == 'class':
        shape, color = np.divmod(np.array(at(extra['labels'])), len(meta['color']))
        return dict(scores, kept=factors_kept(read, shape, color),
                    **histogram_scores(cfg['data_dir'], images))
    groups = at(extra['groups'])
    if any(isinstance(m, str) for g in groups for m in g):
        return scores                                  # files: no factors to compare with
    factors = np.load(os.path.join(cfg['data_dir'], f"{cfg['split']}_factors.npy"))
    if mode == 'recon':
        source = factors[[g[0] for g in groups]]
        return dict(scores, kept=factors_kept(read, source[:, 0], source[:, 1]))
    return dict(scores, **composition_scores(read, factors, groups, meta))


def main(cfg):
    modes = [m.strip() for m in cfg['mode'].split(',')]
    for m in modes:
        if m not in MODES:
            raise UserError(f"--mode={m} is not one of {MODES}")
    check_counts(cfg, 'n_samples', 'batch_size', 'dit_steps', 'prior_steps')
    check_counts(cfg, 'n_grid', 'text_steps', minimum=0)
    check_finite(cfg, 'compose_tau', 'text_temperature', low=1e-8)
    check_finite(cfg, 'cfg_scale', 'compose_cfg_scale', 'text_cfg_scale')
    check_finite(cfg, 'remask_eta', 'prior_sample_eps', low=0.0, high=1.0)
    P.check_sampling(cfg['prior_sampler'], cfg['prior_corrector'], cfg['remask_eta'])
    rank, world, device = setup_distributed(cfg['device'])
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results = {}
    for m in modes:
        t0 = time.time()
        out = run_mode(cfg, m, rank, world, device)
        if rank == 0:
            images, codes, extra = out
            write_outputs(cfg, m, images, codes, extra)
            results[m] = dict(reader_scores(cfg, m, images, extra), seconds=time.time() - t0)
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        with open(os.path.join(cfg['out_dir'], 'scores.json'), 'w') as f:
            json.dump(results, f, indent=1)
        if any(len(s) > 1 for s in results.values()):
            print_table(results)
    return results


if __name__ == '__main__':
    command_line(CONFIG, sys.argv[1:], main, __file__)
