"""
text2dlc.py: text -> DLC, a text discrete-diffusion language model fine-tuned on (code, caption)
pairs; with the DiT it makes text-to-image.

The method (Lavoie, Noukhovitch, Courville 2025, section 4.3; LLaDA, Nie et al. 2025)
------------------------------------------------------------------------------------
One vocabulary holds the n_text tokens of a text encoding (tiktoken), then the V code tokens,
a separator and the absorbing mask:

    text 0 .. n_text-1 | code v: n_text + v | sep: n_text + V | mask: n_text + V + 1

A training sequence is an image's DLC, the separator, then its caption, truncated or padded
(with the encoding's end-of-text token) to caption_len tokens:

    [c_1 .. c_L] [sep] [w_1 .. w_T] [pad ..]               length S = L + 1 + caption_len

Loss (masked diffusion, LLaDA's pretraining loss). Draw t ~ U(0, 1) per sequence (U(t_min, 1)
with t_min > 0: fewer steps spent where the other codes give the answer away; a t_one_share of the
sequences at t = 1, every code masked, where only the caption can say what the code is); mask every
non-pad token independently with probability p = (1 - eps) t + eps (eps = 1e-3); predict the
masked tokens from the rest:

    loss = sum over masked positions i of  -log p_theta(x_i | x_t) / p   /  (number masked)

the number masked counted over the whole global batch, so that the step does not depend on how
the batch is split across processes. Pads are never masked nor scored. The paper masks codes,
separator and caption alike (noise_caption=True); False masks only the codes, so that every
step trains p(code | caption). A caption_dropout share of the sequences gets the empty caption:
the unconditional model that classifier-free guidance needs.

The network and the diffusion math are the prior's (prior.py): SEDD's DDiT, conditioned on the
noise level sigma = -log(1 - p); its log ratios, restricted to the clean tokens and normalized,
are log p_theta(x_i | x_t).

Generation. The separator and the caption are fixed; the L code positions start masked and are
drawn by prior.sample over the V code tokens (the paper's script samples the whole vocabulary):
the paper's random-order sampler (one position per step, temperature 0.2, never re-masked), or
SEDD's analytic / Euler samplers. Guidance on the prompt: log p_w = log p_u + w (log p_c -
log p_u), renormalized, with p_u the prediction given the empty caption.
Initialization: from scratch, or from a GPT-2-vocabulary SEDD (sedd-small, sedd-medium) grown
by the code and separator rows (extend_pretrained).

Modes:  python text2dlc.py [config.py] [--key=value ...]
    --mode=train    (torchrun for DDP) codes_dir/codes_<split>.npy + captions -> text2dlc.pt
    --mode=sample   prompts -> out_dir/text_codes.npy (the dump format) + text_codes_prompts.txt
                    (data/shapes/score.py --samples --prompts scores them on the built-in data)
"""
import base64
import copy
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tiktoken
from tqdm import tqdm

import prior as P
from cluster import (draw_in_chunks, exit_preempted, handle_preemption_signals,
                     preemption_requested, resuming, save_atomic, setup_distributed)
from codes import (SIDECAR, check_fits, check_same_images, check_same_tokenizer, codes_identity,
                   dump_path, load_codes, read_checkpoint, read_contract, write_identity)
from configurator import MissingFile, UserError, check_counts, check_finite, command_line
from vae import read_safetensors

# -----------------------------------------------------------------------------
# config: the defaults are the paper's recipe, on SEDD's small model and the GPT-2 vocabulary
mode = 'train'                  # 'train' | 'sample'
out_dir = 'out-text2dlc'
init_from = 'scratch'           # 'scratch' | 'resume' | a GPT-2 SEDD (sedd-small, sedd-medium)
auto_resume = False             # resume from out_dir's checkpoint if there is one (cluster jobs)
codes_dir = 'out-imagenet-tokenizer'    # codes_<split>.npy + codes.json (tokenizer.py --mode=dump)
data_dir = 'data/imagenet'
captions_path = ''              # '' = data_dir/<split>_captions.txt; with {split}: each split's
                                # file; without: the train split's alone (no held-out loss); a
                                # line per item of the dump, in its order; tab-separated: one drawn
train_split = 'train'
val_split = 'val'
seed = 0
# text
text_encoding = 'weights/r50k_base.tiktoken'    # GPT-2's ranks, local | 'gpt2' (tiktoken
                                # downloads it) | another .tiktoken file | 'bytes' | 'words'
caption_len = 128               # caption tokens after the separator; with DLC512: the paper's 640
# model and loss
model = 'small'                 # a key of prior.PRIOR_MODELS; 'small' / 'medium' are SEDD's sizes
dropout = 0.1
noise_eps = 1e-3                # mask probability (1 - eps) t + eps
noise_caption = True            # the paper's: mask codes, separator, caption; False: the codes only
caption_dropout = 0.0           # share of sequences with the empty caption (guidance needs > 0)
t_min = 0.0                     # noise levels t ~ U(t_min, 1); the paper's: 0 (see the README)
t_one_share = 0.0               # share of sequences at t = 1 (every code masked); the paper's: 0
t_one_share_end = -1.0          # the share at max_iters, linear from t_one_share; < 0: constant
caption_adaln = False           # also feed the mean caption embedding to every block's adaLN; the
                                # paper's: False (the caption is only in the sequence)
# optimization
batch_size = 128                # global, across processes and accumulation steps
micro_batch_size = 16
max_iters = 600000
run_iters = -1                  # stop this run after so many iterations (resume later); -1: none
learning_rate = 1e-5            # the paper's, for a pretrained model
min_lr = 0.0
lr_decay = True                 # cosine from learning_rate to min_lr at max_iters
warmup_iters = 5
weight_decay = 0.0
grad_clip = 1.0
ema_decay = 0.9999
# held-out loss: bits per code token of val codes given their captions
eval_interval = 5000
n_eval = 1024
# generation
prompts = ''                    # 'a red square|a blue circle', or a file with one prompt per line
n_samples = 0                   # codes to draw, sample i: prompt i mod #prompts; 0 = one per prompt
sampler = 'random_order'        # 'random_order' (the paper's) | 'confidence' | 'analytic' | 'euler'
num_steps = 0                   # 0 = L (random_order: one token per step)
temperature = 0.2               # random_order: draw from p^(1/temperature)
cfg_scale = 1.0                 # guidance on the prompt; 1 = none (the paper's)
sample_batch_size = 256
sample_path = ''                # '' = out_dir/text_codes.npy (and its identity, text_codes.json)
allow_mix = False               # True: use codes of another tokenizer run or dataset anyway
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
compile = False
log_interval = 100
ckpt_interval = 5000
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple))]
CONFIG = {k: globals()[k] for k in config_keys}

# GPT-2's pre-tokenizer (tiktoken's r50k pattern): with GPT-2's ranks it is exactly 'gpt2'
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
END_OF_TEXT = '<|endoftext|>'
R50K_URL = 'https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken'  # = gpt2's


# -----------------------------------------------------------------------------
# Text encodings: every one a tiktoken Encoding; its ranks travel in the checkpoint

def ranks_to_text(ranks):
    """{token bytes: rank} -> the .tiktoken format: 'base64 rank' per line."""
    return ''.join(f"{base64.b64encode(b).decode()} {r}\n"
                   for b, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def ranks_from_text(text, source):
    ranks = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise UserError(f"{source}, line {n}: {line[:60]!r} is not 'base64 rank'; a .tiktoken "
                             "file (e.g. GPT-2's ranks) has one such line per token") from None
    if len(set(ranks.values())) != len(ranks) or any(bytes([i]) not in ranks for i in range(256)):
        raise UserError(f"{source} is not a byte-level BPE ranks file: ranks must be distinct and "
                         "every single byte must have one")
    return ranks


def caption_pieces(text):
    """An ASCII approximation of GPT-2's pre-tokenizer: ' red', ' square', ','."""
    return re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+", text)


def encoding_spec(name, captions=()):
    """The plain-dict description of an encoding (what the checkpoint stores):
    'gpt2' (tiktoken's, cached), a .tiktoken path, 'bytes' (256 tokens), or 'words' (the bytes plus
    every word piece of `captions`, so a short caption takes one token a word)."""
    if name == 'gpt2':
        try:
            enc = tiktoken.get_encoding('gpt2')
        except Exception as e:
            raise UserError(
                f"text_encoding='gpt2' needs tiktoken's GPT-2 files ({type(e).__name__}: {e}). On "
                "a connected machine tiktoken downloads and caches them (TIKTOKEN_CACHE_DIR reuses "
                "a cached copy offline); or set --text_encoding to a local GPT-2 ranks file "
                "(gpt2.tiktoken, 'base64 rank' per line), the same encoding") from None
        return dict(name='gpt2', pat_str=enc._pat_str, ranks=ranks_to_text(enc._mergeable_ranks),
                    special=dict(enc._special_tokens))
    ranks = {bytes([i]): i for i in range(256)}
    if name == 'words':
        counts = Counter(p.encode() for c in captions for p in caption_pieces(c))
        for piece, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            ranks.setdefault(piece, len(ranks))
    elif name != 'bytes':
        if not os.path.isfile(name):
            raise MissingFile(f"text_encoding '{name}' is not 'gpt2', 'bytes', 'words' or an "
                              "existing .tiktoken file; GPT-2's ranks are tiktoken's "
                              f"r50k_base.tiktoken ({R50K_URL}): save it there, or set "
                              "--text_encoding to its path")
        with open(name) as f:
            ranks = ranks_from_text(f.read(), name)
    return dict(name=os.path.basename(name), pat_str=GPT2_PATTERN, ranks=ranks_to_text(ranks),
                special={END_OF_TEXT: len(ranks)})


def encoding_from_spec(spec):
    ranks = ranks_from_text(spec['ranks'], f"encoding '{spec['name']}'")
    return tiktoken.Encoding(spec['name'], pat_str=spec['pat_str'], mergeable_ranks=ranks,
                             special_tokens=spec['special'])


def encode_captions(enc, captions, caption_len):
    """list of str -> (N, caption_len) int64, cut or padded with end-of-text; and (N,) lengths."""
    out = torch.full((len(captions), caption_len), enc.eot_token, dtype=torch.long)
    lengths = torch.zeros(len(captions), dtype=torch.long)
    for i, tokens in enumerate(enc.encode_ordinary_batch(list(captions))):
        tokens = tokens[:caption_len]
        out[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        lengths[i] = len(tokens)
    return out, lengths


def seen_tokens(enc, captions, caption_len):
    """(n_vocab,) bool: the text tokens that training captions (as cut to caption_len) hold."""
    seen = torch.zeros(enc.n_vocab, dtype=torch.bool)
    for tokens in enc.encode_ordinary_batch(sorted(set(captions))):  # each caption once
        seen[tokens[:caption_len]] = True
    return seen


def warn_unseen_words(enc, ckpt, prompts):
    """One line per prompt that holds words the text model never saw in training (a token of
    theirs is in no training caption): it draws codes for them all the same."""
    seen = ckpt.get('caption_tokens')
    if seen is None:                    # a checkpoint written before it kept them
        return
    for prompt in dict.fromkeys(prompts):
        words = prompt.split()
        unseen = [w for i, w in enumerate(words)
                  if not all(seen[t] for t in enc.encode_ordinary(w if i == 0 else ' ' + w))]
        if unseen:
            print(f"warning: prompt {prompt!r}: the text model never saw "
                  f"{', '.join(map(repr, unseen))} in training; its codes ignore them")


# -----------------------------------------------------------------------------
# The network: prior.py's SEDD, optionally also reading the caption through adaLN

class CaptionSEDD(P.SEDD):
    """SEDD's network whose adaLN also reads the caption (caption_adaln): the tokens from
    caption_start on are pooled, their mean embedding (padding and masked tokens left out) mapped
    and added to the noise level's, so every block sees the caption at every code position. With
    caption_start = 0 it is SEDD's network, parameter for parameter."""
    def __init__(self, vocab_size, seq_len, n_blocks, hidden_size, n_heads, cond_dim=128,
                 dropout=0.1, caption_start=0, caption_pad=-1):
        super().__init__(vocab_size, seq_len, n_blocks, hidden_size, n_heads, cond_dim, dropout)
        self.caption_start, self.caption_pad = caption_start, caption_pad
        if caption_start:
            self.caption_map = nn.Linear(hidden_size, cond_dim)

    def condition(self, x, sigma):
        c = self.sigma_map(sigma)
        if self.caption_start:
            words = x[:, self.caption_start:]
            seen = ((words != self.caption_pad) & (words != self.vocab_size))[..., None]
            mean = (self.vocab_embed(words) * seen).sum(1) / seen.sum(1).clamp_min(1)
            c = c + self.caption_map(mean)
        return c


def learning_rate_at(it, c):
    """Linear warm-up, then (lr_decay) a cosine from learning_rate to min_lr at max_iters."""
    if it < c['warmup_iters']:
        return c['learning_rate'] * (it + 1) / c['warmup_iters']
    if not c['lr_decay']:
        return c['learning_rate']
    progress = min(1.0, (it - c['warmup_iters']) / max(1, c['max_iters'] - c['warmup_iters']))
    return c['min_lr'] + 0.5 * (c['learning_rate'] - c['min_lr']) * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# Sequences, the loss, and the pretrained model's extension (pure functions)

def sequences(codes, captions, lengths, n_text, V):
    """codes (B, L) in [0, V), captions (B, T) text tokens, lengths (B,) -> tokens (B, S) of
    [codes][sep][caption], and pad (B, S): True on the caption's padding."""
    B, L = codes.shape
    sep = torch.full((B, 1), n_text + V, dtype=torch.long, device=codes.device)
    x = torch.cat([codes.long() + n_text, sep, captions], dim=1)
    pad = torch.arange(x.shape[1], device=x.device)[None] >= (L + 1 + lengths.to(x.device))[:, None]
    return x, pad


def noise(x0, noisable, t, u, mask_id, eps):
    """Mask each noisable token where its uniform u < p = (1 - eps) t + eps: (x_t, masked, p)."""
    p = (1 - eps) * t + eps
    masked = noisable & (u < p[:, None])
    return torch.where(masked, mask_id, x0), masked, p


def masked_cross_entropy(model, x0, noisable, t, u, mask_id, eps, weight=None):
    """(B,) sum over the masked positions of -log p_theta(x0_i | x_t) / p (LLaDA's weighting, or
    `weight` per row), and (B,) the number of masked positions."""
    x_t, masked, p = noise(x0, noisable, t, u, mask_id, eps)
    sigma = -torch.log1p(-p)                                      # the network's noise level
    out = model(x_t, sigma.float())                               # (B, S, mask_id + 1)
    log_p = out[masked][:, :mask_id].float().log_softmax(-1)      # (M, mask_id): clean tokens only
    nll = torch.zeros(x0.shape, dtype=log_p.dtype, device=x0.device)
    nll[masked] = -log_p.gather(-1, x0[masked][:, None]).squeeze(-1)
    w = 1 / p if weight is None else weight
    return (nll * w[:, None].to(nll.dtype)).sum(-1), masked.sum(-1)


def extend_pretrained(model, state, n_text, V, source='checkpoint'):
    """Load a text model's state dict (vocabulary n_text + its mask) into `model` (vocabulary
    n_text + V + 1 + mask): text rows and the mask row kept, code and separator rows new, the
    position embedding new when the checkpoint has none. Returns what is new, in words."""
    rows = state['vocab_embed.embedding'].shape[0]
    if rows != n_text + 1:
        raise UserError(f"{source} has {rows - 1} text tokens (+ its mask), but the text encoding "
                         f"has {n_text}; a GPT-2-vocabulary SEDD needs text_encoding='gpt2' or "
                         "GPT-2's .tiktoken ranks file")
    state, ours = dict(state), model.state_dict()
    grown_keys = ['vocab_embed.embedding', 'output_layer.linear.weight', 'output_layer.linear.bias']
    for key in grown_keys:
        grown = ours[key].clone()                             # the new rows keep their fresh init
        grown[:n_text] = state[key][:n_text]
        grown[-1] = state[key][-1]                            # the mask stays the absorbing state
        state[key] = grown
    if 'pos_embed' in state:
        pos = state['pos_embed'].reshape(1, -1, ours['pos_embed'].shape[-1])
        if pos.shape[1] < model.seq_len:
            raise UserError(f"{source}'s position embedding has {pos.shape[1]} positions, fewer "
                             f"than the {model.seq_len} of a sequence; lower caption_len")
        state['pos_embed'] = pos[:, :model.seq_len]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {'pos_embed', 'caption_map.weight', 'caption_map.bias'}:
        raise UserError(f"{source} does not fit --model: missing {sorted(missing)}, unexpected "
                         f"{sorted(unexpected)}")
    return [f"{k} rows {n_text}..{n_text + V} (the {V} codes and the separator)"
            for k in grown_keys] + missing


def read_pretrained(path):
    if not os.path.exists(path):
        raise MissingFile(f"init_from='{path}' not found; give a local SEDD checkpoint with "
                                "the GPT-2 vocabulary (louaaron/sedd-small or sedd-medium: .pth, "
                                ".bin or .safetensors), or 'scratch'")
    if path.endswith('.safetensors'):
        return read_safetensors(path)                 # vae.py's: no safetensors package
    return P.sedd_state_dict(path)


# -----------------------------------------------------------------------------
# Generation (pure): prompts -> codes

def code_log_ratios(model, captions, lengths, n_text, V, pad_id, cfg_scale=1.0,
                    autocast=nullcontext()):
    """A score function for prior.sample over the L code positions only: x (n, L) in [0, V] (V =
    masked) -> log ratios (n, L, V + 1) of the code tokens, given the fixed [sep][caption]. The
    unconditional prediction of guidance sees the empty caption (all pad)."""
    def run(x, sigma, caps, lens):
        codes = torch.where(x == V, 0, x)
        seq, _ = sequences(codes, caps, lens, n_text, V)
        seq[:, :x.shape[1]] = torch.where(x == V, n_text + V + 1, seq[:, :x.shape[1]])
        with autocast:
            out = model(seq, sigma)
        return out[:, :x.shape[1], n_text:n_text + V].float().log_softmax(-1)       # (n, L, V)

    empty = torch.full_like(captions, pad_id)

    def fn(x, sigma):
        log_p = run(x, sigma, captions, lengths)
        if cfg_scale != 1.0:
            uncond = run(x, sigma, empty, torch.zeros_like(lengths))
            log_p = (uncond + cfg_scale * (log_p - uncond)).log_softmax(-1)
        ratios = log_p - torch.expm1(sigma.float()).log()[:, None, None]
        return F.pad(ratios, (0, 1))                              # the mask's entry: never read
    return fn


@torch.no_grad()
def generate(model, enc, ckpt, prompts, seeds, device, sampler='random_order', steps=0,
             temperature=0.2, cfg_scale=1.0, batch_size=256, remask_eta=0.0, autocast=nullcontext(),
             progress=True):
    """One code (L,) per prompt, code i from seeds[i] alone: (len(prompts), L) long."""
    L, V, n_text = ckpt['L'], ckpt['V'], ckpt['n_text']
    steps = steps or L
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc='text2dlc', disable=not progress,
                      dynamic_ncols=True):
        batch = prompts[start:start + batch_size]
        caps, lens = encode_captions(enc, batch, ckpt['caption_len'])
        fn = code_log_ratios(model, caps.to(device), lens.to(device), n_text, V, enc.eot_token,
                             cfg_scale, autocast)
        out.append(P.sample(fn, len(batch), L, V, steps, seeds[start:start + len(batch)], sampler,
                            ckpt['noise_eps'], device, remask_eta=remask_eta,
                            temperature=temperature).cpu())
    return torch.cat(out) if out else torch.zeros(0, L, dtype=torch.long)


# -----------------------------------------------------------------------------
# Data: codes checked against the tokenizer, captions checked against the codes

def load_pairs(cfg, split, contract):
    """A split's code dump and captions: (codes (N, L), [[caption, alternatives..]] * N)."""
    codes_path = dump_path(cfg['codes_dir'], split)
    codes = load_codes(cfg['codes_dir'], split, contract=contract)
    check_same_images(contract, cfg['codes_dir'], split, cfg['data_dir'], cfg['allow_mix'])
    path = cfg['captions_path'].replace('{split}', split) if cfg['captions_path'] else \
        os.path.join(cfg['data_dir'], f'{split}_captions.txt')
    if not os.path.exists(path):
        raise MissingFile(f"captions '{path}' not found: one line per item of {codes_path}, "
                                "in its order; set --captions_path (with {split}) or --data_dir")
    with open(path, encoding='utf-8') as f:
        lines = f.read().splitlines()
    if not any(line.strip() for line in lines):
        raise UserError(f"captions '{path}' is empty; it needs a caption line per item of "
                         f"{codes_path}")
    if len(lines) != len(codes):
        raise UserError(f"captions '{path}' has {len(lines)} lines but {codes_path} has "
                         f"{len(codes)} codes; they must be the same items in the same order: "
                         "re-dump the codes of this split (python tokenizer.py --mode=dump) or fix "
                         "--captions_path")
    return codes, [line.split('\t') for line in lines]


def choose_captions(captions, items, u_choice, u_drop, caption_dropout):
    """One caption per item: alternative floor(u K) of its K, or '' with probability
    caption_dropout."""
    out = []
    for i, u, d in zip(items, u_choice.tolist(), u_drop.tolist()):
        K = len(captions[i])
        out.append('' if d < caption_dropout else captions[i][min(int(u * K), K - 1)])
    return out


@torch.no_grad()
def heldout_code_bits(model, codes, captions, enc, ckpt, t_per_code, batch_size, device, seed=0):
    """Bits per code token of held-out codes given their (first) caption: the masked-diffusion
    ELBO with the caption clean, E_t[(1 - eps) / p * sum of the masked codes' -log p], with
    stratified t and fixed draws so that evaluations compare."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    L, V, n_text, eps = ckpt['L'], ckpt['V'], ckpt['n_text'], ckpt['noise_eps']
    total = 0.0
    for start in range(0, len(codes), batch_size):
        c = torch.as_tensor(codes[start:start + batch_size].astype(np.int64))
        first = [options[0] for options in captions[start:start + len(c)]]
        caps, lens = encode_captions(enc, first, ckpt['caption_len'])
        x0, _ = sequences(c, caps, lens, n_text, V)
        is_code = torch.zeros_like(x0, dtype=torch.bool)
        is_code[:, :L] = True
        for k in range(t_per_code):
            t = (k + torch.rand(len(c), generator=gen, dtype=torch.float64)) / t_per_code
            u = torch.rand(x0.shape, generator=gen, dtype=torch.float64)
            p = (1 - eps) * t + eps
            nll, _ = masked_cross_entropy(model, x0.to(device), is_code.to(device), t.to(device),
                                          u.to(device), n_text + V + 1, eps,
                                          weight=((1 - eps) / p).to(device))
            total += nll.double().sum().item() / t_per_code
    model.train(was_training)
    return total / (len(codes) * L) / math.log(2)


# -----------------------------------------------------------------------------
# Training

def train(cfg):
    check_counts(cfg, 'batch_size', 'micro_batch_size', 'max_iters', 'log_interval',
                 'ckpt_interval', 'caption_len')
    check_counts(cfg, 'eval_interval', 'n_eval', minimum=0)
    check_finite(cfg, 'learning_rate', 'min_lr', 'weight_decay', 'grad_clip', low=0.0)
    check_finite(cfg, 'ema_decay', 'dropout', 'noise_eps', 'caption_dropout', low=0.0, high=1.0)
    rank, world, device = setup_distributed(cfg['device'])
    c, master = cfg, rank == 0
    device_type = 'cuda' if 'cuda' in device else 'cpu'
    micro = c['micro_batch_size']
    if c['batch_size'] % (world * micro):
        raise UserError(f"batch_size={c['batch_size']} must be a multiple of processes ({world}) "
                         f"x micro_batch_size ({micro})")
    accum = c['batch_size'] // (world * micro)
    if not (0 <= c['t_min'] < 1 and 0 <= c['t_one_share'] <= 1 and c['t_one_share_end'] <= 1):
        raise UserError(f"t_min={c['t_min']} must be in [0, 1), t_one_share={c['t_one_share']} "
                         f"and t_one_share_end={c['t_one_share_end']} in [0, 1] (the end < 0: "
                         "the share stays constant)")
    torch.backends.cuda.matmul.allow_tf32 = True
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device_type == 'cuda' else \
        nullcontext()
    os.makedirs(c['out_dir'], exist_ok=True)
    ckpt_path = os.path.join(c['out_dir'], 'text2dlc.pt')

    contract = read_contract(c['codes_dir'])
    L, V = contract['L'], contract['V']
    codes, captions = load_pairs(c, c['train_split'], contract)
    val = None
    if c['captions_path'] and '{split}' not in c['captions_path']:
        if master and c['eval_interval'] > 0:
            print(f"note: captions_path '{c['captions_path']}' has no {{split}}, so it is the "
                  f"{c['train_split']} split's alone: no held-out loss on {c['val_split']}")
    elif c['eval_interval'] > 0 and P.has_split(c, 'val_split'):
        val_codes, val_captions = load_pairs(c, c['val_split'], contract)
        n = c['n_eval'] or len(val_codes)
        val = val_codes[:n], val_captions[:n]
    resume = None
    if resuming(c, ckpt_path):
        resume = read_checkpoint(ckpt_path, f"python text2dlc.py <config> --out_dir={c['out_dir']}")
        spec = resume['encoding']
    else:
        spec = encoding_spec(c['text_encoding'], [t for options in captions for t in options])
    enc = encoding_from_spec(spec)
    n_text = enc.n_vocab
    info = dict(L=L, V=V, n_text=n_text, caption_len=c['caption_len'], noise_eps=c['noise_eps'],
                encoding=spec, codes_id=codes_identity(contract),
                caption_tokens=seen_tokens(enc, [t for o in captions for t in o], c['caption_len']))
    model_args = P.model_args_from(c, L + 1 + c['caption_len'], n_text + V + 1)
    if c['caption_adaln']:
        model_args.update(caption_start=L + 1, caption_pad=enc.eot_token)
    torch.manual_seed(c['seed'])
    model = CaptionSEDD(**model_args)
    if resume is None and c['init_from'] != 'scratch':
        new = extend_pretrained(model, read_pretrained(c['init_from']), n_text, V, c['init_from'])
        if master:
            print(f"loaded {c['init_from']}: every tensor (the text and mask rows of the "
                  f"vocabulary's three); new: {'; '.join(new)}")
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    groups = [dict(params=[p for p in model.parameters() if p.ndim >= 2],
                   weight_decay=c['weight_decay']),
              dict(params=[p for p in model.parameters() if p.ndim < 2], weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=c['learning_rate'], betas=(0.9, 0.999),
                                  fused=True)     # one kernel for all parameters, CPU too
    iter_num, history = 0, []
    if resume is not None:
        model.load_state_dict(resume['model'])
        ema.load_state_dict(resume['ema'])
        optimizer.load_state_dict(resume['optimizer'])
        iter_num, history = resume['iter_num'], resume['history']
        if master:
            print(f"resuming from {ckpt_path} at iteration {iter_num}")
    raw_model = model
    if c['compile']:
        model = torch.compile(model)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device_type == 'cuda' else None)
    if master:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"text2dlc {c['model']} ({n_params / 1e6:.2f}M parameters) on {len(codes)} (code, "
              f"caption) pairs: L={L} codes of V={V}, {n_text} text tokens ({spec['name']}), "
              f"sequences of {model_args['seq_len']}; {world} process(es) x {accum} micro-batches "
              f"of {micro} = batch {c['batch_size']}")

    def save():
        save_atomic(dict(model=raw_model.state_dict(), ema=ema.state_dict(),
                         optimizer=optimizer.state_dict(), model_args=model_args, config=dict(c),
                         iter_num=iter_num, world_size=world, history=history, **info), ckpt_path)

    mask_id = n_text + V + 1
    stream = P.EpochStream(len(codes), c['batch_size'], c['seed'])
    stop = c['max_iters'] if c['run_iters'] < 0 else min(c['max_iters'], iter_num + c['run_iters'])
    local = c['batch_size'] // world
    model.train()
    bar = tqdm(total=stop, initial=iter_num, disable=not master, desc='text2dlc',
               dynamic_ncols=True)
    t0, tokens = time.time(), 0
    while iter_num < stop:
        it = iter_num
        lr = learning_rate_at(it, c)                        # warm-up, then cosine
        for g in optimizer.param_groups:
            g['lr'] = lr
        # the whole global batch is drawn on every process (captions, noise), then sliced
        gen = torch.Generator().manual_seed(c['seed'] * 1_000_003 + it)
        B = c['batch_size']
        items = stream.batch(it)
        u_choice, u_drop = torch.rand(B, generator=gen), torch.rand(B, generator=gen)
        chosen = choose_captions(captions, items, u_choice, u_drop, c['caption_dropout'])
        caps, lens = encode_captions(enc, chosen, c['caption_len'])
        x0, pad = sequences(torch.as_tensor(codes[items].astype(np.int64)), caps, lens, n_text, V)
        noisable = ~pad
        if not c['noise_caption']:
            noisable[:, L:] = False
        t_all = c['t_min'] + (1 - c['t_min']) * torch.rand(B, generator=gen)
        u_all = torch.rand(x0.shape, generator=gen)
        share = c['t_one_share']
        if c['t_one_share_end'] >= 0:
            share += (c['t_one_share_end'] - share) * it / c['max_iters']
        if share > 0:                    # drawn last, so share 0 leaves the draws above as they are.
            # 1 - eps: the sampler's first noise level (p = 0.999, sigma 6.9; t = 1 has sigma inf)
            t_all[torch.rand(B, generator=gen) < share] = 1 - c['noise_eps']
        masked = noise(x0, noisable, t_all, u_all, mask_id, c['noise_eps'])[1]
        n_masked = masked.sum().clamp_min(1).item()
        loss_sum = torch.zeros((), device=device)
        for k in range(accum):
            rows = slice(rank * local + k * micro, rank * local + (k + 1) * micro)
            # dropout seeded by iteration and micro-batch of the global batch (as prior.py)
            torch.manual_seed((c['seed'] * 1_000_003 + it) * 4096 + rows.start // micro)
            if world > 1:
                model.require_backward_grad_sync = k == accum - 1
            with autocast:
                nll, _ = masked_cross_entropy(model, x0[rows].to(device), noisable[rows].to(device),
                                              t_all[rows].to(device), u_all[rows].to(device),
                                              mask_id, c['noise_eps'])
            loss = nll.sum() / n_masked
            (loss * world).backward()                 # DDP averages over processes: undo it
            loss_sum += loss.detach()
        P.clip_and_check(raw_model, loss_sum, it, c, ckpt_path)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_decay = min(c['ema_decay'], (1 + it) / (10 + it))
        with torch.no_grad():                           # one call for all the tensors
            torch._foreach_lerp_(ema_params, model_params, 1 - ema_decay)
        iter_num += 1
        tokens += int((~pad).sum())
        bar.update(1)
        if iter_num % c['log_interval'] == 0 or iter_num == stop:
            logged = P.all_reduce_mean(loss_sum).item() * world
            entry = dict(iter=iter_num, train_loss=logged)
            if val is not None and (iter_num % c['eval_interval'] == 0 or iter_num == stop):
                entry['val_code_bits'] = heldout_code_bits(ema, *val, enc, info,
                                                           P.EVAL_T_PER_CODE, micro, device)
            history.append(entry)
            if master:
                bits = entry.get('val_code_bits')
                held = f", held-out code bits (EMA) {bits:.4f}" if bits is not None else ''
                tqdm.write(f"iter {iter_num}: loss {logged:.4f}{held}, lr {lr:.2e}, "
                           f"{tokens / (time.time() - t0):.0f} tok/s")
            t0, tokens = time.time(), 0
        preempted = preemption_requested(device)         # SIGTERM or SIGUSR1 on any process
        if master and (iter_num % c['ckpt_interval'] == 0 or iter_num == stop or preempted):
            save()
        if preempted:
            exit_preempted(rank, world, iter_num, ckpt_path)
    bar.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return raw_model, ema, history


# -----------------------------------------------------------------------------
# Sample

def load_text2dlc(out_dir, device, weights='ema'):
    """(model, checkpoint, encoding) from out_dir/text2dlc.pt alone."""
    path = os.path.join(out_dir, 'text2dlc.pt')
    ckpt = read_checkpoint(path, f"python text2dlc.py <config> --out_dir={out_dir} (train it)")
    model = P.model_from_checkpoint(ckpt, weights, CaptionSEDD)
    return model.to(device).eval(), ckpt, encoding_from_spec(ckpt['encoding'])


def read_prompts(spec):
    """'a|b' or a file, one prompt per line."""
    if not spec:
        raise UserError("no prompts: set --prompts='a red square|a blue circle' or "
                         "--prompts=<file, one per line>")
    if os.path.isfile(spec):
        with open(spec, encoding='utf-8') as f:
            prompts = [line.split('\t')[0] for line in f.read().splitlines()]
    elif spec.lower().endswith('.txt') and '|' not in spec:
        raise MissingFile(f"--prompts file '{spec}' not found (a prompt file is one prompt "
                          "per line; prompts themselves: --prompts='a red square|a cat')")
    else:
        prompts = spec.split('|')
    if not prompts:
        raise UserError(f"--prompts={spec!r} holds no prompt")
    return prompts


def sample_mode(cfg):
    check_counts(cfg, 'sample_batch_size')
    check_counts(cfg, 'n_samples', 'num_steps', minimum=0)
    check_finite(cfg, 'temperature', low=1e-8)
    check_finite(cfg, 'cfg_scale')
    P.check_sampling(cfg['sampler'], 'remdm', 0.0)
    prompts = read_prompts(cfg['prompts'])
    rank, world, device = setup_distributed(cfg['device'])
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if 'cuda' in device else nullcontext()
    model, ckpt, enc = load_text2dlc(cfg['out_dir'], device)
    L, V = ckpt['L'], ckpt['V']
    contract = read_contract(cfg['codes_dir'])
    check_fits(contract, L, V, cfg['codes_dir'], f"the text model in {cfg['out_dir']}")
    check_same_tokenizer(codes_identity(contract), os.path.join(cfg['codes_dir'], SIDECAR),
                         ckpt.get('codes_id'), os.path.join(cfg['out_dir'], 'text2dlc.pt'),
                         "point --codes_dir at the dumps the text model was trained on",
                         cfg['allow_mix'])
    if rank == 0:
        warn_unseen_words(enc, ckpt, prompts)
    if cfg['cfg_scale'] != 1.0 and not ckpt['config']['caption_dropout']:
        print(f"note: guidance {cfg['cfg_scale']} with a model trained without caption_dropout: "
              "its empty-caption prediction was never trained")
    n = cfg['n_samples'] or len(prompts)
    code_type = np.uint16 if V <= 65536 else np.uint32

    def draw(indices):                                  # sample i is seeded by i alone
        codes = generate(model, enc, ckpt, [prompts[i % len(prompts)] for i in indices],
                         [cfg['seed'] * 1_000_003 + i for i in indices], device, cfg['sampler'],
                         cfg['num_steps'], cfg['temperature'], cfg['cfg_scale'], len(indices),
                         autocast=autocast, progress=False)
        return dict(codes=codes.numpy().astype(code_type))

    path = cfg['sample_path'] or os.path.join(cfg['out_dir'], 'text_codes.npy')
    keys = ('prompts', 'n_samples', 'sample_batch_size', 'seed', 'sampler', 'num_steps',
            'temperature', 'cfg_scale')
    run_info = dict({k: cfg[k] for k in keys}, iter_num=ckpt.get('iter_num'),
                    checkpoint=os.path.join(cfg['out_dir'], 'text2dlc.pt'))
    full = draw_in_chunks(n, cfg['sample_batch_size'], path + '.parts', run_info, rank, world,
                            draw, desc='text2dlc')
    if world > 1:
        dist.destroy_process_group()
    if full is None:
        return None
    full = np.array(full['codes'])
    used = [prompts[i % len(prompts)] for i in range(n)]
    save_atomic(full, path)
    write_identity(path, ckpt.get('codes_id'), os.path.join(cfg['out_dir'], 'text2dlc.pt'))
    shutil.rmtree(path + '.parts')
    with open(os.path.splitext(path)[0] + '_prompts.txt', 'w', encoding='utf-8') as f:
        f.write(''.join(p + '\n' for p in used))
    print(f"wrote {path}: {n} codes of L={L}, V={V} ({cfg['sampler']}, {cfg['num_steps'] or L} "
          f"steps, guidance {cfg['cfg_scale']}) and {os.path.splitext(path)[0]}_prompts.txt")
    return full, used


def main(cfg):
    if cfg['mode'] == 'train':
        handle_preemption_signals()
    modes = {'train': train, 'sample': sample_mode}
    if cfg['mode'] not in modes:
        raise UserError(f"--mode={cfg['mode']} is not one of {sorted(modes)}")
    return modes[cfg['mode']](cfg)


if __name__ == '__main__':
    command_line(CONFIG, sys.argv[1:], main, __file__)
