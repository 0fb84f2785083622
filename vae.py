"""
vae.py: the frozen autoencoder of the ImageNet recipe, what DiT imports from diffusers.

The SD-VAE (AutoencoderKL of stabilityai/sd-vae-ft-ema) maps 256 px images to 4 x 32 x 32
latents and back. Its module and parameter names are diffusers', so its
diffusion_pytorch_model.{bin,safetensors} loads strictly; .safetensors files are read by hand
(read_safetensors), so the `safetensors` package is not needed. The DiT sees latents scaled by
VAE_SCALE; `diffusion.py --mode=extract` runs the encoder once per dataset, and diffusion.py
and sample.py decode with it. Not used on the built-in data, which is diffused in pixels.
"""
import json
import os
import struct
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import MissingFile, UserError

VAE_SCALE = 0.18215  # sd-vae-ft-ema config "scaling_factor": unit-variance latents for the UNet


class _VAEResnet(nn.Module):
    """diffusers ResnetBlock2D without a time embedding (and dropout 0): GN-SiLU-conv twice."""
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        # diffusers creates the 1x1 shortcut only when the width changes (no key otherwise)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class _VAEAttention(nn.Module):
    """diffusers Attention of the VAE mid block: one head over all channels, the spatial
    positions as tokens, the residual added back."""
    def __init__(self, ch, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        # a ModuleList so the key is "to_out.0" (diffusers keeps a dropout at index 1)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)                      # (B, HW, C)
        q, k, v = (lin(t).unsqueeze(1) for lin in (self.to_q, self.to_k, self.to_v))
        o = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))  # scale 1/sqrt(C)
        return x + o.transpose(1, 2).reshape(b, c, h, w)


class _VAEDownsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):       # the original LDM code's asymmetric pad, right and bottom
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _VAEUpsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _VAEBlock(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D (resnets, then an optional resampler) and, with
    mid=True, UNetMidBlock2D (resnet, attention, resnet)."""
    def __init__(self, cin, cout, n, groups, down=False, up=False, mid=False):
        super().__init__()
        if mid:
            self.attentions = nn.ModuleList([_VAEAttention(cout, groups)])
        self.resnets = nn.ModuleList(_VAEResnet(cin if i == 0 else cout, cout, groups)
                                     for i in range(n))
        if down:
            self.downsamplers = nn.ModuleList([_VAEDownsample(cout)])
        if up:
            self.upsamplers = nn.ModuleList([_VAEUpsample(cout)])

    def forward(self, x):
        if hasattr(self, 'attentions'):
            return self.resnets[1](self.attentions[0](self.resnets[0](x)))
        for m in [*self.resnets, *getattr(self, 'downsamplers', []),
                  *getattr(self, 'upsamplers', [])]:
            x = m(x)
        return x


class _VAEEncoder(nn.Module):
    """Every block but the last halves the size; the output is the mean and the log variance."""
    def __init__(self, cin, chs, n, zc, groups):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            _VAEBlock(chs[max(i - 1, 0)], c, n, groups, down=i < len(chs) - 1)
            for i, c in enumerate(chs))
        self.mid_block = _VAEBlock(chs[-1], chs[-1], 2, groups, mid=True)
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 2 * zc, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))


class _VAEDecoder(nn.Module):
    """The encoder reversed, with one more resnet per block; every block but the last doubles
    the size."""
    def __init__(self, cout, chs, n, zc, groups):
        super().__init__()
        rev = list(reversed(chs))
        self.conv_in = nn.Conv2d(zc, rev[0], 3, padding=1)
        self.mid_block = _VAEBlock(rev[0], rev[0], 2, groups, mid=True)
        self.up_blocks = nn.ModuleList(
            _VAEBlock(rev[max(i - 1, 0)], c, n + 1, groups, up=i < len(rev) - 1)
            for i, c in enumerate(rev))
        self.conv_norm_out = nn.GroupNorm(groups, chs[0], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[0], cout, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """The Stable Diffusion KL autoencoder with diffusers' module and parameter names, so the
    published weights load with strict=True and no key translation. Images are in [-1, 1];
    latents are unscaled (multiply by VAE_SCALE); f = 2 ** (len(block_out_channels) - 1)."""
    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                 layers_per_block=2, latent_channels=4, norm_num_groups=32):
        super().__init__()
        chs, n, zc = tuple(block_out_channels), layers_per_block, latent_channels
        self.encoder = _VAEEncoder(in_channels, chs, n, zc, norm_num_groups)
        self.decoder = _VAEDecoder(out_channels, chs, n, zc, norm_num_groups)
        self.quant_conv = nn.Conv2d(2 * zc, 2 * zc, 1)
        self.post_quant_conv = nn.Conv2d(zc, zc, 1)

    def _moments(self, x):
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)  # each (B,zc,H/f,W/f)
        return mean, logvar.clamp(-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp

    def encode(self, x, generator=None):
        """A sample z ~ N(mean, exp(logvar)) of the posterior, unscaled."""
        mean, logvar = self._moments(x)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def encode_mean(self, x):
        return self._moments(x)[0]

    def decode(self, z):
        """Unscaled latents (B,zc,h,w) -> images (B,3,h*f,w*f), roughly in [-1, 1], unclamped."""
        return self.decoder(self.post_quant_conv(z))


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """A .safetensors file -> {name: tensor} on CPU. Layout: u64 little-endian header size N,
    N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"},
    then the little-endian tensor bytes (offsets relative to the end of the header)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise UserError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        buf = bytearray(data[begin:end])  # a writable copy, so the tensor owns its memory
        t = torch.frombuffer(buf, dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        if sys.byteorder == "big" and t.element_size() > 1:  # file bytes are little-endian
            t = t.view(torch.uint8).view(-1, t.element_size()).flip(1).contiguous()
            t = t.view(dtype).flatten()
        out[name] = t.reshape(tuple(info["shape"]))
    return out


def load_vae(path, **arch):
    """Build the sd-vae-ft-ema AutoencoderKL (or `arch` overrides) and load `path` strictly:
    diffusion_pytorch_model.safetensors (read by hand) or .bin/.pt (torch.load)."""
    if not os.path.isfile(path):
        raise MissingFile(
            f"VAE weights not found at {path!r}. Download diffusion_pytorch_model.safetensors "
            f"(or .bin) from https://huggingface.co/stabilityai/sd-vae-ft-ema and set the config "
            f"key 'vae_path' to its location.")
    model = AutoencoderKL(**arch)
    if path.endswith(".safetensors"):
        sd = read_safetensors(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    # older checkpoints (sd-vae-ft-ema is from 2022) may carry the deprecated attention names,
    # which diffusers renames on load
    old = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.",
           ".proj_attn.": ".to_out.0."}
    for k in [k for k in sd if ".attentions." in k]:
        new = k
        for a, b in old.items():
            new = new.replace(a, b)
        sd[new] = sd.pop(k)
    want, have = set(model.state_dict()), set(sd)
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise UserError(f"{path} does not match the diffusers AutoencoderKL layout: "
                         f"{len(missing)} missing keys (e.g. {missing[:5]}), "
                         f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})")
    model.load_state_dict(sd, strict=True)  # copies and casts (e.g. F16 -> F32) into the params
    return model.eval()
