#!/usr/bin/env python3
"""The PyTorch peer of `ddpm-cuda bench`: the same network (the paper's DDPM U-Net, diffusers' UNet2DModel
with one attention head) with the same weights, timed in the configurations a PyTorch user would pick:

  fp32     eager, TF32 convolutions and matmuls (PyTorch's default for convolutions)
  bf16     eager under bf16 autocast, channels_last
  compile  torch.compile(mode="max-autotune") under bf16 autocast, channels_last (CUDA graphs)

For each batch size: a training step (forward, MSE on the eps target, backward, AdamW, EMA) and a
sampling step (a forward pass without gradients), timed with CUDA events after warm-up, as images/s
(sampling: for the full 1000-step sampler). The network is built here from the weights' names, so the GPU
machine needs only torch and safetensors; when diffusers is importable the script first checks that its
output equals UNet2DModel's on a batch.

    python benches/peer_pytorch.py [--model DIR] [--batch 128,256] [--steps 10] [--configs fp32,bf16,compile]
    python benches/peer_pytorch.py --check-only --device cpu      # the equivalence check alone
    python benches/peer_pytorch.py --device cpu --preset tiny --batch 32   # the CPU peer (fp32 configurations)
    python benches/peer_pytorch.py --ceilings-only                # copy bandwidth and bf16 matmul rate

Before the configurations it measures the device's ceilings (copy bandwidth, a large bf16 matmul): the
GPU check reports our model FLOPs against that matmul rate (MFU).

Without --model the weights are drawn at random (the speed does not depend on them); --preset picks
ddpm-cuda's `tiny` network instead of the paper's. On the CPU (--device cpu) every configuration is fp32
(fp32 NCHW, channels_last, compile), timed by the wall clock with torch's threads set to the machine's
cores; scripts/cpu-peer.sh puts them beside `ddpm-cuda bench --device cpu` and prints the ratios.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PAPER = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256],
             down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
             up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
             norm_num_groups=32, norm_eps=1e-6, dropout=0.1)
# ddpm-cuda's `tiny` preset (src/model/config.rs), for `--preset tiny`.
TINY = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=[32, 64],
            down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
            layers_per_block=1, norm_num_groups=8, norm_eps=1e-6, dropout=0.0)
PRESETS = {"ddpm-cifar10": PAPER, "tiny": TINY}


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb, groups, eps, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Attention(nn.Module):
    def __init__(self, c, groups, eps):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=eps)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.group_norm(x).flatten(2).transpose(1, 2)  # (n, hw, c)
        q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
        o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.to_out[0](o).transpose(1, 2).reshape(n, c, h, w)


class Level(nn.Module):
    def __init__(self, resnets, attentions, sampler):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)
        if sampler is not None:
            setattr(self, sampler[0], nn.ModuleList([sampler[1]]))


class Resample(nn.Module):
    def __init__(self, c, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))  # TensorFlow 'SAME' for stride 2
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """diffusers' UNet2DModel for this family, parameter names included."""

    def __init__(self, cfg):
        super().__init__()
        ch, g, eps, drop = cfg["block_out_channels"], cfg["norm_num_groups"], cfg["norm_eps"], cfg["dropout"]
        temb, layers = 4 * ch[0], cfg["layers_per_block"]
        self.ch0 = ch[0]
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = nn.Linear(ch[0], temb)
        self.time_embedding.linear_2 = nn.Linear(temb, temb)
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        self.down_blocks, skips, c = nn.ModuleList(), [ch[0]], ch[0]
        for i, out in enumerate(ch):
            attn = cfg["down_block_types"][i] == "AttnDownBlock2D"
            res, att = [], []
            for _ in range(layers):
                res.append(ResBlock(c, out, temb, g, eps, drop))
                c = out
                if attn:
                    att.append(Attention(c, g, eps))
                skips.append(c)
            last = i == len(ch) - 1
            self.down_blocks.append(Level(res, att, None if last else ("downsamplers", Resample(c, True))))
            if not last:
                skips.append(c)
        self.mid_block = nn.Module()
        self.mid_block.resnets = nn.ModuleList([ResBlock(c, c, temb, g, eps, drop), ResBlock(c, c, temb, g, eps, drop)])
        self.mid_block.attentions = nn.ModuleList([Attention(c, g, eps)])
        self.up_blocks = nn.ModuleList()
        for i, out in enumerate(reversed(ch)):
            attn = cfg["up_block_types"][i] == "AttnUpBlock2D"
            res, att = [], []
            for _ in range(layers + 1):
                res.append(ResBlock(c + skips.pop(), out, temb, g, eps, drop))
                c = out
                if attn:
                    att.append(Attention(c, g, eps))
            last = i == len(ch) - 1
            self.up_blocks.append(Level(res, att, None if last else ("upsamplers", Resample(c, False))))
        self.conv_norm_out = nn.GroupNorm(g, c, eps=eps)
        self.conv_out = nn.Conv2d(c, cfg["out_channels"], 3, padding=1)

    def forward(self, x, t):
        temb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(timestep_embedding(t, self.ch0))))
        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            for j, r in enumerate(level.resnets):
                h = r(h, temb)
                if hasattr(level, "attentions"):
                    h = level.attentions[j](h)
                skips.append(h)
            if hasattr(level, "downsamplers"):
                h = level.downsamplers[0](h)
                skips.append(h)
        h = self.mid_block.resnets[0](h, temb)
        h = self.mid_block.attentions[0](h)
        h = self.mid_block.resnets[1](h, temb)
        for level in self.up_blocks:
            for j, r in enumerate(level.resnets):
                h = r(torch.cat([h, skips.pop()], dim=1), temb)
                if hasattr(level, "attentions"):
                    h = level.attentions[j](h)
            if hasattr(level, "upsamplers"):
                h = level.upsamplers[0](h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


LEGACY = [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")]


def load(model_dir):
    """The config and a state dict (legacy attention names renamed) of a diffusers-layout directory."""
    from safetensors.torch import load_file
    unet = os.path.join(model_dir, "unet") if os.path.isdir(os.path.join(model_dir, "unet")) else model_dir
    with open(os.path.join(unet, "config.json")) as f:
        cfg = dict(PAPER, **{k: v for k, v in json.load(f).items() if k in PAPER})
    state = {}
    for k, v in load_file(os.path.join(unet, "diffusion_pytorch_model.safetensors")).items():
        for old, new in LEGACY:
            k = k.replace(old, new)
        state[k] = v.float()
    return cfg, state


def check_against_diffusers(net, cfg, device):
    try:
        from diffusers import UNet2DModel
    except ImportError:
        print("diffusers not installed: equivalence not checked")
        return
    keys = ["sample_size", "in_channels", "out_channels", "block_out_channels", "down_block_types",
            "up_block_types", "layers_per_block", "norm_num_groups", "norm_eps", "dropout"]
    ref = UNet2DModel(**{k: cfg[k] for k in keys}, attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1,
                      downsample_padding=0).to(device).eval()
    ref.load_state_dict(net.state_dict(), strict=True)
    net.eval()
    torch.manual_seed(0)
    x = torch.randn(2, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], device=device)
    t = torch.tensor([3, 777], device=device)
    with torch.no_grad():
        d = (net(x, t) - ref(x, t).sample).abs().max().item()
    print(f"equivalence with diffusers' UNet2DModel on a batch: max |difference| = {d:.2e}")
    if d > 1e-3:
        sys.exit(f"the peer network differs from diffusers' ({d})")


def time_cuda(fn, iters, warmup=1):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def time_any(fn, iters, warmup, device):
    """Milliseconds per call: CUDA events on a GPU, the wall clock elsewhere (the CPU check of this script)."""
    if device != "cpu":
        return time_cuda(fn, iters, warmup)
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) * 1e3 / iters


def ceilings(device):
    """The device's two ceilings, measured as a PyTorch user would (docs: METHOD): a device-to-device copy
    (bytes read plus bytes written) and a large bf16 matrix product on random data through torch.matmul
    (cuBLAS), which is what the bf16 tensor cores give a real GEMM at this run's clocks; random data
    because zeros draw less power and read faster. ddpm-cuda bench's own bf16 ceiling is an mma.sync loop
    (kernels/peak.cu), below the wgmma rate on a Hopper: the GPU check reports MFU against this one.
    Returns (copy GB/s, matmul TFLOP/s). Smaller sizes on the CPU."""
    n, words = (8192, 1 << 29) if device != "cpu" else (1024, 1 << 22)
    a = torch.randn(words, device=device)
    b = torch.empty_like(a)
    copy = 8 * words / (time_any(lambda: b.copy_(a), 10, 2, device) * 1e-3) / 1e9
    del a, b
    # On the CPU the fp32 matmul (every CPU configuration is fp32), in GFLOP/s.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    x = torch.randn(n, n, device=device, dtype=dtype)
    y = torch.randn(n, n, device=device, dtype=dtype)
    tflops = 2 * n**3 / (time_any(lambda: x @ y, 10, 3, device) * 1e-3) / 1e12
    print(f"ceiling copy {copy:.0f} GB/s (device-to-device copy of {4 * words >> 20} MiB, read + written)")
    if device == "cpu":
        print(f"ceiling fp32 matmul {tflops * 1e3:.0f} GFLOP/s ({n}x{n}x{n}, random data, torch.matmul)")
    else:
        print(f"ceiling bf16 matmul {tflops:.1f} TFLOP/s ({n}x{n}x{n}, random data, torch.matmul)")
    del x, y
    if device != "cpu":
        torch.cuda.empty_cache()  # the configurations' peak memory is theirs alone
    return copy, tflops


# The configurations on the CPU, all fp32 (ddpm-cuda's CPU backend is fp32): NCHW eager, channels_last
# eager, and torch.compile (inductor's C++ backend, channels_last; minutes of compilation for the paper's
# network, so not in the default list).
CPU_CONFIGS = ("fp32", "channels_last", "compile")


def bench(cfg, state, batch, steps, mode, device):
    cpu = device == "cpu"
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    net = UNet(cfg).to(device)
    if state is not None:
        net.load_state_dict(state)
    ema = [p.detach().clone() for p in net.parameters()]
    fmt = torch.channels_last if mode != "fp32" else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4, weight_decay=0.0, fused=True)
    size, cin = cfg["sample_size"], cfg["in_channels"]
    x0 = torch.randn(batch, cin, size, size, device=device).to(memory_format=fmt)
    run = torch.compile(net, mode=None if cpu else "max-autotune") if mode == "compile" else net
    # On the CPU every configuration is fp32; on a GPU all but fp32 run under bf16 autocast.
    auto = torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode != "fp32" and not cpu)

    def train_step():
        t = torch.randint(0, 1000, (batch,), device=device)
        eps = torch.randn_like(x0)
        with auto:
            loss = F.mse_loss(run(x0 + eps, t).float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(net.parameters()), 1 - 0.9999)

    def sample_step():
        with torch.no_grad(), auto:
            run(x0, torch.full((batch,), 500, device=device))

    if cpu:
        train_ms = time_any(train_step, steps, 1, device)
        net.eval()
        return train_ms, time_any(sample_step, steps, 1, device), float("nan")
    torch.cuda.reset_peak_memory_stats()
    train_ms = time_cuda(train_step, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    net.eval()
    sample_ms = time_cuda(sample_step, steps)
    return train_ms, sample_ms, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a ddpm-cuda preset's network (random weights)")
    ap.add_argument("--batch", default="128,256")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--configs", help="default: fp32,bf16,compile on a GPU, fp32,channels_last on the CPU")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--ceilings-only", action="store_true", help="measure the two ceilings and stop")
    args = ap.parse_args()
    cpu = args.device == "cpu"
    if cpu:
        torch.set_num_threads(args.threads)
    configs = args.configs or ("fp32,channels_last" if cpu else "fp32,bf16,compile")
    for mode in configs.split(","):
        if cpu and mode not in CPU_CONFIGS:
            sys.exit(f"--configs: {mode!r} is not a CPU configuration (expected one of {', '.join(CPU_CONFIGS)})")
    name = torch.cuda.get_device_name() if not cpu else f"the CPU ({torch.get_num_threads()} threads)"
    print(f"torch {torch.__version__} on {name}")
    if not args.check_only:
        ceilings(args.device)
    if args.ceilings_only:
        return
    cfg, state = load(args.model) if args.model else (dict(PRESETS[args.preset or "ddpm-cifar10"]), None)
    net = UNet(cfg)
    if state is not None:
        net.load_state_dict(state)
    n = sum(p.numel() for p in net.parameters())
    print(f"peer network: {n} parameters ({'weights of ' + args.model if args.model else 'random weights'})")
    check_against_diffusers(net.to(args.device), cfg, args.device)
    if args.check_only:
        return
    print(f"{'config':<14} {'batch':>6} {'train ms':>10} {'train img/s':>12} {'sample ms':>10} "
          f"{'sample img/s (1000 steps)':>26} {'peak GiB':>9}")
    for mode in configs.split(","):
        for batch in [int(b) for b in args.batch.split(",")]:
            train_ms, sample_ms, peak = bench(cfg, state, batch, args.steps, mode, args.device)
            print(f"{mode:<14} {batch:>6} {train_ms:>10.2f} {batch / train_ms * 1e3:>12.1f} {sample_ms:>10.2f} "
                  f"{batch / sample_ms:>26.3f} {peak:>9.2f}")


if __name__ == "__main__":
    main()
