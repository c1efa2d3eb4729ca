#!/usr/bin/env python3
"""Writes the reference fixtures from diffusers:

tests/fixtures/unet_small.safetensors: a small diffusers UNet2DModel of the paper's family with random
weights, an input batch, timesteps, a target, the output, the MSE loss and every parameter gradient.

tests/fixtures/unet_cond.safetensors: the same with a class embedding and class labels (see unet_cond).

tests/fixtures/schedulers.safetensors: the schedule tables as diffusers computes them (float32), add_noise
outputs, DDPMScheduler.step outputs for given model output, sample and noise (both variance types,
clipping on and off, all 1000 steps and respaced to 10), and DDIM eta-0 samples of another small model
(its weights included) from a given x_T for 1, 10 and 50 steps, computed in float64.

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
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
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


def randomise(model):
    """Random weights on the scale where every path matters (the paper's init zeroes some layers); a class
    embedding's rows N(0, 1), as this engine initialises them. Then float64 for the reference."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name == "class_embedding.weight":
                p.copy_(torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
    return model.to(torch.float32).to(torch.float64)


def reference(model, x, t, target, out, loss):
    """The tensors of a network fixture: every parameter and its gradient, the batch, output and loss."""
    tensors = {}
    for name, p in model.named_parameters():
        tensors[f"param.{name}"] = p.detach().to(torch.float32).contiguous()
        tensors[f"grad.{name}"] = p.grad.detach().to(torch.float32).contiguous()
    tensors["input"] = x.to(torch.float32)
    tensors["timesteps"] = t.to(torch.float32)
    tensors["target"] = target.to(torch.float32)
    tensors["output"] = out.detach().to(torch.float32)
    tensors["loss"] = loss.detach().reshape(1).to(torch.float32)
    return tensors


def unet_small():
    torch.manual_seed(20261125)
    model = randomise(UNet2DModel(**CONFIG))
    batch = 2
    x = torch.randn(batch, 3, 8, 8, dtype=torch.float32).to(torch.float64)
    t = torch.tensor([3, 777], dtype=torch.int64)
    target = torch.randn(batch, 3, 8, 8, dtype=torch.float32).to(torch.float64)
    out = model(x, t).sample
    loss = torch.mean((out - target) ** 2)
    loss.backward()

    tensors = reference(model, x, t, target, out, loss)
    meta = {"config": json.dumps(model.config), "torch": torch.__version__, "diffusers": diffusers.__version__}
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "unet_small.safetensors")
    save_file(tensors, path, metadata=meta)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {path}: {n} parameters, {os.path.getsize(path)} bytes, loss {loss.item():.6f}")
    return model, root


def unet_cond(root):
    """tests/fixtures/unet_cond.safetensors: unet_small's configuration with a class embedding
    (num_class_embeds 4: three classes and the null class, as this engine trains them), random weights,
    a batch with class labels, the output, the loss and every parameter gradient."""
    torch.manual_seed(20261203)
    model = randomise(UNet2DModel(**CONFIG, num_class_embeds=4))
    x = torch.randn(3, 3, 8, 8, dtype=torch.float32).to(torch.float64)
    t = torch.tensor([3, 500, 777], dtype=torch.int64)
    # Two images of class 2 (their embedding gradients add) and one of the null class; classes 0 and 1 get
    # no gradient, and a second forward pass with them checks their rows.
    labels = torch.tensor([2, 3, 2], dtype=torch.int64)
    target = torch.randn(3, 3, 8, 8, dtype=torch.float32).to(torch.float64)
    out = model(x, t, class_labels=labels).sample
    loss = torch.mean((out - target) ** 2)
    loss.backward()
    other = torch.tensor([0, 1, 3], dtype=torch.int64)
    with torch.no_grad():
        out_other = model(x, t, class_labels=other).sample
    tensors = reference(model, x, t, target, out, loss)
    tensors["labels"] = labels.to(torch.float32)
    tensors["other_labels"] = other.to(torch.float32)
    tensors["other_output"] = out_other.to(torch.float32)
    meta = {"config": json.dumps(model.config), "torch": torch.__version__, "diffusers": diffusers.__version__}
    path = os.path.join(root, "unet_cond.safetensors")
    save_file(tensors, path, metadata=meta)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {path}: {n} parameters, {os.path.getsize(path)} bytes, loss {loss.item():.6f}")


def schedulers(root):
    torch.manual_seed(7)
    out = {}
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         variance_type="fixed_large", clip_sample=True)
    out["table.linear.betas"] = ddpm.betas.clone()
    out["table.linear.alphas_cumprod"] = ddpm.alphas_cumprod.clone()
    cosine = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    out["table.cosine.alphas_cumprod"] = cosine.alphas_cumprod.clone()

    shape = (2, 3, 4, 4)
    x0 = torch.rand(shape) * 2 - 1
    noise = torch.randn(shape)
    t = torch.tensor([0, 999])
    out["add_noise.x0"], out["add_noise.noise"] = x0, noise
    out["add_noise.timesteps"] = t.to(torch.float32)
    out["add_noise.x_t"] = ddpm.add_noise(x0, noise, t)

    # DDPMScheduler.step draws its noise with randn_tensor(shape, generator): a generator seeded alike gives
    # the same draw, which is stored with the result.
    for respaced in (None, 10):
        for variance in ("fixed_large", "fixed_small"):
            for clip in (True, False):
                sch = DDPMScheduler(num_train_timesteps=1000, variance_type=variance, clip_sample=clip)
                if respaced:
                    sch.set_timesteps(respaced)
                    steps = [int(sch.timesteps[0]), int(sch.timesteps[5]), int(sch.timesteps[-1])]
                else:
                    steps = [999, 500, 10, 1, 0]
                for ts in steps:
                    key = f"step.{respaced or 1000}.{variance}.{'clip' if clip else 'noclip'}.{ts}"
                    eps = torch.randn(shape) * 1.5
                    sample = torch.randn(shape) * 2.0
                    seed = 1000 + ts
                    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                    prev = sch.step(eps, ts, sample, generator=torch.Generator().manual_seed(seed)).prev_sample
                    out[key + ".eps"], out[key + ".sample"], out[key + ".noise"] = eps, sample, z
                    out[key + ".prev"] = prev

    # DDIM with eta 0 from a given x_T. Its own small model, with weights at half the scale of unet_small's:
    # a random network at full scale makes the 50-step map chaotic (a 1e-5 change of the tables moves
    # the samples by 0.04), which would hide the algorithm behind float rounding; at half scale the same
    # change moves them by 1e-5. The model and the tables run in float64 (the tables built from float64
    # betas, not diffusers' float32 ones), so the reference is the exact algorithm.
    ddim_config = dict(CONFIG, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    torch.manual_seed(3)
    small = UNet2DModel(**ddim_config)
    with torch.no_grad():
        for name, p in small.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p) / math.sqrt(p[0].numel()))
    small = small.to(torch.float32).to(torch.float64).eval()
    for name, p in small.named_parameters():
        out[f"ddim.param.{name}"] = p.detach()
    x_T = torch.randn(2, 3, 8, 8)
    out["ddim.x_T"] = x_T
    ddim = DDIMScheduler.from_config(ddpm.config)
    ddim.alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    with torch.no_grad():
        for steps in (1, 10, 50):
            ddim.set_timesteps(steps)
            x = x_T.to(torch.float64)
            for t in ddim.timesteps:
                x = ddim.step(small(x, t).sample, t, x, eta=0.0).prev_sample
            out[f"ddim.{steps}"] = x.to(torch.float32)

    tensors = {k: v.to(torch.float32).contiguous() for k, v in out.items()}
    path = os.path.join(root, "schedulers.safetensors")
    meta = {"ddim_config": json.dumps(small.config), "torch": torch.__version__, "diffusers": diffusers.__version__}
    save_file(tensors, path, metadata=meta)
    print(f"wrote {path}: {len(tensors)} tensors, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    import sys
    # `make_fixtures.py unet_cond` writes that fixture alone (the others stay as committed).
    only = sys.argv[1:]
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
    if not only or "unet_small" in only:
        _, root = unet_small()
    if not only or "unet_cond" in only:
        unet_cond(root)
    if not only or "schedulers" in only:
        schedulers(root)
