"""Claims about the hand-written Stable Diffusion VAE (sd-vae-ft-ema, diffusers layout)."""
import json
import math
import struct

import pytest
import torch

from vae import AutoencoderKL, load_vae, read_safetensors, VAE_SCALE

SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)

_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32"}


def write_safetensors(path, tensors, metadata=None):
    """Minimal hand-written safetensors writer: u64 header size, JSON header, raw bytes."""
    header, chunks, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()  # little-endian host
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)  # the format pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(chunks))


# Exact upstream diffusers keys of stabilityai/sd-vae-ft-ema and their shapes.
UPSTREAM = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down_blocks.0.resnets.0.norm1.weight": (128,),
    "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
    "encoder.down_blocks.0.downsamplers.0.conv.weight": (128, 128, 3, 3),
    "encoder.down_blocks.2.resnets.1.conv2.bias": (512,),
    "encoder.mid_block.attentions.0.to_q.weight": (512, 512),
    "encoder.mid_block.attentions.0.to_k.bias": (512,),
    "encoder.mid_block.attentions.0.group_norm.weight": (512,),
    "encoder.mid_block.resnets.1.norm2.bias": (512,),
    "encoder.conv_norm_out.weight": (512,),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.mid_block.attentions.0.to_out.0.weight": (512, 512),
    "decoder.up_blocks.0.resnets.2.conv2.weight": (512, 512, 3, 3),
    "decoder.up_blocks.0.upsamplers.0.conv.weight": (512, 512, 3, 3),
    "decoder.up_blocks.2.resnets.0.conv_shortcut.weight": (256, 512, 1, 1),
    "decoder.up_blocks.3.resnets.0.conv_shortcut.weight": (128, 256, 1, 1),
    "decoder.conv_norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}


def sd_vae_key_shapes():
    """Full-size sd-vae-ft-ema state_dict key -> shape, built on the meta device (no memory)."""
    with torch.device("meta"):
        m = AutoencoderKL()
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def test_full_size_layout_matches_sd_vae_ft_ema_keys_and_shapes():
    shapes = sd_vae_key_shapes()
    for key, shape in UPSTREAM.items():
        assert shapes.get(key) == shape, key
    # 248 tensors and 83,653,863 parameters, as in diffusers' AutoencoderKL for this config
    assert len(shapes) == 248
    assert sum(math.prod(s) for s in shapes.values()) == 83_653_863
    assert not any(k.startswith("encoder.down_blocks.3.downsamplers") for k in shapes)
    assert not any(k.startswith("decoder.up_blocks.3.upsamplers") for k in shapes)
    assert all(f"decoder.up_blocks.{i}.resnets.2.conv1.weight" in shapes for i in range(4))
    assert not any(".resnets.3." in k for k in shapes)
    assert VAE_SCALE == 0.18215


def test_meta_build_uses_no_real_memory():
    with torch.device("meta"):
        m = AutoencoderKL()
    assert all(p.is_meta for p in m.parameters())


def _small_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1
            for k, v in AutoencoderKL(**SMALL).state_dict().items()}


def test_small_checkpoint_loads_strictly_from_safetensors_and_bin(tmp_path):
    sd = _small_state_dict()
    half_key = "decoder.conv_out.weight"
    sd[half_key] = sd[half_key].half()  # stored as F16, must be cast into the F32 parameter
    st, pt = tmp_path / "vae.safetensors", tmp_path / "vae.bin"
    write_safetensors(st, sd, metadata={"format": "pt"})
    torch.save(sd, pt)
    a, b = load_vae(str(st), **SMALL), load_vae(str(pt), **SMALL)
    assert not a.training and not b.training
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and va.dtype == torch.float32 and torch.equal(va, vb)
        assert torch.equal(va, sd[ka].float())


def test_load_vae_rejects_a_mismatched_key_set(tmp_path):
    sd = _small_state_dict()
    sd["decoder.extra.weight"] = sd.pop("quant_conv.weight")
    p = tmp_path / "bad.bin"
    torch.save(sd, p)
    with pytest.raises(ValueError, match="quant_conv.weight"):
        load_vae(str(p), **SMALL)


def test_small_model_shapes_sampling_and_mean(tmp_path):
    torch.manual_seed(0)
    m = AutoencoderKL(**SMALL).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z1 = m.encode(x, generator=torch.Generator().manual_seed(7))
        z2 = m.encode(x, generator=torch.Generator().manual_seed(7))
        mean = m.encode_mean(x)
        y = m.decode(mean)
    assert z1.shape == mean.shape == (2, 4, 16, 16)  # two blocks -> one 2x downsample
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, mean)
    assert y.shape == x.shape
    # the sample's mean is encode_mean: with the posterior std forced to ~0 they coincide
    with torch.no_grad():
        m.quant_conv.bias[4:] = -1e4  # logvar clamps to -30 -> std ~3e-7
        zs = m.encode(x, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(zs, m.encode_mean(x), atol=1e-5)


def test_load_vae_missing_file_names_path_and_config_key(tmp_path):
    p = str(tmp_path / "nope" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError) as e:
        load_vae(p)
    assert p in str(e.value) and "vae_path" in str(e.value) and "sd-vae-ft-ema" in str(e.value)


def test_read_safetensors_round_trips_dtypes_exactly(tmp_path):
    g = torch.Generator().manual_seed(3)
    ts = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 2, 3, generator=g).bfloat16(),
        "i64": torch.randint(-2**62, 2**62, (4,), generator=g),
        "i32": torch.randint(-2**31, 2**31 - 1, (2, 3), generator=g, dtype=torch.int32),
        "scalar": torch.tensor(1.5),
    }
    p = tmp_path / "t.safetensors"
    write_safetensors(p, ts, metadata={"k": "v"})
    back = read_safetensors(str(p))
    assert set(back) == set(ts)  # __metadata__ is not a tensor
    for k, t in ts.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t)
