"""
diffusion.py: the DiT that generates images from DLCs, p(x | c).

The method (Lavoie, Noukhovitch, Courville 2025, arXiv 2507.12318, section 3.2)
-----------------------------------------------------------------------------
A DiT (Peebles & Xie 2023) with adaLN-Zero denoises images (pixels, or SD-VAE latents scaled
by 0.18215). The condition is a DLC c = (c_1 .. c_L), c_l in [0, V). Each position l has its
own embedding table E_l in R^{(V+1) x D}, row V being the null token, and the code embedding
is their *mean*,

    e(c) = (1/L) sum_l E_l[c_l]          (soft codes p in R^{L x V}: (1/L) sum_l p_l E_l[:V])

which is added to the timestep embedding and drives every block's adaLN modulation.
Classifier-free guidance drops the whole code (all L tokens to V) with probability 0.1 in
training and samples with  eps = eps(x, null) + s (eps(x, c) - eps(x, null))  on every
channel that carries eps (the original DiT guided 3 of 4 latent channels).

Gaussian diffusion (objective = 'eps', the paper's and the public DiT weights'): T = 1000,
betas linear in [1e-4, 0.02], q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I). The network
outputs eps and v; the reverse variance is
Sigma = exp(v' log beta_t + (1 - v') log betatilde_t), v' = (v + 1) / 2 (Nichol & Dhariwal).
Loss = ||eps - eps_hat||^2 + L_vlb, the KL of the true posterior q(x_{t-1} | x_t, x_0) from
p(x_{t-1} | x_t) with the mean frozen (it trains Sigma only). Sampling: DDPM ancestral steps
on any subsequence of the T steps (250 by default) or DDIM (eta = 0).

Rectified flow (objective = 'flow', as SiT): x_t = (1 - t) x_0 + t eps, t in [0, 1], the
network predicts the velocity u = eps - x_0, loss ||u - u_hat||^2, sampled by an Euler or
Heun ODE solver from t = 1 to 0, with the same guidance. With flow_output = 'x0' the network
predicts the clean image instead and u_hat = (x_t - x0_hat) / t (as JiT, Li & He 2025): the
same loss on u, which weights the error of x0_hat by 1 / t^2 (t floored at 0.05). Training t
is uniform, or logit-normal, sigmoid(N(flow_t_mean, flow_t_std)).

The file reads in that order, then the data, training and the modes; the frozen SD-VAE is vae.py.

Modes:  python diffusion.py [config.py] [--key=value ...]
    --mode=train     (torchrun for DDP) writes out_dir/diffusion.pt and sample grids
    --mode=extract   writes out_dir/latents_<split>.npy (float16) with the SD-VAE encoder
    --mode=recon     the codes of a split -> DiT -> images: recon_<split>.npz and a PNG grid
                     beside the sources (on the built-in data, data/shapes/score.py scores them)
    --mode=decode    every code of a dump (--codes_path: prior samples, composed codes) ->
                     out_dir/<name>_images.npz and a PNG grid (torchrun; resumable)
"""
import copy
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from cluster import (draw_in_chunks, exit_preempted, handle_preemption_signals,
                     preemption_requested, resuming, save_atomic, setup_distributed)
from codes import (SIDECAR, check_codes, check_fits, check_same_images, check_same_tokenizer,
                   codes_identity, load_array, load_codes, read_checkpoint, read_contract,
                   read_identity)
from configurator import MissingFile, UserError, check_counts, check_finite, command_line
from images import ImageFolder, array_path, missing_split   # a split: an array or a folder
from vae import VAE_SCALE, load_vae, read_safetensors   # the frozen SD-VAE (ImageNet latents)

# -----------------------------------------------------------------------------
# config: the defaults are the paper's ImageNet 256 recipe (DiT-XL/2 on SD-VAE latents, DLC512),
# but for two safeguards of small runs that the paper's DiT lacks, gradient clipping and the EMA
# warm-up; config/diffusion_imagenet.py turns both off
mode = 'train'                  # 'train' | 'extract' | 'recon' | 'decode'
out_dir = 'out-diffusion'
init_from = 'scratch'           # 'scratch' | 'resume' | DiT weights (DiT-XL-2-256x256.pt, or
                                # the paper's DiTSEM for cond='dlc')
auto_resume = False             # resume from out_dir's checkpoint if there is one (cluster jobs)
data_dir = 'data/imagenet'      # <split>_images.npy, or a folder <split>/ of images (images.py)
train_split = 'train'
codes_dir = 'out-imagenet-tokenizer'   # codes_<split>.npy and codes.json, for cond='dlc'
latents_dir = ''                # latents_<split>.npy from --mode=extract; '' = train on pixels
vae_path = ''                   # sd-vae-ft-ema diffusion_pytorch_model.{bin,safetensors}
seed = 0
# model
model = 'DiT-XL/2'
image_size = 256
cond = 'dlc'                    # 'dlc' | 'class' | 'none'
num_classes = 1000              # cond='class'
learn_sigma = True              # objective='eps': predict the variance too
head_hidden = 0                 # > 0: a hidden layer of this width in the final layer (not in DiT)
mlp_ratio = 4.0                 # each block's MLP width over the model width (DiT's 4)
class_dropout_prob = 0.1
objective = 'eps'               # 'eps' (Gaussian diffusion, learned variance) | 'flow'
flow_output = 'velocity'        # flow: the network outputs 'velocity' (SiT) or 'x0' (clean image)
flow_t_mean = 0.0               # flow: t = sigmoid(N(mean, std)) in training; std 0 = uniform t
flow_t_std = 0.0
hflip = True                    # random horizontal flips (latents: the flipped extraction)
# optimization
batch_size = 256                # global, across processes and accumulation steps
micro_batch_size = 32           # per process per forward; accumulation = batch / (world * micro)
max_iters = 500400              # the paper's 100 epochs of ImageNet's 1,281,167 images at batch 256
run_iters = -1                  # stop this run after so many iterations (resume later); -1: none
learning_rate = 1e-4
weight_decay = 0.0
warmup_iters = 0                # linear warm-up, then a constant learning rate (DiT's)
cooldown_frac = 0.0             # > 0: the lr falls linearly to 0 over this last share of max_iters
optimizer = 'adamw'             # 'adamw' (DiT's) | 'muon': the blocks' matrices by Muon, the rest AdamW
muon_lr = 2e-3                  # optimizer='muon': the matrices' lr (updates at AdamW's RMS)
cond_lr_mult = 1.0              # the condition's embedding tables (code or label) train at
                                # learning_rate x this (1 = DiT's single lr)
grad_clip = 1.0                 # max gradient norm; 0 = no clipping (the paper's DiT)
ema_decay = 0.9999
ema_warmup = True               # decay min(ema_decay, (1 + it) / (10 + it)); False: ema_decay
                                # from step 0 (the paper's)
# sampling
sampler = 'ddpm'                # eps: 'ddpm' | 'ddim';  flow: 'euler' | 'heun'
num_sampling_steps = 250
cfg_scale = 1.0                 # 1.0 = no guidance
guidance_interval = (0.0, 1.0)  # guide only while t / T is inside this interval
clip_denoised = False           # clip the predicted x_0 to [-1, 1] (pixel space needs it)
sample_interval = 5000          # EMA sample grids during training
n_grid = 16
# extract / recon / decode
split = 'val'                   # the split --mode=extract and --mode=recon read
extract_flip = True             # also extract the latents of the flipped images
n_recon = 500                   # recon: at most so many images
codes_path = ''                 # decode: a code dump to turn into images (e.g. prior samples.npy)
allow_mix = False               # True: use codes of another tokenizer run or dataset anyway
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
compile = False
grad_checkpoint = False
num_workers = 8
log_interval = 100
ckpt_interval = 5000
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()       # (VAE_SCALE is vae.py's constant)
               if not k.startswith('_') and k != 'VAE_SCALE'
               and isinstance(v, (int, float, bool, str, tuple))]
CONFIG = {k: globals()[k] for k in config_keys}


# -----------------------------------------------------------------------------
# The DiT: parameter names as facebookresearch/DiT, so DiT-XL-2-256x256.pt loads strictly

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, patch_size)

    def forward(self, x):                                   # (N, C, H, W)
        return self.proj(x).flatten(2).transpose(1, 2)      # (N, T, D), T = (H/p)(W/p)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the timestep (t in [0, 1000)) through a 2-layer MLP."""
    def __init__(self, hidden_size, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device,
                                                          dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    """Class labels (N,) in [0, num_classes]; index num_classes is the null label."""
    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        return self.embedding_table(y)


class SEMEmbedder(nn.Module):
    """The paper's code embedder: one table per position, (L, V+1, D), row V = null token;
    the code embedding is the mean over the L positions. Soft codes (N, L, V) weight the rows.
    Rows start N(0, 1/D); the null rows start as one vector shared by all positions, as in the
    paper's DiTSEM, so a dropped code starts at an embedding of norm ~1 where a real code's
    mean of L independent rows starts at norm ~1/sqrt(L)."""
    def __init__(self, L, V, hidden_size):
        super().__init__()
        self.L, self.V = L, V
        rows = torch.randn(L, V, hidden_size) / math.sqrt(hidden_size)
        null = torch.randn(1, 1, hidden_size) / math.sqrt(hidden_size)
        self.embedding_table = nn.Parameter(torch.cat([rows, null.expand(L, 1, hidden_size)], 1))

    def forward(self, y):
        if y.is_floating_point():                           # soft codes (N, L, V) or (N, L, V+1)
            y = F.pad(y, (0, self.V + 1 - y.shape[-1]))
            table = self.embedding_table
            return torch.einsum('nlv,lvd->nd', y.to(table.dtype), table) / self.L
        # row y_l of table l, as an embedding lookup in the flattened tables: its backward adds
        # in a fixed order on the CPU (indexing's index_put_ does not, so two runs would differ)
        offsets = torch.arange(self.L, device=y.device) * (self.V + 1)
        rows = F.embedding(y + offsets, self.embedding_table.flatten(0, 1))      # (N, L, D)
        return rows.mean(dim=1)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                # each (B, heads, N, D / heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate='tanh'))


class DiTBlock(nn.Module):
    """adaLN-Zero: the condition gives shift, scale and gate for both sub-blocks; the gates
    start at zero, so every block starts as the identity."""
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Each token to its patch of the output. head_hidden > 0 (not in DiT) puts one hidden
    layer of that width before the last linear map: a nonlinear per-token patch decoder."""
    def __init__(self, hidden_size, patch_size, out_channels, head_hidden=0):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.hidden = nn.Linear(hidden_size, head_hidden) if head_hidden else None
        self.linear = nn.Linear(head_hidden or hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        if self.hidden is not None:
            x = F.gelu(self.hidden(x), approximate='tanh')
        return self.linear(x)


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sine-cosine position embedding, (grid*grid, dim): half the channels encode
    the row, half the column."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    axis = np.arange(grid, dtype=np.float64)
    ys, xs = np.meshgrid(axis, axis, indexing='ij')
    return np.concatenate([one_axis(dim // 2, xs), one_axis(dim // 2, ys)], axis=1)


class DiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, learn_sigma=True, cond='dlc', num_classes=1000,
                 L=512, V=256, head_hidden=0, grad_checkpoint=False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.cond = cond
        self.null = {'class': num_classes, 'dlc': V}.get(cond)   # the index of no condition
        self.grad_checkpoint = grad_checkpoint
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if cond == 'class':
            self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        elif cond == 'dlc':
            self.sem_embedder = SEMEmbedder(L, V, hidden_size)
        # fixed, but a parameter as in DiT so that the public checkpoints load strictly
        pos_embed = sincos_pos_embed(hidden_size, input_size // patch_size)
        self.pos_embed = nn.Parameter(torch.from_numpy(pos_embed).float().unsqueeze(0),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, head_hidden)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.cond == 'class':
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        final = self.final_layer
        for m in [b.adaLN_modulation[-1] for b in self.blocks] + \
                [final.adaLN_modulation[-1], final.linear]:            # adaLN-Zero
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x):                            # (N, T, p*p*C) -> (N, C, H, W)
        c, p = self.out_channels, self.patch_size
        h = w = int(math.sqrt(x.shape[1]))
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y=None):
        """x: (N, C, H, W), t: (N,) timesteps in [0, 1000), y: codes (N, L) int or (N, L, V)
        soft, or labels (N,), or None. Returns (N, out_channels, H, W)."""
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t)
        if self.cond == 'class':
            c = c + self.y_embedder(y)
        elif self.cond == 'dlc':
            c = c + self.sem_embedder(y)
        for block in self.blocks:
            if self.grad_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance, DiT's calling convention: the batch is [x; x] with
        conditions [y; null]; guidance applies to every eps (or velocity) channel."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        guided, rest = out[:, :self.in_channels], out[:, self.in_channels:]
        cond_out, uncond_out = guided.chunk(2)
        guided = uncond_out + cfg_scale * (cond_out - uncond_out)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


_SIZES = [('XL', 28, 1152, 16), ('L', 24, 1024, 16), ('B', 12, 768, 12), ('S', 12, 384, 6),
          ('Ti', 4, 128, 4)]           # name, depth, width, heads; Ti: the built-in data's CPU size
DiT_models = {f'DiT-{name}/{p}': dict(depth=d, hidden_size=w, num_heads=h, patch_size=p)
              for name, d, w, h in _SIZES for p in (2, 4, 8)}


# -----------------------------------------------------------------------------
# Gaussian diffusion (objective='eps'): schedule arrays, loss, DDPM and DDIM steps

class GaussianDiffusion:
    """The quantities of q and p for a beta schedule. `timesteps` maps each step of a
    respaced schedule to the original timestep the network was trained on."""
    def __init__(self, betas, timesteps=None):
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.timesteps = np.arange(len(betas)) if timesteps is None else np.asarray(timesteps)
        alphas = 1.0 - betas
        self.abar = np.cumprod(alphas)
        self.abar_prev = np.append(1.0, self.abar[:-1])
        self.posterior_variance = betas * (1.0 - self.abar_prev) / (1.0 - self.abar)
        # log variance with the t = 0 entry (zero) replaced by the next one, as ADM does
        self.posterior_log_variance = np.log(np.append(self.posterior_variance[1],
                                                       self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.abar_prev) / (1.0 - self.abar)
        self.posterior_mean_coef2 = (1.0 - self.abar_prev) * np.sqrt(alphas) / (1.0 - self.abar)

    @classmethod
    def linear(cls, num_timesteps=1000):
        scale = 1000 / num_timesteps
        return cls(np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64))

    def respaced(self, steps):
        """The same process seen at `steps` evenly spaced timesteps: beta_i = 1 - abar_i /
        abar_{i-1}. The timesteps are DiT's (space_timesteps): a stride of (T - 1) / (steps - 1)
        summed in floating point and rounded, so 21 steps keep 499 where exact halves give 500."""
        T = self.num_timesteps
        if not 2 <= steps <= T:     # one step would keep t = 0 alone (as DiT does)
            raise UserError(f"num_sampling_steps={steps}: a respaced sampler needs 2 to {T} "
                             f"steps of the {T}-step process")
        stride, position, keep = (T - 1) / (steps - 1), 0.0, []
        for _ in range(steps):
            keep.append(round(position))
            position += stride
        abar = self.abar[keep]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return GaussianDiffusion(betas, self.timesteps[keep])

    @staticmethod
    def _at(array, t, x):                       # array[t], shaped to broadcast against x
        return torch.as_tensor(array, device=x.device)[t].float().view(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x0, t, noise):
        return (self._at(np.sqrt(self.abar), t, x0) * x0
                + self._at(np.sqrt(1 - self.abar), t, x0) * noise)

    def q_posterior(self, x0, x_t, t):
        mean = (self._at(self.posterior_mean_coef1, t, x_t) * x0
                + self._at(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, self._at(self.posterior_log_variance, t, x_t)

    def p_mean_variance(self, out, x_t, t, clip):
        """From the network output (eps, v) to the reverse step's mean and log variance."""
        C = x_t.shape[1]
        eps = out[:, :C]
        posterior_log_var = self._at(self.posterior_log_variance, t, x_t)
        if out.shape[1] == 2 * C:                  # learned: between betatilde and beta
            frac = (out[:, C:] + 1) / 2
            log_var = frac * self._at(np.log(self.betas), t, x_t) + (1 - frac) * posterior_log_var
        else:
            log_var = posterior_log_var.expand_as(x_t)
        x0 = (self._at(np.sqrt(1 / self.abar), t, x_t) * x_t
              - self._at(np.sqrt(1 / self.abar - 1), t, x_t) * eps)
        if clip:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, x_t, t)
        return mean, log_var, x0, eps

    def training_losses(self, out, x0, x_t, t, noise):
        """Per-sample loss: MSE on eps, plus L_vlb (in bits per dimension) that trains the
        variance through a mean that does not get its gradient."""
        C = x0.shape[1]
        mse = (noise - out[:, :C]).float().pow(2).mean(dim=(1, 2, 3))
        if out.shape[1] == C:
            return mse
        frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1).float()
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        mean, log_var, _, _ = self.p_mean_variance(frozen, x_t, t, clip=False)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=(1, 2, 3)) / math.log(2)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3))
        vb = torch.where(t == 0, nll / math.log(2), kl)
        return mse + vb

    def ddpm_step(self, out, x_t, i, noise, clip):
        t = torch.full((len(x_t),), i, device=x_t.device, dtype=torch.long)
        mean, log_var, _, _ = self.p_mean_variance(out, x_t, t, clip)
        return mean + (torch.exp(0.5 * log_var) * noise if i > 0 else 0)

    def ddim_step(self, out, x_t, i, clip):
        t = torch.full((len(x_t),), i, device=x_t.device, dtype=torch.long)
        _, _, x0, _ = self.p_mean_variance(out, x_t, t, clip)
        eps = ((self._at(np.sqrt(1 / self.abar), t, x_t) * x_t - x0)
               / self._at(np.sqrt(1 / self.abar - 1), t, x_t))
        return (self._at(np.sqrt(self.abar_prev), t, x_t) * x0
                + self._at(np.sqrt(1 - self.abar_prev), t, x_t) * eps)


def normal_kl(mean1, log_var1, mean2, log_var2):
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of data quantized to 256 levels in [-1, 1] under N(means, exp(log_scales)^2)."""
    def cdf(v):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = cdf(inv_std * (centered + 1.0 / 255))
    cdf_min = cdf(inv_std * (centered - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def eps_loss(model, x0, y, t, noise, diffusion):
    """Gaussian diffusion's per-sample loss at integer timesteps t (N,)."""
    x_t = diffusion.q_sample(x0, t, noise)
    return diffusion.training_losses(model(x_t, t, y).float(), x0, x_t, t, noise)


# -----------------------------------------------------------------------------
# Rectified flow (objective='flow'): x_t = (1 - t) x0 + t noise, t in [0, 1], the network
# predicts the velocity noise - x0 (or x0 itself)

FLOW_T_SCALE = 1000     # flow's t in [0, 1] reaches the network as 1000 t, the range of DiT's
                        # integer timesteps, so one timestep embedder serves both objectives


def flow_velocity(out, x_t, t, flow_output, clip=False, t_min=1e-6):
    """The velocity eps - x0 from the network's output: itself, or from a predicted clean
    image x0_hat as (x_t - x0_hat) / t. Training floors t at 0.05 so the loss weight on
    x0_hat, 1 / t^2, stays bounded; an Euler step to t = 0 then lands exactly on x0_hat."""
    if flow_output == 'velocity':
        return out
    x0_hat = out.clamp(-1, 1) if clip else out
    return (x_t - x0_hat) / t.view(-1, 1, 1, 1).clamp(min=t_min)


def flow_loss(model, x0, y, t, noise, flow_output='velocity'):
    """Per-sample rectified-flow loss at times t (N,): regress the velocity noise - x0."""
    tt = t.view(-1, 1, 1, 1)
    x_t = x0 * (1 - tt) + noise * tt
    u = flow_velocity(model(x_t, t * FLOW_T_SCALE, y).float(), x_t, t, flow_output, t_min=0.05)
    return (u - (noise - x0)).pow(2).mean(dim=(1, 2, 3))


# -----------------------------------------------------------------------------
# Sampling: one function for both objectives. `model_fn(x, t) -> output` is the network with
# the condition (and guidance) already bound; noise comes from per-sample generators, so a
# sample depends on its seed only, not on the batch it was drawn in.

def sample_noise(shape, seeds, device):           # row i from a generator seeded by seeds[i]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds]).to(device)


@torch.no_grad()
def sample(model_fn, shape, seeds, objective, sampler, steps, device, clip=False, diffusion=None,
           flow_output='velocity'):
    """Draw len(seeds) samples of `shape` (C, H, W). eps: 'ddpm' ancestral steps or 'ddim' on
    `steps` respaced timesteps, model_fn given DiT's timesteps; flow: 'euler' or 'heun' steps of
    the ODE from t = 1 to 0, model_fn given t."""
    x = sample_noise(shape, seeds, device)
    if objective == 'flow':
        ts = torch.linspace(1.0, 0.0, steps + 1)
        for k in range(steps):
            t, t_next = ts[k].item(), ts[k + 1].item()
            tv = torch.full((len(x),), t, device=device)
            u = flow_velocity(model_fn(x, tv), x, tv, flow_output, clip)
            x_next = x + (t_next - t) * u
            if sampler == 'heun' and t_next > 0:
                tv = torch.full((len(x),), t_next, device=device)
                u_next = flow_velocity(model_fn(x_next, tv), x_next, tv, flow_output, clip)
                x_next = x + (t_next - t) * 0.5 * (u + u_next)
            x = x_next
        return x
    spaced = (diffusion or GaussianDiffusion.linear()).respaced(steps)
    step_seeds = [[int(s) * 7919 + 1 + i for s in seeds] for i in range(spaced.num_timesteps)]
    for i in reversed(range(spaced.num_timesteps)):
        t_model = torch.full((len(x),), int(spaced.timesteps[i]), device=device)
        out = model_fn(x, t_model).float()
        if sampler == 'ddim':
            x = spaced.ddim_step(out, x, i, clip)
        else:
            noise = sample_noise(shape, step_seeds[i], device) if i > 0 else None
            x = spaced.ddpm_step(out, x, i, noise, clip)
    return x


def check_sampler(objective, sampler):
    allowed = {'eps': ('ddpm', 'ddim'), 'flow': ('euler', 'heun')}[objective]
    if sampler not in allowed:
        raise UserError(f"sampler '{sampler}' does not sample objective '{objective}'; "
                         f"use one of {allowed}")


def guided(model, y, cfg_scale, objective, interval=(0.0, 1.0)):
    """model_fn for `sample`: the conditional network, with classifier-free guidance while
    the normalized time (t / 1000 for eps, t for flow) is inside `interval`."""
    def fn(x, t):
        t_net = t * FLOW_T_SCALE if objective == 'flow' else t
        t_norm = (t if objective == 'flow' else t.float() / 1000)[0].item()
        if cfg_scale == 1.0 or model.cond == 'none' or not interval[0] <= t_norm <= interval[1]:
            return model(x, t_net, y)
        cond = y
        if cond.is_floating_point():                   # soft codes: the null row, one-hot
            cond = F.pad(cond, (0, model.null + 1 - cond.shape[-1]))
            null = torch.full(cond.shape[:-1], model.null, device=cond.device)
            null = F.one_hot(null, model.null + 1).to(cond)
        else:
            null = torch.full_like(cond, model.null)
        return model.forward_with_cfg(torch.cat([x, x]), torch.cat([t_net, t_net]),
                                      torch.cat([cond, null]), cfg_scale)[: len(x)]
    return fn


# -----------------------------------------------------------------------------
# Data: images (built-in arrays or an image folder) or pre-extracted latents, plus the
# condition of every item: its DLC from the tokenizer's dump, or its class

def read_images(data_dir, split, image_size):
    """uint8 (N, H, W, 3) for the built-in arrays, or a folder dataset that yields them."""
    array = array_path(data_dir, split)
    if os.path.exists(array):
        images = np.load(array, mmap_mode='r')
        if images.dtype != np.uint8 or images.shape[1:] != (image_size, image_size, 3):
            raise UserError(f"{array}: expected uint8 (N, {image_size}, {image_size}, 3), got "
                             f"{images.dtype} {images.shape}; set --image_size to the data's size")
        return images
    if os.path.isdir(os.path.join(data_dir, split)):
        return ImageFolder(data_dir, split, image_size)
    raise missing_split(data_dir, split)


def read_conditions(cfg, split, n_items):
    """The condition of every item of a split, checked against the data: (N, L) codes, (N,)
    labels, or None. Returns (conditions, contract) where contract holds L, V and the codes'
    identity (codes_id), which the checkpoint keeps. Codes of other images are refused."""
    if cfg['cond'] == 'dlc':
        contract = read_contract(cfg['codes_dir'])
        codes = load_codes(cfg['codes_dir'], split, n_items, contract)
        check_same_images(contract, cfg['codes_dir'], split, cfg['data_dir'], cfg['allow_mix'])
        return codes, dict(L=contract['L'], V=contract['V'], codes_id=codes_identity(contract))
    if cfg['cond'] == 'none':
        return None, {}
    # classes: the folders', or on the built-in data the (shape, color) pair
    data_dir, factors = cfg['data_dir'], os.path.join(cfg['data_dir'], f'{split}_factors.npy')
    if os.path.exists(factors):
        f = np.load(factors)
        with open(os.path.join(data_dir, 'meta.json')) as meta:
            labels = f[:, 0] * len(json.load(meta)['color']) + f[:, 1]
    else:
        labels = ImageFolder(data_dir, split, cfg['image_size']).labels
        if labels is None:
            raise MissingFile(f"--cond=class needs the classes of split '{split}': class "
                              f"subfolders in {data_dir}/{split}/, or "
                              f"{data_dir}/{split}_labels.txt (a line per image; images.py)")
    if labels.max() >= cfg['num_classes']:
        raise UserError(f"split '{split}' of '{data_dir}' has labels up to {labels.max()}; "
                         "set --num_classes")
    return labels, {}


class TrainingSet(torch.utils.data.Dataset):
    """Item i: (image as float in [-1, 1] (C, H, W) or its latent, condition). Flips are chosen
    by the caller (a per-item flag) so they are the same on any number of processes."""
    def __init__(self, cfg, split):
        self.latent = bool(cfg['latents_dir'])
        self.images, self.flipped = None, None
        if self.latent:
            path = os.path.join(cfg['latents_dir'], f'latents_{split}.npy')
            if not os.path.exists(path):
                raise MissingFile(f"latents '{path}' not found: run python diffusion.py "
                                        f"--mode=extract --split={split} "
                                        f"--out_dir={cfg['latents_dir']}")
            self.images = load_array(path, f"python diffusion.py --mode=extract --split={split} "
                                           f"--out_dir={cfg['latents_dir']}", mmap_mode='r')
            flip_path = path.replace('.npy', '_flip.npy')
            if cfg['hflip']:
                if not os.path.exists(flip_path):
                    raise MissingFile(f"hflip=True needs '{flip_path}' (--mode=extract "
                                            "--extract_flip=True), or set --hflip=False")
                self.flipped = load_array(flip_path, "python diffusion.py --mode=extract "
                                          f"--split={split}", mmap_mode='r')
        else:
            self.images = read_images(cfg['data_dir'], split, cfg['image_size'])
        self.conditions, self.contract = read_conditions(cfg, split, len(self.images))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        i, flip = key
        if self.latent:
            x = torch.from_numpy(np.array((self.flipped if flip else self.images)[i])).float()
        else:
            x = torch.as_tensor(np.array(self.images[i])).permute(2, 0, 1).float() / 127.5 - 1
            if flip:
                x = x.flip(-1)
        if self.conditions is None:
            return x, torch.zeros(())
        return x, torch.as_tensor(np.array(self.conditions[i]).astype(np.int64))


class BatchSampler:
    """(index, flip) pairs of this process's micro-batches of each global batch. Epochs are
    seeded permutations, so the data position is a function of the iteration (exact resume)
    and the global batch is the same for any number of processes."""
    def __init__(self, n, batch_size, start, stop, seed, rank, world, micro, hflip):
        self.n, self.batch_size, self.start, self.stop, self.seed = n, batch_size, start, stop, seed
        self.rank, self.world, self.micro, self.hflip = rank, world, micro, hflip
        self.epoch, self.perm = None, None

    def __len__(self):
        return (self.stop - self.start) * self.batch_size // (self.world * self.micro)

    def __iter__(self):
        per_epoch = self.n // self.batch_size
        local = self.batch_size // self.world
        for it in range(self.start, self.stop):
            epoch, step = divmod(it, per_epoch)
            if epoch != self.epoch:
                gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                self.epoch, self.perm = epoch, torch.randperm(self.n, generator=gen)
                self.flips = torch.rand(self.n, generator=gen) < 0.5
            idx = self.perm[step * self.batch_size:(step + 1) * self.batch_size]
            idx = idx[self.rank * local:(self.rank + 1) * local]
            for k in range(0, local, self.micro):
                part = idx[k:k + self.micro].tolist()
                yield [(i, bool(self.flips[i]) and self.hflip) for i in part]


# -----------------------------------------------------------------------------
# Training

def load_public_dit(model, path):
    """DiT weights from a bare state dict, strictly: the public DiT-XL-2-256x256.pt, or the
    paper's fork's DiTSEM (cond='dlc'; it trains a torch.compile'd model, so its
    model.safetensors and EMA custom_checkpoint_0.pkl prefix every key with '_orig_mod.')."""
    if not os.path.exists(path):
        raise MissingFile(f"DiT weights '{path}' not found; download DiT-XL-2-256x256.pt "
                                "from https://dl.fbaipublicfiles.com/DiT/models/ and set "
                                "--init_from to its path")
    state = read_safetensors(path) if path.endswith('.safetensors') else \
        torch.load(path, map_location='cpu', weights_only=True)
    state = {k.removeprefix('_orig_mod.'): v for k, v in state.get('ema', state).items()}
    model.load_state_dict(state, strict=True)


def learning_rate_at(it, c, peak):
    """Linear warm-up, then constant (DiT's schedule); with cooldown_frac > 0, a linear fall to 0
    over the last share of max_iters (warm-up, stable, decay: short runs end on a settled net)."""
    if it < c['warmup_iters']:
        return peak * (it + 1) / c['warmup_iters']
    cooldown = int(c['cooldown_frac'] * c['max_iters'])
    if cooldown > 0 and it >= c['max_iters'] - cooldown:
        return peak * (c['max_iters'] - it) / cooldown
    return peak


def orthogonalize(G, steps=5):
    """Newton-Schulz: a batch of matrices (B, m, n) mapped near the orthogonal factor U V^T of
    their SVDs, by the quintic iteration with Muon's coefficients (Jordan et al. 2024)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm(dim=(1, 2), keepdim=True) + 1e-7)
    wide = X.shape[1] <= X.shape[2]
    X = X if wide else X.mT
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.mT


class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices: Nesterov momentum, then each update orthogonalized and scaled to
    the RMS of an AdamW update (0.2 sqrt(max(m, n))), so that AdamW's learning rates carry over.
    Matrices of one shape go through one batched float32 Newton-Schulz: on a CPU, per-matrix
    bfloat16 products (torch.optim.Muon's) cost as much as the rest of a tiny DiT's step."""
    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = {}
            for p in group['params']:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault('momentum_buffer', torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group['momentum'])
                by_shape.setdefault(p.shape, []).append((p, p.grad.lerp(buf, group['momentum'])))
            for shape, pairs in by_shape.items():
                updates = orthogonalize(torch.stack([u for _, u in pairs]).float())
                lr = group['lr'] * 0.2 * math.sqrt(max(shape))
                for (p, _), u in zip(pairs, updates):
                    p.mul_(1 - group['lr'] * group['weight_decay']).add_(u.to(p.dtype), alpha=-lr)


def make_optimizers(model, c):
    """AdamW on every parameter (DiT's); or Muon on the transformer blocks' matrices and AdamW on
    the rest (embeddings, code tables, the final layer, biases and norms), as in modded-nanogpt.
    The condition's tables may train at a multiple of the lr (cond_lr_mult): each code table row
    enters the embedding with weight 1/L, so at one lr the code embedding moves slowest of all.
    Weight decay, if any, on matrices only. Each group keeps its peak lr as 'peak_lr'."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [p for n, p in params if c['optimizer'] == 'muon' and n.startswith('blocks.')
            and p.ndim == 2]
    tables = [p for n, p in params if n.startswith(('sem_embedder.', 'y_embedder.'))]
    taken = {id(p) for p in muon + tables}
    rest = [p for _, p in params if id(p) not in taken]
    lr = c['learning_rate']
    groups = [dict(params=[p for p in rest if p.ndim >= 2], weight_decay=c['weight_decay'],
                   peak_lr=lr),
              dict(params=[p for p in rest if p.ndim < 2], weight_decay=0.0, peak_lr=lr),
              dict(params=tables, weight_decay=0.0, peak_lr=lr * c['cond_lr_mult'])]
    optimizers = [torch.optim.AdamW([g for g in groups if g['params']], lr=lr, betas=(0.9, 0.999),
                                    fused=True)]
    if muon:
        optimizers.append(Muon([dict(params=muon, peak_lr=c['muon_lr'])], c['muon_lr'],
                               weight_decay=c['weight_decay']))
    return optimizers


def ema_decay_at(it, c):
    """The EMA's decay at iteration it: with ema_warmup, (1 + it) / (10 + it) up to ema_decay,
    so that a short run does not keep much of the initial network in its average."""
    return min(c['ema_decay'], (1 + it) / (10 + it)) if c['ema_warmup'] else c['ema_decay']


def draw_global_batch(it, c, x_shape):
    """The timesteps (flow: times in [0, 1]), noise and condition dropouts of iteration it,
    drawn for the whole global batch from one generator, then sliced per process: the step is
    the same on any number of processes, and a resumed run draws them again."""
    gen = torch.Generator().manual_seed(c['seed'] * 1_000_003 + it)
    B = c['batch_size']
    if c['objective'] == 'eps':
        t = torch.randint(0, 1000, (B,), generator=gen)
    elif c['flow_t_std'] > 0:                       # flow: logit-normal t
        t = torch.sigmoid(c['flow_t_mean'] + c['flow_t_std'] * torch.randn(B, generator=gen))
    else:                                           # flow: uniform t
        t = torch.rand(B, generator=gen)
    noise = torch.randn(B, *x_shape, generator=gen)
    drop = torch.rand(B, generator=gen) < c['class_dropout_prob']
    return t, noise, drop


def drop_condition(y, drop, cond, null):
    """Classifier-free guidance's training: where drop is set, the whole condition becomes the
    null (a code: all L tokens); cond='none' has no condition."""
    if cond == 'none':
        return None
    return torch.where(drop[:, None] if cond == 'dlc' else drop, null, y)


def train(cfg):
    check_counts(cfg, 'batch_size', 'micro_batch_size', 'max_iters', 'log_interval',
                 'ckpt_interval', 'num_sampling_steps', 'image_size')
    check_counts(cfg, 'sample_interval', 'n_grid', minimum=0)
    check_finite(cfg, 'learning_rate', 'muon_lr', 'cond_lr_mult', 'weight_decay', 'grad_clip',
                 low=0.0)
    check_finite(cfg, 'ema_decay', 'class_dropout_prob', 'cooldown_frac', low=0.0, high=1.0)
    check_finite(cfg, 'cfg_scale')
    check_finite(cfg, 'mlp_ratio', low=0.25)       # an MLP at least a quarter of the width
    if cfg['optimizer'] not in ('adamw', 'muon'):
        raise UserError(f"--optimizer={cfg['optimizer']} is not one of 'adamw', 'muon'")
    rank, world, device = setup_distributed(cfg['device'])
    c, master = cfg, rank == 0
    device_type = 'cuda' if 'cuda' in device else 'cpu'
    check_sampler(c['objective'], c['sampler'])
    micro = c['micro_batch_size']
    if c['batch_size'] % (world * micro):
        raise UserError(f"batch_size={c['batch_size']} must be a multiple of processes ({world}) "
                         f"x micro_batch_size ({micro})")
    accum = c['batch_size'] // (world * micro)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # bf16 on GPUs: half the memory traffic of fp32, and no loss scaling needed
    autocast = torch.autocast('cuda', torch.bfloat16) if device_type == 'cuda' else nullcontext()
    os.makedirs(c['out_dir'], exist_ok=True)
    ckpt_path = os.path.join(c['out_dir'], 'diffusion.pt')

    data = TrainingSet(c, c['train_split'])
    x_shape = tuple(data[(0, False)][0].shape)           # (C, H, W) in the training space
    model_args = dict(input_size=x_shape[1], in_channels=x_shape[0],
                      mlp_ratio=c['mlp_ratio'],
                      cond=c['cond'], learn_sigma=c['learn_sigma'] and c['objective'] == 'eps',
                      num_classes=c['num_classes'], L=data.contract.get('L', 0),
                      V=data.contract.get('V', 0), head_hidden=c['head_hidden'],
                      **DiT_models[c['model']])
    torch.manual_seed(c['seed'])
    model = DiT(**model_args, grad_checkpoint=c['grad_checkpoint'])
    resume = resuming(c, ckpt_path)
    if not resume and c['init_from'] != 'scratch':
        load_public_dit(model, c['init_from'])
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizers = make_optimizers(model, c)
    iter_num = 0
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt['model'])
        ema.load_state_dict(ckpt['ema'])
        for opt, key in zip(optimizers, ('optimizer', 'muon')):
            opt.load_state_dict(ckpt[key])
        iter_num = ckpt['iter_num']
        if master:
            print(f"resuming from {ckpt_path} at iteration {iter_num}")
    raw_model = model
    ema_params, model_params = list(ema.parameters()), list(raw_model.parameters())
    if c['compile']:
        model = torch.compile(model)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device_type == 'cuda' else None)
    diffusion = GaussianDiffusion.linear()
    if master:
        n_params = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        print(f"{c['model']} ({n_params / 1e6:.2f}M parameters), cond={c['cond']}, "
              f"objective={c['objective']}, {'latents' if data.latent else 'pixels'} {x_shape}, "
              f"{world} process(es) x {accum} micro-batches of {micro} = batch {c['batch_size']}")

    def save():
        save_atomic(dict(model=raw_model.state_dict(), ema=ema.state_dict(),
                         **{key: opt.state_dict() for opt, key in zip(optimizers,
                                                                      ('optimizer', 'muon'))},
                         model_args=model_args, config=dict(c),
                         iter_num=iter_num, world_size=world, image_size=c['image_size'],
                         space='latent' if data.latent else 'pixel', cond=c['cond'],
                         objective=c['objective'], **data.contract), ckpt_path)

    stop = c['max_iters'] if c['run_iters'] < 0 else min(c['max_iters'], iter_num + c['run_iters'])
    sampler = BatchSampler(len(data), c['batch_size'], iter_num, stop, c['seed'], rank, world,
                           micro, c['hflip'])
    workers = c['num_workers'] if isinstance(data.images, ImageFolder) else 0
    loader = iter(torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=workers,
                                              pin_memory=device_type == 'cuda'))
    bar = tqdm(total=stop, initial=iter_num, disable=not master, desc='diffusion',
               dynamic_ncols=True)
    local = c['batch_size'] // world
    t0, history = time.time(), []
    while iter_num < stop:
        it = iter_num
        for opt in optimizers:
            for g in opt.param_groups:
                g['lr'] = learning_rate_at(it, c, g['peak_lr'])
        lr = optimizers[0].param_groups[0]['lr']          # the matrices' lr, as logged
        t_all, noise_all, drop_all = draw_global_batch(it, c, x_shape)
        loss_sum = torch.zeros((), device=device)
        for k in range(accum):
            x, y = next(loader)
            rows = slice(rank * local + k * micro, rank * local + (k + 1) * micro)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            t, noise = t_all[rows].to(device), noise_all[rows].to(device)
            y = drop_condition(y, drop_all[rows].to(device), c['cond'], raw_model.null)
            if world > 1:
                model.require_backward_grad_sync = k == accum - 1
            with autocast:
                if c['objective'] == 'flow':
                    loss = flow_loss(model, x, y, t, noise, c['flow_output']).mean()
                else:
                    loss = eps_loss(model, x, y, t, noise, diffusion).mean()
            (loss / accum).backward()
            loss_sum += loss.detach() / accum
        max_norm = c['grad_clip'] if c['grad_clip'] > 0 else float('inf')
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
        if not (torch.isfinite(loss_sum) and torch.isfinite(grad_norm)):   # before the bad update
            raise FloatingPointError(
                f"loss is {loss_sum.item()} (gradient norm {grad_norm.item()}) at iteration {it}; "
                f"{ckpt_path} keeps the last good state. Lower learning_rate or add warmup_iters, "
                "then continue with --init_from=resume")
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1 - ema_decay_at(it, c))
        iter_num += 1
        bar.update(1)
        if iter_num % c['log_interval'] == 0 or iter_num == stop:
            logged = loss_sum.clone()
            if world > 1:
                dist.all_reduce(logged)
                logged /= world
            logged = logged.item()
            history.append(dict(iter=iter_num, loss=logged))
            if master:
                n_iters = iter_num % c['log_interval'] or c['log_interval']
                tqdm.write(f"iter {iter_num}: loss {logged:.4f} lr {lr:.2e} "
                           f"{n_iters * c['batch_size'] / (time.time() - t0):.1f} img/s")
            t0 = time.time()
        preempted = preemption_requested(device)         # SIGTERM or SIGUSR1 on any process
        if master and (iter_num % c['ckpt_interval'] == 0 or iter_num == stop or preempted):
            save()
        if preempted:
            exit_preempted(rank, world, iter_num, ckpt_path)
        if master and c['sample_interval'] > 0 and \
                (iter_num % c['sample_interval'] == 0 or iter_num == stop):
            path = os.path.join(c['out_dir'], f'samples_{iter_num:07d}.png')
            write_sample_grid(ema, c, data, x_shape, device, path)
    bar.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return raw_model, ema, history


def write_sample_grid(ema, c, data, x_shape, device, path):
    """EMA samples for the conditions of the first n_grid training items (pixels only, or
    latents when a VAE is given)."""
    if data.latent and not c['vae_path']:
        return
    n = min(c['n_grid'], len(data))
    y = torch.stack([data[(i, False)][1] for i in range(n)]).to(device) \
        if c['cond'] != 'none' else None
    x = sample(guided(ema, y, c['cfg_scale'], c['objective'], c['guidance_interval']), x_shape,
               range(n), c['objective'], c['sampler'], c['num_sampling_steps'], device,
               clip=c['clip_denoised'], flow_output=c['flow_output'])
    vae = load_vae(c['vae_path']).to(device) if data.latent else None
    save_grid(decode_to_uint8(x, vae), path, ncol=int(math.ceil(math.sqrt(n))))


# -----------------------------------------------------------------------------
# Checkpoints, images

def load_checkpoint(path):
    return read_checkpoint(path, f"python diffusion.py <config> --out_dir="
                                 f"{os.path.dirname(path) or '.'} (train it), or for the "
                                 "class-conditional baseline download DiT-XL-2-256x256.pt "
                                 "(dl.fbaipublicfiles.com)")


def model_from_checkpoint(ckpt, weights='ema'):
    model = DiT(**ckpt['model_args'])
    model.load_state_dict(ckpt[weights])
    return model.eval()


def save_grid(images, path, ncol):
    """uint8 (N, H, W, 3) -> one PNG, ncol images per row, 2 px gaps."""
    n, h, w, _ = images.shape
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + 2) + 2, ncol * (w + 2) + 2, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = im
    Image.fromarray(grid).save(path)


def decode_to_uint8(x, vae):
    """Samples in the training space (pixels, or latents when a VAE is given) to uint8
    (N, H, W, 3) images."""
    if vae is not None:
        x = vae.decode(x / VAE_SCALE)
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# -----------------------------------------------------------------------------
# Extract: the SD-VAE latents of a split, once, so training never runs the encoder

@torch.no_grad()
def extract(cfg):
    """Writes out_dir/latents_<split>.npy (float16 (N, 4, H/8, W/8), scaled by VAE_SCALE) and,
    with extract_flip, latents_<split>_flip.npy of the mirrored images. Batch b is encoded by
    process b % world with a posterior sample seeded by b, so the file does not depend on the
    number of processes."""
    rank, world, device = setup_distributed(cfg['device'])
    vae = load_vae(cfg['vae_path']).to(device)
    images = read_images(cfg['data_dir'], cfg['split'], cfg['image_size'])
    N, bs, h = len(images), cfg['micro_batch_size'], cfg['image_size'] // 8
    os.makedirs(cfg['out_dir'], exist_ok=True)
    outputs = {'': os.path.join(cfg['out_dir'], f"latents_{cfg['split']}.npy")}
    if cfg['extract_flip']:
        outputs['_flip'] = os.path.join(cfg['out_dir'], f"latents_{cfg['split']}_flip.npy")
    partial = {k: f'{p}.partial.npy' for k, p in outputs.items()}
    if rank == 0:
        for p in partial.values():
            np.lib.format.open_memmap(p, mode='w+', dtype=np.float16, shape=(N, 4, h, h)).flush()
    if world > 1:
        dist.barrier()
    arrays = {k: np.load(p, mmap_mode='r+') for k, p in partial.items()}
    batches = range(rank, math.ceil(N / bs), world)
    for b in tqdm(batches, disable=rank != 0, desc=f"latents {cfg['split']}", dynamic_ncols=True):
        rows = range(b * bs, min(N, (b + 1) * bs))
        x = torch.stack([torch.as_tensor(images[i]) for i in rows]).to(device)
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        for key, array in arrays.items():
            view = x.flip(-1) if key == '_flip' else x
            gen = torch.Generator(device).manual_seed(cfg['seed'] * 1_000_003 + b)
            z = vae.encode(view, generator=gen)
            array[rows.start:rows.stop] = (z * VAE_SCALE).half().cpu().numpy()
    for array in arrays.values():
        array.flush()
    if world > 1:
        dist.barrier()
    if rank == 0:
        for key, path in outputs.items():
            os.replace(partial[key], path)
            print(f"wrote {path}: ({N}, 4, {h}, {h}) float16")
    if world > 1:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Recon and decode: codes -> DiT -> images, judged on the built-in data by the attribute
# reader of data/shapes (recon: does the result keep the source's factors?)

@torch.no_grad()
def draw_images(model, vae, cfg, ckpt, conditions, idx, device):
    """Images idx of the EMA DiT, uint8 (len(idx), H, W, 3), for conditions ((N, L) codes, (N,)
    classes or None), image i from the seed seed * 1_000_003 + i, with cfg's sampler and
    guidance: an image does not depend on the batch it is drawn in."""
    size = int(math.sqrt(model.pos_embed.shape[1])) * model.patch_size
    y = None
    if conditions is not None:
        y = torch.as_tensor(np.asarray(conditions[idx]).astype(np.int64)).to(device)
    model_fn = guided(model, y, cfg['cfg_scale'], ckpt['objective'], cfg['guidance_interval'])
    x = sample(model_fn, (model.in_channels, size, size),
               [cfg['seed'] * 1_000_003 + i for i in idx], ckpt['objective'], cfg['sampler'],
               cfg['num_sampling_steps'], device, clip=cfg['clip_denoised'],
               flow_output=ckpt['config'].get('flow_output', 'velocity'))
    return decode_to_uint8(x, vae)


def images_from_codes(cfg, ckpt, conditions, n, desc):
    """The EMA DiT's first n images, uint8 (n, H, W, 3) (draw_images, micro_batch_size at once)."""
    device = cfg['device']
    check_sampler(ckpt['objective'], cfg['sampler'])
    model = model_from_checkpoint(ckpt).to(device)
    vae = load_vae(cfg['vae_path']).to(device) if ckpt['space'] == 'latent' else None
    bs = cfg['micro_batch_size']
    return np.concatenate([draw_images(model, vae, cfg, ckpt, conditions,
                                       list(range(start, min(n, start + bs))), device)
                           for start in tqdm(range(0, n, bs), desc=desc, dynamic_ncols=True)])


def recon(cfg):
    ckpt_path = os.path.join(cfg['out_dir'], 'diffusion.pt')
    ckpt = load_checkpoint(ckpt_path)
    check_counts(cfg, 'n_recon', 'micro_batch_size', 'num_sampling_steps')
    images = read_images(cfg['data_dir'], cfg['split'], ckpt['image_size'])
    n = min(cfg['n_recon'], len(images))
    conditions, contract = read_conditions(dict(cfg, cond=ckpt['cond']), cfg['split'],
                                           len(images))
    if contract:
        check_fits(contract, ckpt['L'], ckpt['V'], cfg['codes_dir'], f"the DiT in {cfg['out_dir']}")
        check_same_tokenizer(contract['codes_id'], os.path.join(cfg['codes_dir'], SIDECAR),
                             ckpt.get('codes_id'), ckpt_path,
                             "point --codes_dir at the dumps the DiT was trained on, or train a "
                             f"DiT on these (python diffusion.py --codes_dir={cfg['codes_dir']})",
                             cfg['allow_mix'])
    recons = images_from_codes(cfg, ckpt, conditions, n, 'recon')
    sources = np.stack([np.array(images[i]) for i in range(min(n, 32))])
    pairs = np.stack([sources, recons[:32]], axis=1).reshape(-1, *sources.shape[1:])
    stem = os.path.join(cfg['out_dir'], f"recon_{cfg['split']}")
    save_grid(pairs, stem + '.png', ncol=16)
    save_atomic(dict(arr_0=recons), stem + '.npz')
    print(f"wrote {stem}.npz and {stem}.png (source | reconstruction pairs); {n} samples, "
          f"{cfg['sampler']} {cfg['num_sampling_steps']} steps, cfg {cfg['cfg_scale']}")
    return recons


def decode(cfg):
    """Every code of a dump (prior samples, composed codes, text2dlc's) -> images in out_dir:
    <name>_images.npz (arr_0, uint8 NHWC, for eval_fid.py and score.py) and a PNG grid of the
    first 64. Under torchrun the processes share the chunks of micro_batch_size codes, each
    saved to <name>_images.parts/ once drawn, so the same command relaunched draws only those
    missing (cluster.draw_in_chunks)."""
    check_counts(cfg, 'micro_batch_size', 'num_sampling_steps')
    rank, world, device = setup_distributed(cfg['device'])
    ckpt_path = os.path.join(cfg['out_dir'], 'diffusion.pt')
    ckpt = load_checkpoint(ckpt_path)
    if ckpt['cond'] != 'dlc':
        raise UserError(f"--mode=decode needs a DLC-conditioned DiT; {cfg['out_dir']} has "
                         f"cond='{ckpt['cond']}'")
    if not cfg['codes_path']:
        raise UserError("--mode=decode reads the codes in --codes_path (an .npy dump, e.g. "
                         "prior.py's samples.npy)")
    if not os.path.exists(cfg['codes_path']):
        raise MissingFile(f"--codes_path '{cfg['codes_path']}' not found")
    codes = check_codes(load_array(cfg['codes_path'], 'the command that wrote it', mmap_mode='r'),
                        ckpt['L'], ckpt['V'], cfg['codes_path'],
                        fix="give a dump of codes the DiT was trained on")
    identity, where = read_identity(cfg['codes_path'])
    check_same_tokenizer(identity, where or cfg['codes_path'], ckpt.get('codes_id'), ckpt_path,
                         "decode them with a DiT trained on that tokenizer's codes (--out_dir), "
                         "or draw codes from a model trained on this DiT's", cfg['allow_mix'])
    check_sampler(ckpt['objective'], cfg['sampler'])
    model = model_from_checkpoint(ckpt).to(device)
    vae = load_vae(cfg['vae_path']).to(device) if ckpt['space'] == 'latent' else None
    stem = os.path.join(cfg['out_dir'], os.path.splitext(os.path.basename(cfg['codes_path']))[0] +
                        '_images')
    keys = ('codes_path', 'seed', 'sampler', 'num_sampling_steps', 'cfg_scale',
            'guidance_interval', 'clip_denoised', 'micro_batch_size')
    run_info = dict({k: cfg[k] for k in keys}, n_codes=len(codes), iter_num=ckpt['iter_num'])
    full = draw_in_chunks(len(codes), cfg['micro_batch_size'], stem + '.parts', run_info, rank,
                          world, lambda idx: dict(images=draw_images(model, vae, cfg, ckpt, codes,
                                                                     idx, device)), desc='decode')
    if world > 1:
        dist.destroy_process_group()
    if full is None:
        return None
    images = np.array(full['images'])
    save_atomic(dict(arr_0=images), stem + '.npz')
    save_grid(images[:64], stem + '.png', ncol=16)
    shutil.rmtree(stem + '.parts')
    print(f"wrote {stem}.npz ({len(images)} images, one per code of {cfg['codes_path']}) and "
          f"{stem}.png")
    return images


def main(cfg):
    if cfg['mode'] == 'train':
        handle_preemption_signals()
    modes = {'train': train, 'extract': extract, 'recon': recon, 'decode': decode}
    if cfg['mode'] not in modes:
        raise UserError(f"--mode={cfg['mode']} is not one of {sorted(modes)}")
    return modes[cfg['mode']](cfg)


if __name__ == '__main__':
    command_line(CONFIG, sys.argv[1:], main, __file__)
