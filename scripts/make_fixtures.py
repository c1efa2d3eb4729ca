#!/usr/bin/env python3
"""Writes tests/fixtures/unet_small.safetensors: a small diffusers UNet2DModel of the paper's family with
random weights, an input batch, timesteps, a target, the output, the MSE loss and every parameter gradient.

Run by hand (CI never needs PyTorch):
    python -m venv /tmp/ref && /tmp/ref/bin/pip install torch diffusers safetensors numpy
    /tmp/ref/bin/python scripts/make_fixtures.py

The reference runs in float64 on float32-rounded weights and inputs, with the sinusoidal timestep
embedding computed in float64 (diffusers computes it in float32, an error of ~1e-5 at t ~ 1000 that would
swamp the comparison). Everything is stored as float32, PyTorch layouts (NCHW, conv [out, in, kh, kw]).
"""
import json
import math
import os

import torch
import diffusers
from diffusers import UNet2DModel
from safetensors.torch import save_file


def timestep_embedding_f64(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1,
                           scale=1, max_period=10000):
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift)
    emb = timesteps[:, None].to(torch.float64) * torch.exp(exponent)[None, :] * scale
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
    return emb


diffusers.models.embeddings.get_timestep_embedding = timestep_embedding_f64

CONFIG = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 12, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
    norm_eps=1e-6,
    attention_head_dim=None,
    dropout=0.0,
    # The paper's embedding (diffusers' defaults differ: flip_sin_to_cos=True, freq_shift=0).
    flip_sin_to_cos=False,
    freq_shift=1,
    # TensorFlow 'SAME' downsampling: pad (0, 1, 0, 1), then a stride-2 conv with no padding.
    downsample_padding=0,
)


def main():
    torch.manual_seed(20261125)
    model = UNet2DModel(**CONFIG)
    # Random weights on the scale where every path matters (the paper's init zeroes some layers).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
    model = model.to(torch.float32).to(torch.float64)
    batch = 2
    x = torch.randn(batch, 3, 8, 8, dtype=torch.float32).to(torch.float64)
    t = torch.tensor([3, 777], dtype=torch.int64)
    target = torch.randn(batch, 3, 8, 8, dtype=torch.float32).to(torch.float64)
    out = model(x, t).sample
    loss = torch.mean((out - target) ** 2)
    loss.backward()

    tensors = {}
    for name, p in model.named_parameters():
        tensors[f"param.{name}"] = p.detach().to(torch.float32).contiguous()
        tensors[f"grad.{name}"] = p.grad.detach().to(torch.float32).contiguous()
    tensors["input"] = x.to(torch.float32)
    tensors["timesteps"] = t.to(torch.float32)
    tensors["target"] = target.to(torch.float32)
    tensors["output"] = out.detach().to(torch.float32)
    tensors["loss"] = loss.detach().reshape(1).to(torch.float32)
    meta = {"config": json.dumps(model.config), "torch": torch.__version__, "diffusers": diffusers.__version__}
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "unet_small.safetensors")
    save_file(tensors, path, metadata=meta)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {path}: {n} parameters, {os.path.getsize(path)} bytes, loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
