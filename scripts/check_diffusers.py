#!/usr/bin/env python3
"""Checks that a model directory written by `ddpm-cuda train` is a diffusers model, by loading it with
diffusers itself, and optionally that diffusers samples what ddpm-cuda sampled.

    /path/to/venv/bin/python scripts/check_diffusers.py runs/tiny
    /path/to/venv/bin/python scripts/check_diffusers.py runs/tiny --init-noise x_T.npy --ours ours.npy \
        --steps 50

The first form loads the UNet (UNet2DModel.from_pretrained) and the scheduler (DDPMScheduler.from_pretrained),
prints what it found, and runs one forward pass. The second also runs diffusers' DDIMScheduler with eta 0
from the same x_T that `ddpm-cuda sample --sampler ddim --eta 0 --init-noise x_T.npy --out-npy ours.npy`
used, and prints the largest difference between the two sets of samples.

Run by hand (torch + diffusers from PyPI); CI never needs PyTorch.
"""
import argparse
import sys

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--init-noise")
    ap.add_argument("--ours")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()

    unet = UNet2DModel.from_pretrained(args.model).eval()
    sched = DDPMScheduler.from_pretrained(args.model)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet2DModel: {n_params} parameters, sample_size {unet.config.sample_size}, "
          f"blocks {list(unet.config.block_out_channels)}")
    print(f"DDPMScheduler: {sched.config.num_train_timesteps} steps, {sched.config.beta_schedule} "
          f"{sched.config.beta_start}..{sched.config.beta_end}, variance {sched.config.variance_type}, "
          f"clip {sched.config.clip_sample}")
    size, c = unet.config.sample_size, unet.config.in_channels
    with torch.no_grad():
        x = torch.randn(2, c, size, size, generator=torch.Generator().manual_seed(0))
        out = unet(x, torch.tensor([10, 900])).sample
    print(f"forward pass: output {tuple(out.shape)}, mean {out.mean():.4f}, std {out.std():.4f}")

    if args.init_noise:
        x = torch.from_numpy(np.load(args.init_noise)).to(torch.float64)
        unet = unet.to(torch.float64)
        ddim = DDIMScheduler.from_config(sched.config)
        ddim.set_timesteps(args.steps)
        with torch.no_grad():
            for t in ddim.timesteps:
                eps = unet(x, t).sample
                x = ddim.step(eps, t, x, eta=0.0).prev_sample
        ref = x.numpy().astype(np.float32)
        print(f"diffusers DDIM eta 0, {args.steps} steps from {args.init_noise}: shape {ref.shape}")
        if args.ours:
            ours = np.load(args.ours)
            diff = np.abs(ours - ref)
            print(f"max |ours - diffusers| = {diff.max():.3e}, mean {diff.mean():.3e}")
            if diff.max() > 1e-3:
                print("MISMATCH", file=sys.stderr)
                sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()
