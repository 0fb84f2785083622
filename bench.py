"""
bench.py: training throughput of the components, and MFU on CUDA.

    python bench.py --component=dit --model=DiT-XL/2 --image_size=256 --batch_size=32
    python bench.py --component=tokenizer --batch_size=64
    python bench.py --component=prior --prior_model=medium --L=512 --V=256 --batch_size=64 \
        --sample_steps=1024
    python bench.py --component=text2dlc --prior_model=small --L=512 --V=256 --caption_len=128 \
        --batch_size=16
    python bench.py --component=contract --contract_gb=2

contract: the peak host memory of learning a code dump's L and V from a tokenizer checkpoint of
contract_gb GB (a synthetic one, written to a temporary folder), in a fresh process each way: the
whole file loaded, codes.py without a sidecar (the checkpoint memory-mapped), and with one.

The DiT runs on latents (image_size / 8, 4 channels) when image_size >= 64, else on pixels.
The prior reports training tok/s (tokens = codes x L) and sampling codes/s at sample_steps; the
text model (prior_model's size, a vocabulary of n_text + V + 2) tok/s over [code][sep][caption].
MFU = achieved FLOP/s / peak (bf16 dense: 989 TFLOP/s for an H100 SXM, set --peak_tflops).
FLOPs of a train step are counted as 3 x the forward pass's matmul FLOPs (forward + backward).
"""
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

from configurator import UserError, command_line

component = 'dit'               # 'dit' | 'tokenizer' | 'prior' | 'text2dlc' | 'contract'
model = 'DiT-XL/2'
prior_model = 'medium'          # a key of prior.PRIOR_MODELS
sample_steps = 128              # prior: sampler steps for the codes/s figure
image_size = 256
L = 512
V = 256
n_text = 50257                  # text2dlc: GPT-2's vocabulary
caption_len = 128               # text2dlc: caption tokens after the code and the separator
batch_size = 32
steps = 10
warmup = 3
compile = False
peak_tflops = 989.0
contract_gb = 2.0               # contract: the size of the synthetic tokenizer checkpoint
device = 'cuda' if torch.cuda.is_available() else 'cpu'
CONFIG = {k: globals()[k] for k in ['component', 'model', 'prior_model', 'sample_steps',
                                    'image_size', 'L', 'V', 'n_text', 'caption_len', 'batch_size',
                                    'steps', 'warmup', 'compile', 'peak_tflops', 'device',
                                    'contract_gb']}


def dit_step_fn(c):
    import diffusion as D
    latent = c['image_size'] >= 64
    size, channels = (c['image_size'] // 8, 4) if latent else (c['image_size'], 3)
    arch = D.DiT_models[c['model']]
    net = D.DiT(input_size=size, in_channels=channels, cond='dlc', L=c['L'], V=c['V'],
                learn_sigma=True, **arch).to(c['device'])
    tokens = (size // arch['patch_size']) ** 2
    d, depth = arch['hidden_size'], arch['depth']
    # per image, forward: per block 24 d^2 tokens (qkv, proj, mlp) + 4 tokens^2 d (attention)
    flops = 2 * depth * (12 * d * d * tokens + 2 * tokens * tokens * d)
    diffusion = D.GaussianDiffusion.linear()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=c['device'].startswith('cuda'))
    fwd = torch.compile(net) if c['compile'] else net
    x = torch.randn(c['batch_size'], channels, size, size, device=c['device'])
    y = torch.randint(0, c['V'], (c['batch_size'], c['L']), device=c['device'])

    def step():
        t = torch.randint(0, 1000, (len(x),), device=x.device)
        noise = torch.randn_like(x)
        x_t = diffusion.q_sample(x, t, noise)
        with autocast(c):
            loss = diffusion.training_losses(fwd(x_t, t, y).float(), x, x_t, t, noise).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, 3 * flops, 'img/s', 1


def tokenizer_step_fn(c):
    import tokenizer as T
    cfg = dict(T.CONFIG, ssl_loss='infonce', n_local_crops=0)
    net = T.SEMEncoder(**T.model_args_from(dict(cfg, L=c['L'], V=c['V']))).to(c['device'])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=c['device'].startswith('cuda'))
    fwd = torch.compile(net) if c['compile'] else net
    x = torch.randn(2 * c['batch_size'], 3, 224, 224, device=c['device'])
    tokens, d, depth = (224 // 14) ** 2 + 5, cfg['embed_dim'], cfg['depth']
    flops = 2 * 2 * depth * (12 * d * d * tokens + 2 * tokens * tokens * d)     # 2 views per image

    def step():
        with autocast(c):
            _, s, _ = fwd(x)
            loss = T.infonce_loss(net.head.project(s), 0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, 3 * flops, 'img/s', 1


def prior_step_fn(c):
    import prior as P
    arch = P.PRIOR_MODELS[c['prior_model']]
    net = P.SEDD(vocab_size=c['V'], seq_len=c['L'], cond_dim=128, dropout=0.0,
                 **arch).to(c['device'])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=c['device'].startswith('cuda'))
    fwd = torch.compile(net) if c['compile'] else net
    codes = torch.randint(0, c['V'], (c['batch_size'], c['L']), device=c['device'])
    d, depth, T = arch['hidden_size'], arch['n_blocks'], c['L']
    # per token, forward: per block 24 d^2 (qkv, out, mlp) + 4 T d (attention), then the output
    flops = 2 * depth * (12 * d * d + 2 * T * d) + 2 * d * (c['V'] + 1)

    def step():
        t = 1e-3 + (1 - 1e-3) * torch.rand(len(codes), device=codes.device)
        u = torch.rand(codes.shape, device=codes.device)
        with autocast(c):
            loss = P.diffusion_loss(fwd, codes, t, u, 1e-3, c['V']).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sampling():
        net.eval()
        draw = lambda steps: P.sample(P.model_score_fn(fwd, autocast(c)), c['batch_size'], c['L'],
                                      c['V'], steps, range(c['batch_size']), device=c['device'])
        draw(2)                             # warm-up: a compiled model recompiles for inference
        sync(c)
        t0 = time.time()
        draw(c['sample_steps'])
        sync(c)
        net.train()
        return c['batch_size'] / (time.time() - t0)
    step.sampling = sampling
    return step, 3 * flops, 'tok/s', c['L']


def text2dlc_step_fn(c):
    import prior as P
    import text2dlc as X
    arch = P.PRIOR_MODELS[c['prior_model']]
    S, mask_id = c['L'] + 1 + c['caption_len'], c['n_text'] + c['V'] + 1
    net = P.SEDD(vocab_size=mask_id, seq_len=S, cond_dim=128, dropout=0.0, **arch).to(c['device'])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, fused=c['device'].startswith('cuda'))
    fwd = torch.compile(net) if c['compile'] else net
    codes = torch.randint(0, c['V'], (c['batch_size'], c['L']))
    captions = torch.randint(0, c['n_text'], (c['batch_size'], c['caption_len']))
    lengths = torch.full((c['batch_size'],), c['caption_len'])
    x0, pad = X.sequences(codes, captions, lengths, c['n_text'], c['V'])
    x0, noisable = x0.to(c['device']), (~pad).to(c['device'])
    d, depth = arch['hidden_size'], arch['n_blocks']
    flops = 2 * depth * (12 * d * d + 2 * S * d) + 2 * d * (mask_id + 1)

    def step():
        t = torch.rand(len(x0), device=x0.device)
        u = torch.rand(x0.shape, device=x0.device)
        with autocast(c):
            nll, count = X.masked_cross_entropy(fwd, x0, noisable, t, u, mask_id, 1e-3)
            loss = nll.sum() / count.sum().clamp_min(1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, 3 * flops, 'tok/s', S


def autocast(c):
    return (torch.autocast('cuda', dtype=torch.bfloat16) if c['device'].startswith('cuda')
            else nullcontext())


def sync(c):
    if c['device'].startswith('cuda'):
        torch.cuda.synchronize()


def contract_memory(c):
    """Each way of reading the contract, in a child process: its peak RSS above that of a
    process that has imported torch."""
    # VmHWM, the peak resident set of this address space (ru_maxrss would carry the parent's)
    child = ("import sys, torch; sys.path.insert(0, {root!r}); import codes; "
             "peak = lambda: int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]); "
             "base = peak(); L = {read}; print(L, (peak() - base) / 1024)")
    root = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as d:
        ckpt = os.path.join(d, 'tok', 'tokenizer.pt')
        os.makedirs(os.path.dirname(ckpt))
        weights = torch.zeros(int(c['contract_gb'] * 2 ** 30) // 4)
        torch.save(dict(model={'w': weights}, L=c['L'], V=c['V'], image_size=c['image_size']), ckpt)
        del weights
        import codes
        codes.write_codes(os.path.join(d, 'dump'), 'val', torch.zeros(1, c['L']).numpy(), c['L'],
                          c['V'], c['image_size'], ckpt)
        ways = {'torch.load of the whole checkpoint': f"torch.load({ckpt!r}, weights_only=True)['L']",
                'codes.read_contract, no sidecar (mmap)':
                    f"codes.read_contract({os.path.dirname(ckpt)!r})['L']",
                'codes.read_contract, codes.json':
                    f"codes.read_contract({os.path.join(d, 'dump')!r})['L']"}
        print(f"reading L and V beside a {c['contract_gb']:g} GB tokenizer checkpoint: peak host "
              "memory above a process that imported torch")
        for name, read in ways.items():
            out = subprocess.run([sys.executable, '-c', child.format(root=root, read=read)],
                                 capture_output=True, text=True, check=True).stdout.split()
            print(f"  {name:<40} {float(out[-1]):8.0f} MB   (L = {out[-2]})")


def main(c):
    if c['component'] == 'contract':
        return contract_memory(c)
    for key in ('batch_size', 'steps', 'sample_steps', 'L', 'V', 'image_size'):
        if c[key] < 1:
            raise UserError(f"--{key}={c[key]} must be at least 1")
    torch.backends.cuda.matmul.allow_tf32 = True
    step_fns = {'dit': dit_step_fn, 'tokenizer': tokenizer_step_fn, 'prior': prior_step_fn,
                'text2dlc': text2dlc_step_fn}
    if c['component'] not in step_fns:
        raise UserError(f"--component={c['component']} is not one of "
                        f"{sorted(step_fns) + ['contract']}")
    step, flops_per_item, unit, per_item = step_fns[c['component']](c)
    for _ in range(c['warmup']):
        step()
    sync(c)
    t0 = time.time()
    for _ in range(c['steps']):
        step()
    sync(c)
    dt = (time.time() - t0) / c['steps']
    rate = c['batch_size'] * per_item / dt
    names = {'dit': c['model'], 'prior': c['prior_model'], 'text2dlc': c['prior_model']}
    name = names.get(c['component'], '')
    line = f"{c['component']} {name} batch {c['batch_size']}: " \
           f"{dt * 1000:.1f} ms/step, {rate:.1f} {unit}, {rate * flops_per_item / 1e12:.3f} TFLOP/s"
    if c['device'].startswith('cuda'):
        line += f", MFU {rate * flops_per_item / (c['peak_tflops'] * 1e12) * 100:.1f}%"
    print(line)
    if hasattr(step, 'sampling'):
        print(f"{c['component']} {name} sampling, {c['sample_steps']} steps, "
              f"batch {c['batch_size']}: {step.sampling():.2f} codes/s")


if __name__ == '__main__':
    command_line(CONFIG, sys.argv[1:], main, __file__)
