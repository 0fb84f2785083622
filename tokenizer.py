"""
tokenizer.py: the SEM encoder that turns an image into a Discrete Latent Code (DLC).

The method (Lavoie, Noukhovitch, Courville 2025, arXiv 2507.12318, section 3)
-----------------------------------------------------------------------------
A ViT in the DINOv2 layout (CLS token, R = 4 register tokens, LayerScale) reads an image.
The Simplicial Embedding (SEM) head reads the final block's *pre-norm* outputs of the CLS
token and the registers, h in R^{(1+R) x D}, flattened:

    z   = LayerNorm(W_in  vec(h))              W_in: (1+R)D -> L*V, no bias
    p_l = softmax(z_l / tau),  l = 1..L        each group of V logits is one simplex
    s   = norm(W_out vec(p))                   W_out: L*V -> D, no bias; norm = backbone's

s replaces the CLS token as the image representation seen by the self-supervised loss.
The DLC is the argmax of each group,   c_l = argmax_v z_{l,v}   (= the tau -> 0 limit of p),
a sequence of L tokens from a vocabulary of V. tau = 1 during training.

Training is DINOv2's self-distillation (ssl_loss = 'dino', the ImageNet recipe): a teacher,
the EMA of the student, sees two global crops; the student sees those and several local
crops. With K prototypes, P_t = softmax((g_t(s) - center) / T_t), P_s = softmax(g_s(s) / T_s):

    L_DINO  = mean over (teacher global crop, different student crop) of  -sum_k P_t log P_s
    L_iBOT  = the same cross-entropy on the patch tokens the student saw masked (teacher unmasked)
    L_KoLeo = sum over the 2 global crops of -mean_i log min_{j != i} || s_i/|s_i| - s_j/|s_j| ||
    L = L_DINO + w_iBOT L_iBOT + w_KoLeo L_KoLeo

At CPU scale from scratch DINO learns slowly; ssl_loss = 'infonce' trains the same encoder with
SimCLR's loss on s instead: projections q = normalize(mlp(s)) of two views, each picking its
partner among the 2B - 1 others at temperature T. The SEM, codes and all downstream are the same.

Modes:  python tokenizer.py [config.py] [--key=value ...]
    --mode=train   self-supervised training (torchrun for DDP), writes out_dir/tokenizer.pt
    --mode=dump    writes out_dir/codes_<split>.npy, uint16 (N, L), row i = dataset item i,
                   for each split of dump_split, and the sidecar codes.json (L, V, image size,
                   this checkpoint, split sizes) that the other components check them by;
                   folder images in the paper's view (ADM's center_crop_arr at image_size)
    --mode=probe   linear probe on one-hot codes (L*V features) of the dumps: accuracy per
                   label on a held-out split, codebook usage; saves out_dir/probe.pt (on the
                   built-in data, python data/shapes/score.py codes reads it with the dumps)
    --mode=import  writes out_dir/tokenizer.pt from the paper's encoder (init_from = its DINOv2
                   fork's teacher_checkpoint.pth), for dump, probe and sample.py
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from cluster import (exit_preempted, handle_preemption_signals, preemption_requested, resuming,
                     save_atomic, setup_distributed)
from codes import (check_codes, dump_path, fingerprint_images, load_array, load_codes, new_run_id,
                   read_checkpoint, tokenizer_identity, write_codes)
from configurator import MissingFile, UserError, check_counts, check_finite, command_line
from images import ImageFolder, array_path, missing_split   # a split: an array or a folder

# -----------------------------------------------------------------------------
# config: the defaults are the paper's ImageNet recipe (DINOv2 ViT-L/14 reg4, DLC512 = 512 x 256)
mode = 'train'                  # 'train' | 'dump' | 'probe' | 'import'
out_dir = 'out-tokenizer'
init_from = 'scratch'           # 'scratch' | 'resume' | dinov2_vit{s,b,l}14_reg4_pretrain.pth path
auto_resume = False             # resume from out_dir's checkpoint if there is one (cluster jobs)
data_dir = 'data/imagenet'      # <split>_images.npy, or a folder <split>/ of images (images.py)
train_split = 'train'
seed = 0
# model
patch_size = 14
embed_dim = 1024
depth = 24
num_heads = 16
n_registers = 4
image_size = 224                # global crop size = the size codes are computed at
drop_path_rate = 0.3
layerscale_init = 1e-5
L = 512                         # tokens per code
V = 256                         # vocabulary per token (L * V = 2^17 in the paper)
tau = 1.0                       # SEM softmax temperature during training
# loss
ssl_loss = 'dino'               # 'dino' (DINOv2: DINO + iBOT + KoLeo) | 'infonce'
n_prototypes = 65536
head_hidden_dim = 2048
head_bottleneck_dim = 256
head_layers = 3
student_temp = 0.1
teacher_temp = 0.07
warmup_teacher_temp = 0.04
warmup_teacher_temp_frac = 0.3  # teacher temperature goes 0.04 -> 0.07 over this fraction
centering = 'center'            # 'center' (EMA mean, DINO) | 'sinkhorn' (DINOv2's ViT-L runs)
center_momentum = 0.9
ibot_weight = 1.0
mask_prob = 0.5                 # fraction of images whose two global crops get patch masks
mask_ratio = (0.1, 0.5)
koleo_weight = 0.1
infonce_temp = 0.1
momentum_teacher = 0.992        # -> 1.0 by a cosine
# augmentation: multi-crop, done on the device for the whole batch at once
global_crop_scale = (0.32, 1.0)
n_local_crops = 8
local_crop_size = 98
local_crop_scale = (0.05, 0.32)
hflip = True
color_jitter_prob = 0.8         # brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1
grayscale_prob = 0.2
blur_prob = (1.0, 0.1, 0.5)     # (global crop 1, global crop 2, local crops)
solarize_prob = (0.0, 0.2, 0.0)
# optimization
batch_size = 256                # global, across all processes
max_iters = 125000
run_iters = -1                  # stop this run after so many iterations (schedules span max_iters)
learning_rate = 1e-4            # at batch 1024; scaled by sqrt(batch_size / 1024)
min_lr = 1e-6
warmup_iters = 12500
weight_decay = 0.04
weight_decay_end = 0.4
layer_decay = 0.9
patch_embed_lr_mult = 0.2       # the patch embedding learns at 0.2 x its layer's lr (DINOv2)
grad_clip = 3.0
freeze_last_layer_iters = 1250  # prototypes stay fixed at first (DINO's trick against collapse)
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
compile = False
grad_checkpoint = False
num_workers = 8                 # data loading processes for image folders
log_interval = 20
ckpt_interval = 1000
# dump / probe
dump_split = 'val'              # one split or several: 'train,val'
probe_train_split = 'train'
probe_eval_split = 'val'
probe_iters = 300
dump_batch_size = 256
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple))]
CONFIG = {k: globals()[k] for k in config_keys}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the public DINOv2 backbones this file loads: (embed_dim, depth, num_heads), patch 14
DINOV2_SIZES = {'vits14': (384, 12, 6), 'vitb14': (768, 12, 12), 'vitl14': (1024, 24, 16)}


# -----------------------------------------------------------------------------
# The ViT in DINOv2's layout: parameter names match dinov2_vit*14_reg4_pretrain.pth

class PatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)

    def forward(self, x):                                   # (B, 3, H, W)
        return self.proj(x).flatten(2).transpose(1, 2)      # (B, H/p * W/p, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)         # (B, heads, N, D/heads)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


def drop_path(x, rate, training):
    """Stochastic depth: drop the residual branch of whole samples, rescale the kept ones."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class Block(nn.Module):
    def __init__(self, dim, num_heads, drop_path_rate, layerscale_init):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim, layerscale_init)
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path_rate, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path_rate, self.training)


def interpolate_pos_embed(pos_embed, grid_h, grid_w):
    """(1, 1 + n*n, D) -> (1, 1 + grid_h*grid_w, D) as DINOv2's register models resize them
    (interpolate_antialias=True, interpolate_offset=0): bicubic, antialiased, float32; CLS kept."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    n, D = int(math.sqrt(patch_pos.shape[1])), pos_embed.shape[-1]
    if (grid_h, grid_w) == (n, n):
        return pos_embed
    grid = patch_pos.reshape(1, n, n, D).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode='bicubic', antialias=True)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, D).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


class DinoVisionTransformer(nn.Module):
    def __init__(self, image_size, patch_size, embed_dim, depth, num_heads, n_registers,
                 drop_path_rate, layerscale_init, grad_checkpoint=False):
        super().__init__()
        self.patch_size = patch_size
        self.n_registers = n_registers
        self.grad_checkpoint = grad_checkpoint
        grid = image_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, n_registers, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        # DINOv2 raises the drop-path rate uniformly across depth for its large models
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, drop_path_rate, layerscale_init)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x, masks=None):
        """x: (B, 3, H, W) normalized images; masks: (B, N) bool, patches replaced by mask_token.
        Returns the final block's pre-norm tokens (B, 1 + R + N, D): [CLS, registers, patches]."""
        B, _, H, W = x.shape
        x = self.patch_embed(x)                                             # (B, N, D)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + interpolate_pos_embed(self.pos_embed, H // self.patch_size, W // self.patch_size)
        x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            if self.grad_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


# -----------------------------------------------------------------------------
# The Simplicial Embedding head and the projection head of the SSL loss

class SimplicialEmbedding(nn.Module):
    def __init__(self, n_in_tokens, dim, L, V):
        super().__init__()
        self.L, self.V = L, V
        self.proj_in = nn.Linear(n_in_tokens * dim, L * V, bias=False)
        self.norm = nn.LayerNorm(L * V, eps=1e-6)             # the fork's sem_norm eps
        self.proj_out = nn.Linear(L * V, dim, bias=False)

    def logits(self, h):                                    # h: (B, 1+R, D) pre-norm tokens
        z = self.norm(self.proj_in(h.flatten(1)))           # (B, L*V)
        return z.view(-1, self.L, self.V)                   # (B, L, V)

    def forward(self, h, tau):
        z = self.logits(h)
        p = F.softmax(z.float() / tau, dim=-1).to(z.dtype)  # (B, L, V): L points on simplices
        return z, self.proj_out(p.flatten(1))               # (B, L, V), (B, D)


class DINOHead(nn.Module):
    """MLP -> bottleneck -> l2-normalize -> prototypes (weight-normalized, no bias)."""
    def __init__(self, dim, n_prototypes, hidden_dim, bottleneck_dim, n_layers):
        super().__init__()
        dims = [dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers = []
        for i in range(n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        # infonce stops at the projection and needs no prototypes
        self.last_layer = (nn.Linear(bottleneck_dim, n_prototypes, bias=False) if n_prototypes
                           else None)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def project(self, x):
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x):
        return F.linear(self.project(x), F.normalize(self.last_layer.weight, dim=1))


class SEMEncoder(nn.Module):
    def __init__(self, image_size, patch_size, embed_dim, depth, num_heads, n_registers,
                 drop_path_rate, layerscale_init, L, V, n_prototypes, head_hidden_dim,
                 head_bottleneck_dim, head_layers, grad_checkpoint=False):
        super().__init__()
        self.backbone = DinoVisionTransformer(image_size, patch_size, embed_dim, depth, num_heads,
                                              n_registers, drop_path_rate, layerscale_init,
                                              grad_checkpoint)
        self.sem = SimplicialEmbedding(1 + n_registers, embed_dim, L, V)
        self.head = DINOHead(embed_dim, n_prototypes, head_hidden_dim, head_bottleneck_dim,
                             head_layers)

    def forward(self, x, tau=1.0, masks=None):
        """SEM logits (B, L, V), normed SEM output (B, D) and normed patch tokens (B, N, D)."""
        h = self.backbone(x, masks)
        n_special = 1 + self.backbone.n_registers
        z, s = self.sem(h[:, :n_special], tau)
        return z, self.backbone.norm(s), self.backbone.norm(h[:, n_special:])

    @torch.no_grad()
    def code_logits(self, x):
        """The SEM logits z of normalized images x: (B, 3, H, W) -> (B, L, V)."""
        h = self.backbone(x)
        return self.sem.logits(h[:, :1 + self.backbone.n_registers])

    def encode(self, x):
        """The DLC of normalized images x: (B, 3, H, W) -> (B, L) token indices."""
        return self.code_logits(x).argmax(dim=-1)


def model_args_from(cfg):
    return dict(image_size=cfg['image_size'], patch_size=cfg['patch_size'],
                embed_dim=cfg['embed_dim'], depth=cfg['depth'], num_heads=cfg['num_heads'],
                n_registers=cfg['n_registers'], drop_path_rate=cfg['drop_path_rate'],
                layerscale_init=cfg['layerscale_init'], L=cfg['L'], V=cfg['V'],
                n_prototypes=cfg['n_prototypes'] if cfg['ssl_loss'] == 'dino' else 0,
                head_hidden_dim=cfg['head_hidden_dim'],
                head_bottleneck_dim=cfg['head_bottleneck_dim'], head_layers=cfg['head_layers'])


def load_dinov2_backbone(backbone, path):
    """Load a public DINOv2 checkpoint (dinov2_vit{s,b,l}14_reg4_pretrain.pth) into the backbone
    with strict=True, resizing the 37 x 37 position grid (518 px) to the training resolution."""
    if not os.path.exists(path):
        raise MissingFile(
            f"DINOv2 weights '{path}' not found. Download dinov2_vitl14_reg4_pretrain.pth from "
            "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/ and pass --init_from=<path>.")
    state = torch.load(path, map_location='cpu', weights_only=True)
    dim = state['pos_embed'].shape[-1]
    depth = sum(k.endswith('.ls1.gamma') for k in state)
    if dim != backbone.pos_embed.shape[-1] or depth != len(backbone.blocks):
        found = next((n for n, (d, _, _) in DINOV2_SIZES.items() if d == dim), '?')
        e, d, h = DINOV2_SIZES.get(found, (0, 0, 0))
        raise UserError(f"'{path}' holds a DINOv2 {found} backbone; set --embed_dim={e} "
                         f"--depth={d} --num_heads={h} --patch_size=14 to load it")
    n = int(math.sqrt(backbone.pos_embed.shape[1] - 1))
    state['pos_embed'] = interpolate_pos_embed(state['pos_embed'], n, n)
    backbone.load_state_dict(state, strict=True)


# The paper's DINOv2 fork (vit_large_sem) keeps the SEM inside the ViT, under these names
FORK_SEM_NAMES = {'sem_embed.weight': 'sem.proj_in.weight', 'sem_norm.weight': 'sem.norm.weight',
                  'sem_norm.bias': 'sem.norm.bias', 'sem_out.weight': 'sem.proj_out.weight'}


def load_fork_checkpoint(model, path):
    """Load the paper's encoder into model's backbone and SEM, every key checked, from the
    fork's eval/<iteration>/teacher_checkpoint.pth = {'teacher': {'backbone.*', 'dino_head.*'}}
    or the backbone's keys alone, its 37 x 37 position grid resized. Left out: the DINO head
    (it starts afresh) and sem_cls_norm, which the fork defines but never applies."""
    if not os.path.exists(path):
        raise MissingFile(f"the paper's encoder checkpoint '{path}' not found")
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    state, source = {}, {}
    for key, value in ckpt.get('teacher', ckpt).items():
        name = key.removeprefix('backbone.')
        if key.startswith('dino_head.') or name.startswith('sem_cls_norm.'):
            continue
        ours = FORK_SEM_NAMES.get(name, 'backbone.' + name)
        state[ours], source[ours] = value, key
    expected = {k for k in model.state_dict() if not k.startswith('head.')}
    to_fork = {v: k for k, v in FORK_SEM_NAMES.items()}
    missing = sorted(to_fork.get(k, k.removeprefix('backbone.')) for k in expected - set(state))
    unexpected = sorted(source[k] for k in set(state) - expected)
    if missing or unexpected:
        raise UserError(f"'{path}' does not fit this model (the fork's vit_*_sem with "
                         f"n_registers={model.backbone.n_registers}, depth="
                         f"{len(model.backbone.blocks)}): it lacks {missing} and has unexpected "
                         f"{unexpected}")
    n = int(math.sqrt(model.backbone.pos_embed.shape[1] - 1))
    state['backbone.pos_embed'] = interpolate_pos_embed(state['backbone.pos_embed'], n, n)
    state.update({k: v for k, v in model.state_dict().items() if k.startswith('head.')})
    model.load_state_dict(state, strict=True)


# -----------------------------------------------------------------------------
# Data: the built-in .npy arrays or an image folder (ImageNet layout), as uint8 (H, W, 3)

class ImageArray(torch.utils.data.Dataset):
    """<data_dir>/<split>_images.npy: uint8 (N, H, W, 3), as data/shapes/prepare.py writes."""
    def __init__(self, path):
        self.images = load_array(path, 'python data/shapes/prepare.py', mmap_mode='r')
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise UserError(f"{path}: expected uint8 (N, H, W, 3) images, got {self.images.dtype} "
                             f"{self.images.shape}")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.images[i]))


def open_split(data_dir, split, size):
    """A split as uint8 (H, W, 3) items: the array, or a folder read at `size` (images.py)."""
    if os.path.exists(array_path(data_dir, split)):
        return ImageArray(array_path(data_dir, split))
    if os.path.isdir(os.path.join(data_dir, split)):
        return ImageFolder(data_dir, split, size)
    raise missing_split(data_dir, split)


def split_labels(data_dir, split, dataset):
    """Labels the probe predicts: the factors of the built-in data, or the folder's classes."""
    if isinstance(dataset, ImageFolder):
        if dataset.labels is None:
            raise MissingFile(f"the probe needs the classes of '{dataset.root}': class "
                              f"subfolders, or {data_dir}/{split}_labels.txt (images.py)")
        return {'class': dataset.labels}
    factors = np.load(os.path.join(data_dir, f'{split}_factors.npy'))
    with open(os.path.join(data_dir, 'meta.json')) as f:
        names = json.load(f)['factors']
    labels = {name: factors[:, i] for i, name in enumerate(names)}
    pos_path = os.path.join(data_dir, f'{split}_pos.npy')
    if os.path.exists(pos_path):   # position as a 3 x 3 cell: what the codes keep of where
        cell = np.clip((np.load(pos_path) * 3).astype(np.int64), 0, 2)
        labels['position'] = cell[:, 1] * 3 + cell[:, 0]
    return labels


class BatchSampler:
    """This process's dataset indices of each global batch from iteration `start` on. Epochs are
    seeded permutations: resume is exact and batches do not depend on the number of processes."""
    def __init__(self, n, batch_size, start, stop, seed, rank, world):
        self.n, self.batch_size, self.start, self.stop, self.seed = n, batch_size, start, stop, seed
        self.part = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
        self.epoch, self.perm = None, None

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        per_epoch = self.n // self.batch_size
        for it in range(self.start, self.stop):
            epoch, step = divmod(it, per_epoch)
            if epoch != self.epoch:
                gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                self.epoch, self.perm = epoch, torch.randperm(self.n, generator=gen)
            yield self.perm[step * self.batch_size:(step + 1) * self.batch_size][self.part].tolist()


# -----------------------------------------------------------------------------
# Augmentation on the device, a whole batch at once. The random numbers of iteration `it` come
# from a CPU generator seeded by (seed, it), drawn for the whole global batch, of which each
# process uses its rows: the views do not depend on the number of processes.
# `part` = (global batch size, this process's slice).

def uniform(gen, n_crops, part, lo=0.0, hi=1.0):
    """(n_crops * local batch,) uniforms in [lo, hi), crop-major, this process's rows."""
    total, rows = part
    return lo + (hi - lo) * torch.rand(n_crops, total, generator=gen)[:, rows].reshape(-1)


def random_resized_crops(x, n_crops, out_size, scale, flip, gen, part):
    """x: (B, 3, H, W) in [0, 1] -> (n_crops * B, 3, out, out), crop-major. Each crop covers a
    random area fraction in `scale` with aspect ratio in [3/4, 4/3], cut by bilinear grid_sample."""
    area = uniform(gen, n_crops, part, *scale)
    ratio = uniform(gen, n_crops, part, math.log(3 / 4), math.log(4 / 3)).exp()
    w = torch.sqrt(area * ratio).clamp(max=1.0)            # fraction of the image width
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (uniform(gen, n_crops, part) * 2 - 1) * (1 - w)   # center, in [-1, 1] coordinates
    cy = (uniform(gen, n_crops, part) * 2 - 1) * (1 - h)
    flips = uniform(gen, n_crops, part) < 0.5
    sign = torch.where(flips & flip, -1.0, 1.0)
    theta = torch.zeros(len(area), 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, (len(area), 3, out_size, out_size), align_corners=False)
    src = x.repeat(n_crops, 1, 1, 1)
    return F.grid_sample(src, grid, mode='bilinear', padding_mode='border', align_corners=False)


def color_augment(x, n_crops, jitter_prob, gray_prob, blur_prob, solarize_prob, gen, part):
    """DINOv2's photometric augmentations of x (n, 3, S, S) in [0, 1], batched: color jitter,
    grayscale, Gaussian blur (sigma 0.1-2 px at 224 px), solarization."""
    S = x.shape[-1]
    def per_image(lo=0.0, hi=1.0):
        return uniform(gen, n_crops, part, lo, hi).to(x.device).view(-1, 1, 1, 1)
    gray_w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    if jitter_prob > 0:
        apply = per_image() < jitter_prob
        y = (x * per_image(0.6, 1.4)).clamp(0, 1)
        mean = (y * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        y = ((y - mean) * per_image(0.6, 1.4) + mean).clamp(0, 1)
        gray = (y * gray_w).sum(1, keepdim=True)
        y = ((y - gray) * per_image(0.8, 1.2) + gray).clamp(0, 1)
        y = rotate_hue(y, per_image(-0.1, 0.1).view(-1) * 2 * math.pi).clamp(0, 1)
        x = torch.where(apply, y, x)
    if gray_prob > 0:
        x = torch.where(per_image() < gray_prob, (x * gray_w).sum(1, keepdim=True).expand_as(x), x)
    if blur_prob > 0:
        apply = per_image() < blur_prob
        x = torch.where(apply, gaussian_blur(x, per_image(0.1, 2.0).view(-1) * S / 224), x)
    if solarize_prob > 0:
        x = torch.where(per_image() < solarize_prob, torch.where(x >= 0.5, 1 - x, x), x)
    return x


def rotate_hue(x, angle):
    """Rotate the hue by `angle` radians per image: a rotation about the gray axis in YIQ space."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          device=x.device)
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(angle), 3, 3, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq                 # (n, 3, 3)
    return torch.einsum('nij,njhw->nihw', m, x)


def gaussian_blur(x, sigma):
    """Separable Gaussian blur with a per-image sigma (pixels), as one grouped convolution."""
    n, c, S, _ = x.shape
    radius = min(S - 1, max(1, int(math.ceil(3 * float(sigma.max())))))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None].to(x.dtype) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)   # (n*c, 2r+1)
    nc = n * c
    y = x.reshape(1, nc, S, S)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode='reflect'), k[:, None, None, :], groups=nc)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode='reflect'), k[:, None, :, None], groups=nc)
    return y.view(n, c, S, S)


def normalize(x):
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def to_float_images(batch, device):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1] on the device."""
    return batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255


def make_views(x, c, gen, part):
    """The multi-crop views of a batch x (B, 3, H, W) in [0, 1], normalized:
    global (2B, 3, S, S) and local (n_local * B, 3, s, s) or None, crop-major."""
    jitter, gray = c['color_jitter_prob'], c['grayscale_prob']
    blur, solar = c['blur_prob'], c['solarize_prob']
    B = x.shape[0]
    g = random_resized_crops(x, 2, c['image_size'], c['global_crop_scale'], c['hflip'], gen, part)
    g = torch.cat([color_augment(g[:B], 1, jitter, gray, blur[0], solar[0], gen, part),
                   color_augment(g[B:], 1, jitter, gray, blur[1], solar[1], gen, part)])
    local = None
    if c['n_local_crops'] > 0:
        n = c['n_local_crops']
        local = random_resized_crops(x, n, c['local_crop_size'], c['local_crop_scale'], c['hflip'],
                                     gen, part)
        local = normalize(color_augment(local, n, jitter, gray, blur[2], solar[2], gen, part))
    return normalize(g), local


def patch_masks(n_patches, prob, ratio, gen, part):
    """iBOT masks of the 2 global crops, (2B, n_patches) bool: a fraction `prob` of the images,
    spread evenly so every process holds as many, get a share in `ratio` of patches masked."""
    total, rows = part
    i = torch.arange(total)
    masked = torch.floor((i + 1) * prob) > torch.floor(i * prob)           # (total,)
    ratios = torch.empty(2, total).uniform_(ratio[0], ratio[1], generator=gen)
    k = torch.where(masked, (ratios * n_patches).long().clamp(min=1), 0)   # (2, total) to mask
    order = torch.rand(2, total, n_patches, generator=gen).argsort(-1).argsort(-1)
    masks = order < k.unsqueeze(-1)
    return masks[:, rows].reshape(-1, n_patches)


# -----------------------------------------------------------------------------
# Losses: each small and separate, as in DINOv2

def all_reduce_sum(x):
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_reduce_mean(x):
    return all_reduce_sum(x) / dist.get_world_size() if dist.is_initialized() else x


def global_mean(x):
    """Mean over the rows of x (n, K) of every process together (n may differ per process)."""
    total = all_reduce_sum(torch.cat([x.sum(0), x.new_tensor([len(x)])]))
    return (total[:-1] / total[-1]).unsqueeze(0)


def teacher_probs(logits, center, temp, method):
    """Teacher targets (n, K): softmax((t - center) / temp), or three Sinkhorn-Knopp iterations
    that make the global batch use every prototype equally (sums and row counts all-reduced)."""
    if method == 'center':
        return F.softmax((logits - center) / temp, dim=-1)
    # No max is subtracted (as DINOv2): the logits are cosines in [-1, 1], so exp stays finite
    # in float32 for temp > 0.012, and a per-process shift would change the targets.
    q = torch.exp(logits.float() / temp).t()                # (K, n)
    K = q.shape[0]
    n_global = all_reduce_sum(torch.tensor(float(q.shape[1]), device=q.device))
    q /= all_reduce_sum(q.sum())
    for _ in range(3):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)) * K     # each prototype weighs 1/K
        q /= q.sum(dim=0, keepdim=True) * n_global             # each row weighs 1/n_global
    return (q * n_global).t()


def dino_loss(student_logits, teacher_p, B, temp):
    """Cross-entropy between teacher and student crops, crop-major in chunks of B: the teacher's
    2 global crops, the student's 2 global then local crops; a crop is never matched with itself."""
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher_p.split(B)):
        for j, s in enumerate(student_logits.split(B)):
            if i == j:
                continue
            total = total + torch.sum(-t * F.log_softmax(s / temp, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


def ibot_loss(student_patch_logits, teacher_patch_p, masks, temp):
    """Cross-entropy on the (M, K) rows of masked patches (masks' (n, N) order), averaged within
    each crop, summed over crops and divided by all n global crops (DINOv2's forward_masked)."""
    ce = torch.sum(-teacher_patch_p * F.log_softmax(student_patch_logits / temp, dim=-1), dim=-1)
    per_crop = masks.sum(1)[masks.any(1)]                    # masked patches of each masked crop
    weights = (1.0 / per_crop).repeat_interleave(per_crop)   # so each crop weighs the same
    return (ce * weights).sum() / len(masks)


def koleo_loss(x, eps=1e-8):
    """Kozachenko-Leonenko entropy estimator: -mean log distance to the nearest neighbour."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    self_pairs = torch.eye(len(x), dtype=torch.bool, device=x.device)
    d = torch.cdist(x, x).masked_fill(self_pairs, float('inf'))
    return -torch.log(d.min(dim=1).values + eps).mean()


def infonce_loss(q, temp):
    """SimCLR's NT-Xent. q: (2B, d) normalized projections of two views, view-major. Negatives
    are gathered from every process (with gradients), so the loss is that of the global batch."""
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        B = q.shape[0] // 2
        parts = torch.distributed.nn.functional.all_gather(q)    # differentiable
        v1 = torch.cat([p[:B] for p in parts])
        v2 = torch.cat([p[B:] for p in parts])
        q_all = torch.cat([v1, v2])
        local = torch.cat([torch.arange(rank * B, (rank + 1) * B),
                           world * B + torch.arange(rank * B, (rank + 1) * B)]).to(q.device)
    else:
        q_all, local = q, torch.arange(q.shape[0], device=q.device)
    n = q_all.shape[0]
    sim = q[:, None, :].mul(q_all[None]).sum(-1).float() / temp    # (2B_local, 2B_global)
    sim = sim.masked_fill(local[:, None] == torch.arange(n, device=q.device)[None], float('-inf'))
    partner = (local + n // 2) % n
    return F.cross_entropy(sim, partner)


def dino_step(model, raw_model, teacher, centers, global_views, local_views, masks, c, t_temp, B):
    """DINO + iBOT + KoLeo on one batch; updates the teacher centers. Returns (loss, parts)."""
    head = raw_model.head
    with torch.no_grad():
        _, t_cls, t_patch = teacher(global_views, c['tau'])
        t_cls_logits = teacher.head(t_cls).float()                          # (2B, K)
        t_patch_logits = teacher.head(t_patch[masks]).float()               # (M, K) masked patches
        t_cls_p = teacher_probs(t_cls_logits, centers['cls'], t_temp, c['centering'])
        t_patch_p = teacher_probs(t_patch_logits, centers['patch'], t_temp, c['centering'])
    _, s_cls, s_patch = model(global_views, c['tau'], masks)
    s_logits = head(s_cls)
    if local_views is not None:
        _, s_local, _ = model(local_views, c['tau'])
        s_logits = torch.cat([s_logits, head(s_local)])
    dino = dino_loss(s_logits.float(), t_cls_p, B, c['student_temp'])
    loss, parts = dino, {'dino': dino.detach()}
    if c['ibot_weight'] > 0:
        ibot = ibot_loss(head(s_patch[masks]).float(), t_patch_p, masks, c['student_temp'])
        loss = loss + c['ibot_weight'] * ibot
        parts['ibot'] = ibot.detach()
    if c['koleo_weight'] > 0:   # as in DINOv2, neighbours are searched within this process's batch
        koleo = sum(koleo_loss(chunk) for chunk in s_cls.split(B))       # summed over the 2 crops
        loss = loss + c['koleo_weight'] * koleo
        parts['koleo'] = koleo.detach()
    if c['centering'] == 'center':
        m = c['center_momentum']
        centers['cls'].mul_(m).add_(global_mean(t_cls_logits), alpha=1 - m)
        if c['ibot_weight'] > 0:
            centers['patch'].mul_(m).add_(global_mean(t_patch_logits), alpha=1 - m)
    parts['loss'] = loss.detach()
    return loss, parts


# -----------------------------------------------------------------------------
# Schedules, precomputed as arrays indexed by the iteration (as DINOv2 does)

def cosine_schedule(start, end, n, warmup=0, warmup_start=0.0):
    warm = np.linspace(warmup_start, start, warmup, endpoint=False)
    t = np.arange(n - warmup) / max(1, n - warmup)
    return np.concatenate([warm, end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))])


def schedules(cfg):
    n = cfg['max_iters']
    lr = cfg['learning_rate'] * math.sqrt(cfg['batch_size'] / 1024)
    warm_temp = min(n, int(cfg['warmup_teacher_temp_frac'] * n))
    return dict(
        lr=cosine_schedule(lr, cfg['min_lr'], n, min(n, cfg['warmup_iters'])),
        wd=cosine_schedule(cfg['weight_decay'], cfg['weight_decay_end'], n),
        momentum=cosine_schedule(cfg['momentum_teacher'], 1.0, n),
        teacher_temp=np.concatenate([
            np.linspace(cfg['warmup_teacher_temp'], cfg['teacher_temp'], warm_temp),
            np.full(n - warm_temp, cfg['teacher_temp'])]))


def param_groups(model, layer_decay, patch_embed_lr_mult):
    """AdamW groups as DINOv2's get_params_groups_with_decay: layer-wise lr decay (layer 0 =
    embeddings and tokens, i+1 = block i, top = norm, SEM, head), no weight decay on biases,
    norms and gammas, and the prototypes apart so that they can stay frozen at first."""
    depth = len(model.backbone.blocks)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith('backbone.blocks.'):
            layer = int(name.split('.')[2]) + 1
        elif name.startswith('backbone.') and not name.startswith('backbone.norm'):
            layer = 0
        else:
            layer = depth + 1
        lr_scale = layer_decay ** (depth + 1 - layer)
        lr_scale *= patch_embed_lr_mult if 'patch_embed' in name else 1.0
        wd_scale = 0.0 if name.endswith('.bias') or 'norm' in name or 'gamma' in name else 1.0
        prototypes = name.startswith('head.last_layer')
        group = groups.setdefault((lr_scale, wd_scale, prototypes), dict(
            params=[], lr_scale=lr_scale, wd_scale=wd_scale, prototypes=prototypes))
        group['params'].append(p)
    return list(groups.values())


# -----------------------------------------------------------------------------
# Checkpoints and code dumps

def load_checkpoint(path):
    return read_checkpoint(path, f"python tokenizer.py <config> "
                                 f"--out_dir={os.path.dirname(path) or '.'} (train it)")


def encoder_from_checkpoint(ckpt):
    """The model whose codes are the DLCs: DINO's teacher (DINOv2 evaluates it) or the student."""
    model = SEMEncoder(**ckpt['model_args'])
    model.load_state_dict(ckpt['teacher'] if ckpt.get('teacher') is not None else ckpt['model'])
    return model.eval()


# -----------------------------------------------------------------------------
# Training

def train(cfg):
    check_counts(cfg, 'batch_size', 'max_iters', 'log_interval', 'ckpt_interval', 'image_size',
                 'patch_size', 'L', 'V', 'depth', 'embed_dim')
    check_finite(cfg, 'learning_rate', 'min_lr', 'weight_decay', 'grad_clip', low=0.0)
    check_finite(cfg, 'tau', 'student_temp', 'teacher_temp', 'infonce_temp', low=1e-8)
    rank, world, device = setup_distributed(cfg['device'])
    master = rank == 0
    c = cfg
    if c['batch_size'] % world:
        raise UserError(f"batch_size={c['batch_size']} must be divisible by the {world} processes")
    B = c['batch_size'] // world
    if c['ssl_loss'] == 'dino' and c['ibot_weight'] > 0 and c['mask_prob'] * B < 1:
        raise UserError(f"mask_prob={c['mask_prob']} of a per-process batch of {B} masks no "
                         "image; raise batch_size or mask_prob, or set --ibot_weight=0")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device_type = 'cuda' if 'cuda' in device else 'cpu'
    autocast = (torch.autocast('cuda', dtype=torch.bfloat16) if device_type == 'cuda'
                else nullcontext())
    split = c['train_split']
    dataset = open_split(c['data_dir'], split, load_size(c['image_size'], c['data_dir'], split))
    if len(dataset) < c['batch_size']:
        raise UserError(f"split '{split}' has {len(dataset)} images, fewer than "
                         f"batch_size={c['batch_size']}")
    os.makedirs(c['out_dir'], exist_ok=True)
    ckpt_path = os.path.join(c['out_dir'], 'tokenizer.pt')

    model_args = model_args_from(c)
    torch.manual_seed(c['seed'])
    model = SEMEncoder(**model_args, grad_checkpoint=c['grad_checkpoint'])
    resume = resuming(c, ckpt_path)
    if not resume and c['init_from'] != 'scratch':
        load_dinov2_backbone(model.backbone, c['init_from'])
    use_teacher = c['ssl_loss'] == 'dino'
    model.backbone.mask_token.requires_grad_(use_teacher and c['ibot_weight'] > 0)
    model.to(device)
    teacher = None
    if use_teacher:
        teacher = SEMEncoder(**{**model_args, 'drop_path_rate': 0.0}).to(device)
        teacher.load_state_dict(model.state_dict())
        teacher.requires_grad_(False)
    groups = param_groups(model, c['layer_decay'], c['patch_embed_lr_mult'])
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), fused=device_type == 'cuda')
    centers = {'cls': torch.zeros(1, c['n_prototypes'], device=device),
               'patch': torch.zeros(1, c['n_prototypes'], device=device)} if use_teacher else {}
    iter_num, run_id = 0, new_run_id()     # the run's identity, which its codes carry
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        run_id = ckpt.get('run_id') or run_id
        if 'optimizer' not in ckpt:
            raise UserError(f"{ckpt_path} was written by --mode=import and holds no training "
                             "state to resume")
        model.load_state_dict(ckpt['model'])
        if teacher is not None:
            teacher.load_state_dict(ckpt['teacher'])
        optimizer.load_state_dict(ckpt['optimizer'])
        centers = {k: v.to(device) for k, v in ckpt['centers'].items()}
        iter_num = ckpt['iter_num']
        if master:
            print(f"resuming from {ckpt_path} at iteration {iter_num}")

    raw_model = model
    if c['compile']:
        model = torch.compile(model)
    if world > 1:
        device_ids = [device] if device_type == 'cuda' else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    sched = schedules(c)
    n_params = sum(p.numel() for p in raw_model.parameters())
    if master:
        print(f"SEM encoder: {n_params / 1e6:.2f}M parameters, L={c['L']} V={c['V']}, "
              f"{c['ssl_loss']} loss, {world} process(es), batch {c['batch_size']}")

    def save():
        save_atomic(dict(model=raw_model.state_dict(),
                         teacher=teacher.state_dict() if teacher is not None else None,
                         optimizer=optimizer.state_dict(),
                         centers={k: v.cpu() for k, v in centers.items()},
                         model_args=model_args_from(c), config=dict(c), iter_num=iter_num,
                         world_size=world, L=c['L'], V=c['V'], image_size=c['image_size'],
                         run_id=run_id),
                    ckpt_path)

    stop = c['max_iters'] if c['run_iters'] < 0 else min(c['max_iters'], iter_num + c['run_iters'])
    sampler = BatchSampler(len(dataset), c['batch_size'], iter_num, stop, c['seed'], rank, world)
    workers = c['num_workers'] if isinstance(dataset, ImageFolder) else 0
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         pin_memory=device_type == 'cuda')
    part = (c['batch_size'], slice(rank * B, (rank + 1) * B))
    grid = (c['image_size'] // c['patch_size']) ** 2
    bar = tqdm(total=stop, initial=iter_num, disable=not master, desc='tokenizer',
               dynamic_ncols=True)
    t0, seen, history = time.time(), 0, []
    model.train()
    for images in loader:
        it = iter_num
        for g in optimizer.param_groups:
            frozen = g['prototypes'] and it < c['freeze_last_layer_iters']
            g['lr'] = 0.0 if frozen else float(sched['lr'][it]) * g['lr_scale']
            g['weight_decay'] = float(sched['wd'][it]) * g['wd_scale']
        gen = torch.Generator().manual_seed(c['seed'] * 1_000_003 + it)
        torch.manual_seed(c['seed'] * 1_000_003 + it * 1009 + rank)   # drop-path, per rank
        global_views, local_views = make_views(to_float_images(images, device), c, gen, part)
        with autocast:
            if c['ssl_loss'] == 'infonce':
                _, s, _ = model(global_views, c['tau'])
                loss = infonce_loss(raw_model.head.project(s), c['infonce_temp'])
                parts = {'loss': loss.detach()}
            else:
                masks = patch_masks(grid, c['mask_prob'], c['mask_ratio'], gen, part).to(device)
                loss, parts = dino_step(model, raw_model, teacher, centers, global_views,
                                        local_views, masks, c, float(sched['teacher_temp'][it]), B)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = c['grad_clip'] if c['grad_clip'] > 0 else float('inf')
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), clip)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):   # stop before the bad update
            raise FloatingPointError(
                f"loss is {loss.item()} (gradient norm {grad_norm.item()}) at iteration {it}; "
                f"{ckpt_path} keeps the last good state (saved every {c['ckpt_interval']} "
                f"iterations). Lower learning_rate or raise warmup_iters, then continue with "
                f"--init_from=resume")
        optimizer.step()
        if teacher is not None:
            m = float(sched['momentum'][it])
            with torch.no_grad():
                for pt, ps in zip(teacher.parameters(), raw_model.parameters()):
                    pt.lerp_(ps, 1 - m)
        iter_num += 1
        seen += c['batch_size']
        bar.update(1)
        if iter_num % c['log_interval'] == 0 or iter_num == stop:
            logged = {k: all_reduce_mean(v.float()).item() for k, v in parts.items()}
            history.append(dict(iter=iter_num, **logged))
            if master:
                text = ' '.join(f'{k} {v:.4f}' for k, v in logged.items())
                tqdm.write(f"iter {iter_num}: {text} lr {sched['lr'][it]:.2e} "
                           f"{seen / (time.time() - t0):.1f} img/s")
            t0, seen = time.time(), 0
        preempted = preemption_requested(device)         # SIGTERM or SIGUSR1 on any process
        if master and (iter_num % c['ckpt_interval'] == 0 or iter_num == stop or preempted):
            save()
        if preempted:
            exit_preempted(rank, world, iter_num, ckpt_path)
    bar.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return raw_model, history


# -----------------------------------------------------------------------------
# Dump: the DLC of every item of a split, in dataset order

@torch.no_grad()
def compute_codes(model, dataset, image_size, batch_size, device, desc='codes'):
    """(N, L) uint16 codes of a dataset, in its order, each image seen by encoder_input."""
    folder = isinstance(dataset, ImageFolder)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=min(8, os.cpu_count() or 1) if folder else 0)
    model = model.to(device).eval()
    autocast = (torch.autocast('cuda', dtype=torch.bfloat16) if 'cuda' in device
                else nullcontext())
    out = []
    for images in tqdm(loader, desc=desc, dynamic_ncols=True):
        with autocast:
            out.append(model.encode(encoder_input(images, image_size, folder, device)).cpu())
    dtype = np.uint16 if model.sem.V <= 65536 else np.uint32
    return torch.cat(out).numpy().astype(dtype)


def encoder_input(images, image_size, crop, device):
    """uint8 (B, H, W, 3) -> the normalized (B, 3, S, S) the encoder reads, S = image_size: the
    central square (crop: folder images loaded larger, as for the probe) or a resize (arrays)."""
    x = to_float_images(images, device)
    if x.shape[-1] != image_size:
        if crop:
            top = (x.shape[-1] - image_size) // 2
            x = x[..., top:top + image_size, top:top + image_size]
        else:
            x = F.interpolate(x, size=(image_size, image_size), mode='bilinear', antialias=True)
    return normalize(x)


def codes_for_split(ckpt, ckpt_path, model, cfg, split):
    """The probe's codes of a split: for arrays, the split's dump (--mode=dump writes it; one
    older than the checkpoint is refused); for folders, probe_codes_<split>.npy, the codes of
    DINOv2's evaluation view (a central crop), computed once per checkpoint."""
    size = load_size(ckpt['image_size'], cfg['data_dir'], split)
    dataset = open_split(cfg['data_dir'], split, size)
    if isinstance(dataset, ImageArray):
        path = dump_path(cfg['out_dir'], split)
        if os.path.exists(path) and os.path.getmtime(path) < os.path.getmtime(ckpt_path):
            raise UserError(f"code dump '{path}' is older than {ckpt_path}; dump it again: python "
                             f"tokenizer.py --mode=dump --dump_split={split} (same config)")
        return load_codes(cfg['out_dir'], split, len(dataset)), dataset
    path = os.path.join(cfg['out_dir'], f'probe_codes_{split}.npy')
    if os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(ckpt_path):
        cached = load_array(path, f"python tokenizer.py --mode=probe (delete '{path}' first)")
        return check_codes(cached, ckpt['L'], ckpt['V'], path, len(dataset),
                           fix="delete it: --mode=probe computes it again"), dataset
    codes = compute_codes(model, dataset, ckpt['image_size'], cfg['dump_batch_size'],
                          cfg['device'], f'codes {split}')
    save_atomic(codes, path)
    print(f"wrote {path}: {codes.shape} {codes.dtype}")
    return codes, dataset


def load_size(image_size, data_dir, split):
    """Training and the probe decode folder images at 256/224 of image_size (crops are cut from
    them; the probe's is DINOv2's central square); dumps read them at image_size itself."""
    if os.path.exists(array_path(data_dir, split)):
        return image_size
    return round(image_size * 256 / 224)


def dump(cfg):
    """codes_<split>.npy of each split in dump_split ('train,val,ood'), and the sidecar
    codes.json that every consumer checks them against (codes.py)."""
    ckpt_path = os.path.join(cfg['out_dir'], 'tokenizer.pt')
    ckpt = load_checkpoint(ckpt_path)
    model = encoder_from_checkpoint(ckpt)
    if cfg['dump_batch_size'] < 1:
        raise UserError(f"--dump_batch_size={cfg['dump_batch_size']} must be at least 1")
    splits = [s.strip() for s in cfg['dump_split'].split(',') if s.strip()]
    datasets = {split: open_split(cfg['data_dir'], split, ckpt['image_size']) for split in splits}
    identity = tokenizer_identity(ckpt)
    if identity is None:
        print(f"note: {ckpt_path} has no run id (written before runs had ids): its codes are "
              "written without one, and nothing can check them against other runs")
    for split, dataset in datasets.items():
        codes = compute_codes(model, dataset, ckpt['image_size'], cfg['dump_batch_size'],
                              cfg['device'], f"codes {split}")
        write_codes(cfg['out_dir'], split, codes, ckpt['L'], ckpt['V'], ckpt['image_size'],
                    ckpt_path, identity, fingerprint_images(cfg['data_dir'], split))
        print(f"wrote {dump_path(cfg['out_dir'], split)}: {codes.shape} {codes.dtype}, "
              f"L={ckpt['L']} V={ckpt['V']}, tokenizer {identity}")


def import_fork(cfg):
    """out_dir/tokenizer.pt holding the paper's encoder (init_from), for dump, probe, sample.py."""
    model = SEMEncoder(**model_args_from(cfg))
    load_fork_checkpoint(model, cfg['init_from'])
    os.makedirs(cfg['out_dir'], exist_ok=True)
    path = os.path.join(cfg['out_dir'], 'tokenizer.pt')
    save_atomic(dict(model=model.state_dict(), teacher=None, model_args=model_args_from(cfg),
                     config=dict(cfg), iter_num=0, L=cfg['L'], V=cfg['V'],
                     image_size=cfg['image_size'], run_id=new_run_id()), path)
    print(f"wrote {path}: the paper's encoder from {cfg['init_from']}, L={cfg['L']} V={cfg['V']}")


# -----------------------------------------------------------------------------
# Probe: what the codes know. A linear layer on the one-hot code (L*V features) per label;
# one-hot(c) @ W = sum_l W[l*V + c_l], an embedding bag, so no L*V-wide matrix is built.

def probe_logits(weight, bias, codes, V):
    """weight (L*V, C), bias (C,), codes (N, L) -> logits (N, C)."""
    flat = codes.long() + torch.arange(codes.shape[1], device=codes.device) * V
    return F.embedding_bag(flat, weight, mode='sum') + bias


def fit_probe(codes, labels, V, n_classes, iters, weight_decay=1e-4, batch_size=8192, seed=0):
    """Multinomial logistic regression on one-hot codes by Adam; returns (weight, bias)."""
    codes = torch.as_tensor(codes.astype(np.int64))
    labels = torch.as_tensor(labels.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    weight = torch.zeros(codes.shape[1] * V, n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(iters):
        idx = torch.randint(len(codes), (min(batch_size, len(codes)),), generator=gen)
        loss = F.cross_entropy(probe_logits(weight, bias, codes[idx], V), labels[idx])
        loss = loss + weight_decay * weight.square().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return weight.detach(), bias.detach()


def probe_predict(probe, codes):
    """Read the factors (or class) of any codes with a saved probe: {label: (N,) int array}."""
    codes = np.asarray(codes).astype(np.int64)
    L_, V_ = probe['L'], probe['V']
    if codes.ndim != 2 or codes.shape[1] != L_ or codes.min() < 0 or codes.max() >= V_:
        raise UserError(f"the probe reads codes of shape (N, {L_}) with tokens in [0, {V_}); "
                         f"got shape {codes.shape}, tokens in [{codes.min()}, {codes.max()}]")
    codes = torch.as_tensor(codes)
    return {name: probe_logits(p['weight'], p['bias'], codes, probe['V']).argmax(1).numpy()
            for name, p in probe['labels'].items()}


def codebook_usage(codes, V):
    """Distinct tokens and perplexity exp(H) of the token marginal at each position."""
    distinct, perplexity = [], []
    for l in range(codes.shape[1]):
        counts = np.bincount(codes[:, l], minlength=V)
        p = counts[counts > 0] / len(codes)
        distinct.append(len(p))
        perplexity.append(float(np.exp(-(p * np.log(p)).sum())))
    unique_codes = len(np.unique(codes, axis=0)) / len(codes)
    return dict(distinct=distinct, perplexity=perplexity, unique_codes=unique_codes)


def probe(cfg):
    ckpt_path = os.path.join(cfg['out_dir'], 'tokenizer.pt')
    ckpt = load_checkpoint(ckpt_path)
    model = encoder_from_checkpoint(ckpt)
    L_, V_ = ckpt['L'], ckpt['V']
    train_codes, train_set = codes_for_split(ckpt, ckpt_path, model, cfg, cfg['probe_train_split'])
    eval_codes, eval_set = codes_for_split(ckpt, ckpt_path, model, cfg, cfg['probe_eval_split'])
    train_labels = split_labels(cfg['data_dir'], cfg['probe_train_split'], train_set)
    eval_labels = split_labels(cfg['data_dir'], cfg['probe_eval_split'], eval_set)
    result = dict(L=L_, V=V_, tokenizer=ckpt_path, labels={}, accuracy={})
    print(f"linear probe on one-hot codes ({L_} x {V_} = {L_ * V_} features), "
          f"fit on {cfg['probe_train_split']} ({len(train_codes)}), "
          f"scored on {cfg['probe_eval_split']} ({len(eval_codes)})")
    print(f"{'label':<12} {'classes':>7} {'chance':>7} {'accuracy':>9}")
    eval_t = torch.as_tensor(eval_codes.astype(np.int64))
    for name, y in train_labels.items():
        n_classes = int(max(y.max(), eval_labels[name].max())) + 1
        weight, bias = fit_probe(train_codes, y, V_, n_classes, cfg['probe_iters'],
                                 seed=cfg['seed'])
        result['labels'][name] = dict(weight=weight, bias=bias)
        pred = probe_logits(weight, bias, eval_t, V_).argmax(1).numpy()
        acc = float((pred == eval_labels[name]).mean())
        chance = float(np.bincount(eval_labels[name]).max() / len(eval_labels[name]))
        result['accuracy'][name] = acc
        print(f"{name:<12} {n_classes:>7d} {chance:>7.3f} {acc:>9.4f}")
    usage = result['usage'] = codebook_usage(eval_codes, V_)
    print(f"codebook on {cfg['probe_eval_split']}: distinct tokens per position "
          f"min {min(usage['distinct'])} mean {np.mean(usage['distinct']):.1f} "
          f"max {max(usage['distinct'])} (of V={V_}); "
          f"perplexity per position mean {np.mean(usage['perplexity']):.2f}; "
          f"distinct codes {usage['unique_codes']:.3f} of items")
    collapsed = [l for l, d in enumerate(usage['distinct']) if d == 1]
    if collapsed:
        print(f"warning: positions {collapsed} always hold the same token (collapsed)")
    path = os.path.join(cfg['out_dir'], 'probe.pt')
    save_atomic(result, path)
    print(f"wrote {path}")
    return result


def main(cfg):
    if cfg['mode'] == 'train':
        handle_preemption_signals()
    modes = {'train': train, 'dump': dump, 'probe': probe, 'import': import_fork}
    if cfg['mode'] not in modes:
        raise UserError(f"--mode={cfg['mode']} is not one of {sorted(modes)}")
    return modes[cfg['mode']](cfg)


if __name__ == '__main__':
    command_line(CONFIG, sys.argv[1:], main, __file__)
