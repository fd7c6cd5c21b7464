# EDM teacher networks, safe checkpoint loading, the EDM sampler and EDM's augmentation, in one file.
#
# A from-scratch re-implementation of the networks of Karras et al. 2022, "Elucidating the Design Space
# of Diffusion-Based Generative Models" (EDM, github.com/NVlabs/edm), written from a description of the
# maths. Class, argument and parameter names follow EDM on purpose, so that the official EDM checkpoints
# (and SiD's, which share the format) load with strict=True and readers' knowledge of EDM transfers.
# Additions for SiD/SiDA (Zhou et al. 2024): `return_logits` / `encoder_only` expose the channel mean of
# the last encoder feature map, which SiDA uses as its discriminator.

import collections
import copy
import hashlib
import http.client
import io
import os
import pickle
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

#----------------------------------------------------------------------------
# Weight initialisation (EDM networks.py `weight_init`): fan-based uniform/normal scales.

def weight_init(shape, mode, fan_in, fan_out):
    if mode == 'xavier_uniform':
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'invalid init mode "{mode}"')

#----------------------------------------------------------------------------
# Fully connected layer. Parameters stay float32; they are cast to the activation dtype at use, which is
# how EDM's use_fp16 works (per-layer casting, no autocast).

class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x

#----------------------------------------------------------------------------
# 2D convolution with optional 2x up/down-sampling by a separable FIR filter. kernel=0 gives a pure
# resampler. With filter [1,1], down = 2x2 average pooling and up = nearest neighbour.

class Conv2d(torch.nn.Module):
    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=[1, 1], fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        assert not (up and down)
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = (f[:, None] * f[None, :])[None, None] / f.sum().square()  # (1, 1, K, K), sums to 1
        # Registered as None (absent from the state dict) unless resampling, exactly as in EDM.
        self.register_buffer('resample_filter', f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            return F.conv2d(x, w, b, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            # Used by NCSN++'s aux_residual path: conv first (with extra padding), then a strided blur.
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:  # x4 because the transposed conv spreads each pixel over 4 outputs
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:  # the bias inside the convolution: one kernel less, same sum (one rounding less)
                return F.conv2d(x, w, b, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x

#----------------------------------------------------------------------------
# Group normalisation with EDM's group count rule: min(32, C // 4) groups.

class GroupNorm(torch.nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps)

#----------------------------------------------------------------------------
# Self-attention softmax_k(q.k / sqrt(C_head)) v, always in float32 (EDM's AttentionOp keeps the logits and
# softmax in float32). One fused scaled_dot_product_attention call (default scale 1/sqrt(C_head)) replaces
# EDM's einsum-softmax-einsum: same formula, no HW x HW weight matrix kept for backward, and the product
# with v in float32 too (EDM rounds the weights to the activation dtype first). On CUDA the float32 call runs
# the memory-efficient kernel, whose products are 3xTF32 (float32 accuracy even with TF32 off). Autocast is
# switched off here so that bf16 autocast does not silently run the logits in low precision.

def attention(qkv, heads):
    """qkv: (B, 3C, H, W) in EDM's interleaved layout (channel (head*C/heads + c)*3 + j holds q/k/v for j = 0/1/2)
    -> (B, C, H, W) in qkv's dtype and memory format (NCHW or channels_last)."""
    B, C3, H, W = qkv.shape
    C, N = C3 // 3, B * heads
    device_type = 'cpu' if qkv.device.type == 'meta' else qkv.device.type  # autocast has no 'meta' (shape-only runs)
    with torch.autocast(device_type=device_type, enabled=False):
        # (3, N, HW, C_head), contiguous in C_head as the fused kernels want it: one copy (+ cast) of qkv
        q, k, v = qkv.reshape(N, C // heads, 3, H * W).permute(2, 0, 3, 1).to(torch.float32).contiguous().unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # (N, HW, C_head)
    # back to (B, C, H, W): a view when heads == 1 (it is NHWC memory), then the layout of qkv
    a = a.to(qkv.dtype).reshape(B, heads, H, W, C // heads).permute(0, 1, 4, 2, 3).reshape(B, C, H, W)
    cl = qkv.is_contiguous(memory_format=torch.channels_last) and not qkv.is_contiguous()
    return a.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)

#----------------------------------------------------------------------------
# U-Net residual block with optional self-attention (EDM UNetBlock): GN-SiLU-conv, embedding injection
# (additive, or scale/shift when adaptive_scale), dropout, conv, skip; then an attention sub-block.

class UNetBlock(torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5,
                 resample_filter=[1, 1], resample_proj=False, adaptive_scale=True,
                 init=dict(), init_zero=dict(init_weight=0), init_attn=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            # A 1x1 projection when channels change (or resample_proj), else a weightless resampler.
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)  # (B, C or 2C, 1, 1)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            a = attention(self.qkv(self.norm2(x)), self.num_heads)  # EDM's interleaved q/k/v channel layout
            x = (self.proj(a) + x) * self.skip_scale
        return x

#----------------------------------------------------------------------------
# Timestep embeddings: sinusoidal (DDPM++/ADM; `endpoint` changes the frequency spacing) and random
# Fourier features (NCSN++; the frequencies are a buffer and must come from the checkpoint).

class PositionalEmbedding(torch.nn.Module):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        freqs = torch.arange(start=0, end=self.num_channels // 2, dtype=torch.float32, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)  # (B, C)


class FourierEmbedding(torch.nn.Module):
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)  # (B, C)

#----------------------------------------------------------------------------
# DDPM++ / NCSN++ U-Net of Song et al. 2021 as re-parameterised by EDM (SongUNet). Returns the output of
# the last aux_conv. With return_logits/encoder_only it also/only returns the SiDA logit map: the channel
# mean of the last encoder block's output, (B, 1, 8, 8) for the official configs.

class SongUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type='positional',
                 channel_mult_noise=1, encoder_type='standard', decoder_type='standard', resample_filter=[1, 1]):
        if embedding_type not in ('fourier', 'positional'):
            raise ValueError(f'invalid embedding_type "{embedding_type}"')
        if encoder_type not in ('standard', 'skip', 'residual'):
            raise ValueError(f'invalid encoder_type "{encoder_type}"')
        if decoder_type not in ('standard', 'skip'):
            raise ValueError(f'invalid decoder_type "{decoder_type}"')
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)  # tiny, not exactly zero
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
                            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise level (+ class label + augmentation label) -> embedding.
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == 'positional'
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder; names '{res}x{res}_{kind}' are the state-dict names of the official checkpoints.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, kernel=3, down=True, resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder; attention only in the last block of a level (unlike ADM).
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None, return_logits=False, encoder_only=False):
        # Mapping. EDM swaps the embedding halves to [sin, cos] and scales one-hot labels by sqrt(label_dim).
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                tmp = tmp * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(tmp.dtype)
            emb = emb + self.map_label(tmp * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))  # (B, emb_channels)

        # Encoder. `aux` carries the NCSN++ input pyramid ('skip'/'residual' encoders).
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        logits = x.mean(dim=1, keepdim=True)  # (B, 1, 8, 8): SiDA discriminator logits
        if encoder_only:
            return logits

        # Decoder. A block whose input width differs from x takes the next skip; the output is `aux`.
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return (aux, logits) if return_logits else aux

#----------------------------------------------------------------------------
# ADM U-Net of Dhariwal & Nichol 2021 as re-implemented by EDM (DhariwalUNet): scale/shift conditioning,
# 64 channels per attention head, bias-free class embedding added after map_layer1.

class DhariwalUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping network.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal', init_weight=np.sqrt(label_dim))
                          if label_dim else None)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None, return_logits=False, encoder_only=False):
        # Mapping; labels are raw one-hot and enter after map_layer1.
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                tmp = tmp * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(tmp.dtype)
            emb = emb + self.map_label(tmp)
        emb = F.silu(emb)  # (B, emb_channels)

        # Encoder; every output is a skip.
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        logits = x.mean(dim=1, keepdim=True)  # (B, 1, 8, 8): SiDA discriminator logits
        if encoder_only:
            return logits

        # Decoder.
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        x = self.out_conv(F.silu(self.out_norm(x)))
        return (x, logits) if return_logits else x

#----------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022, Table 1 / Eq. 7):
#   D(x; sigma) = c_skip x + c_out F(c_in x; c_noise),  c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2),
#   c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4.
# Inputs and outputs are float32; with use_fp16 (on CUDA only, as in EDM) the U-Net body runs in fp16.

class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float('inf'),
                 sigma_data=0.5, model_type='DhariwalUNet', **model_kwargs):
        super().__init__()
        if model_type not in _MODEL_TYPES:
            raise ValueError(f'unknown model_type "{model_type}" (expected one of {sorted(_MODEL_TYPES)})')
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        # Everything needed to rebuild this net; saved next to our own checkpoints ('net_kwargs').
        self.init_kwargs = copy.deepcopy(dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                              use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max,
                                              sigma_data=sigma_data, model_type=model_type, **model_kwargs))
        self.model = _MODEL_TYPES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                              out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, augment_labels=None, force_fp32=False, return_logits=False, encoder_only=False):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)  # scalar sigma broadcasts
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4

        out = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels, augment_labels=augment_labels,
                         return_logits=return_logits, encoder_only=encoder_only)
        if encoder_only:
            return out.to(torch.float32)
        F_x, logits = out if return_logits else (out, None)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)  # (B, C, H, W) float32
        return (D_x, logits.to(torch.float32)) if return_logits else D_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


_MODEL_TYPES = dict(SongUNet=SongUNet, DhariwalUNet=DhariwalUNet)

#----------------------------------------------------------------------------
# Regional compilation: torch.compile each UNetBlock instead of the whole network. All blocks share one
# compiled function (nn.Module.compile wraps the block's call), so blocks of the same configuration, input
# shape and mode reuse its compiled code and the warm-up compiles a few dozen small graphs instead of one
# huge one. Parameter names stay as they are (no `_orig_mod.`), so state dicts and checkpoints are unchanged.

def compile_blocks(net, **compile_kwargs):
    """Compile every UNetBlock of `net` in place and return `net`. dynamic=False: each resolution (and batch
    size) gets its own static-shape kernels rather than one slower dynamic-shape graph for all of them. Works in
    train/eval, under no_grad, with frozen weights and input gradients, channels_last and autocast: each such
    mode is a guard, and the recompile limits are raised to cover all of them (CIFAR-10 DDPM++: 14 block kinds
    x 3 modes per micro-batch size: eval under no_grad, train with weight gradients, frozen with input gradients)."""
    import torch._dynamo
    for name, value in (('recompile_limit', 512), ('cache_size_limit', 512), ('accumulated_recompile_limit', 4096),
                        ('accumulated_cache_size_limit', 4096)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), value))
    for block in net.modules():
        if isinstance(block, UNetBlock):
            block.compile(**{'dynamic': False, **compile_kwargs})
    return net

#----------------------------------------------------------------------------
# The five official EDM teachers used by SiD (EDM train.py presets; FIDs are EDM's, sampler in brackets).

_EDM_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-{}.pkl'
_DDPMPP = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
               channel_mult_noise=1, resample_filter=[1, 1], model_channels=128)
PRESETS = {
    'cifar10-32x32-uncond-vp': dict(  # FID 1.97 (18 steps, NFE 35)
        url=_EDM_URL.format('cifar10-32x32-uncond-vp'),
        kwargs=dict(img_resolution=32, img_channels=3, label_dim=0, use_fp16=False, **_DDPMPP,
                    channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13)),
    'cifar10-32x32-cond-vp': dict(  # FID 1.79 (18 steps, NFE 35)
        url=_EDM_URL.format('cifar10-32x32-cond-vp'),
        kwargs=dict(img_resolution=32, img_channels=3, label_dim=10, use_fp16=False, **_DDPMPP,
                    channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13)),
    'ffhq-64x64-uncond-vp': dict(  # FID 2.39 (40 steps, NFE 79)
        url=_EDM_URL.format('ffhq-64x64-uncond-vp'),
        kwargs=dict(img_resolution=64, img_channels=3, label_dim=0, use_fp16=False, **_DDPMPP,
                    channel_mult=[1, 2, 2, 2], augment_dim=9, dropout=0.05)),
    'afhqv2-64x64-uncond-vp': dict(  # FID 1.96 (40 steps, NFE 79)
        url=_EDM_URL.format('afhqv2-64x64-uncond-vp'),
        kwargs=dict(img_resolution=64, img_channels=3, label_dim=0, use_fp16=False, **_DDPMPP,
                    channel_mult=[1, 2, 2, 2], augment_dim=9, dropout=0.25)),
    'imagenet-64x64-cond-adm': dict(  # FID 1.36 (256 steps, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003; NFE 511)
        url=_EDM_URL.format('imagenet-64x64-cond-adm'),
        kwargs=dict(img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True, model_type='DhariwalUNet',
                    model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.10)),
}


def build_preset(name, **overrides):
    """EDMPrecond for an official teacher config, with keyword overrides (e.g. dropout, use_fp16, model_channels)."""
    if name not in PRESETS:
        raise ValueError(f'unknown preset "{name}" (expected one of {", ".join(PRESETS)})')
    return EDMPrecond(**{**copy.deepcopy(PRESETS[name]['kwargs']), **overrides})

#----------------------------------------------------------------------------
# Download with a cache: a temporary file in the cache dir, renamed only when complete (urllib only).

def download(url_or_path, cache_dir=None):
    """Local path of a file; URLs are fetched once into $SID_CACHE (default ~/.cache/sid)."""
    src = str(url_or_path)
    if '://' not in src:
        if not os.path.isfile(src):
            raise FileNotFoundError(f'no such file: {src}')
        return url_or_path
    cache_dir = cache_dir or os.environ.get('SID_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'sid')
    name = os.path.basename(urllib.parse.urlparse(src).path) or hashlib.sha1(src.encode()).hexdigest()
    path = os.path.join(cache_dir, name)
    if os.path.isfile(path):
        return path
    tmp = None
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=name + '.', suffix='.tmp')
        with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(src, timeout=60) as resp:
            total = resp.headers.get('Content-Length')
            total = int(total) if total else None
            done = 0
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                print(f'\rdownloading {src}: {done / 2**20:.1f}' + (f'/{total / 2**20:.1f}' if total else '') + ' MiB',
                      end='', file=sys.stderr, flush=True)
            print(file=sys.stderr)
        if total is not None and done != total:
            raise OSError(f'truncated download, got {done} of {total} bytes')
        os.replace(tmp, path)
        tmp = None
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise RuntimeError(f'could not download {src} ({e}); fetch it by hand to {path} '
                           f'(or pass --teacher PATH)') from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path

#----------------------------------------------------------------------------
# Safe reader for EDM/SiD `.pkl` checkpoints (pickled torch_utils.persistence objects). Only an exact
# allow-list of data rebuilders is resolvable; persistent objects become inert records, and their embedded
# `module_src` is hashed, never executed. Then the module tree is flattened into a state dict.

try:
    from numpy._core import multiarray as _np_multiarray  # numpy >= 2
except ImportError:  # pragma: no cover
    from numpy.core import multiarray as _np_multiarray


class _InertModule:
    """Stand-in for torch container modules (ModuleDict etc.) in the pickle: keeps their state, runs nothing."""
    def __setstate__(self, state):
        self.state = state


class _EasyDict(dict):
    pass


def _inert_persistent_obj(meta):
    # Replaces torch_utils.persistence._reconstruct_persistent_obj, which would exec meta['module_src'].
    if not isinstance(meta, dict) or meta.get('type') != 'class':
        raise RuntimeError('unexpected persistent object record in the pickle')
    if meta.get('version') != 6:
        print(f'warning: persistence format version {meta.get("version")} (expected 6)', file=sys.stderr)
    state = meta.get('state') or {}
    src = meta.get('module_src') or ''
    return dict(class_name=meta.get('class_name'), init_kwargs=state.get('_init_kwargs', {}), state=state,
                module_src_sha1=hashlib.sha1(src.encode()).hexdigest())


def _load_storage_bytes(b):  # torch.storage._load_from_bytes, restricted to tensor data
    return torch.load(io.BytesIO(b), weights_only=True, map_location='cpu')


_SAFE_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): torch._utils._rebuild_parameter_with_state,
    ('torch.storage', '_load_from_bytes'): _load_storage_bytes,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch.nn.modules.container', 'ModuleDict'): _InertModule,
    ('torch.nn.modules.container', 'ModuleList'): _InertModule,
    ('torch.nn.modules.container', 'Sequential'): _InertModule,
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _inert_persistent_obj,
    ('dnnlib.util', 'EasyDict'): _EasyDict,
    ('builtins', 'set'): set,  # sets in protocol < 4 pickles
    ('numpy', 'dtype'): np.dtype,
    ('numpy', 'ndarray'): np.ndarray,
}
for _mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):  # numpy 1.x and 2.x spellings
    _SAFE_GLOBALS[(_mod, 'scalar')] = _np_multiarray.scalar
    _SAFE_GLOBALS[(_mod, '_reconstruct')] = _np_multiarray._reconstruct


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise RuntimeError(f'refusing to load global {module}.{name} from the pickle (not a tensor/numpy/EDM '
                               f'persistence type; the file may be unsafe or from an unsupported version)')
        return _SAFE_GLOBALS[(module, name)]


def _flatten_state(rec, prefix='', out=None):
    """module.state_dict() equivalent of a pickled module tree (records / _InertModule)."""
    out = {} if out is None else out
    state = rec['state'] if isinstance(rec, dict) else getattr(rec, 'state', {})
    skip = set(state.get('_non_persistent_buffers_set', ()))
    for group in ('_parameters', '_buffers'):
        for name, t in (state.get(group) or {}).items():
            if t is not None and not (group == '_buffers' and name in skip):
                if not isinstance(t, torch.Tensor):
                    raise RuntimeError(f'checkpoint entry {prefix}{name} is not a tensor')
                out[prefix + name] = t.detach()
    for name, child in (state.get('_modules') or {}).items():
        if child is not None:
            _flatten_state(child, f'{prefix}{name}.', out)
    return out


def _build_and_load(kwargs, state_dict, source):
    kwargs = dict(kwargs)
    class_name = str(kwargs.pop('class_name', 'EDMPrecond'))
    if class_name.rsplit('.', 1)[-1] != 'EDMPrecond':
        raise RuntimeError(f'{source}: unsupported network class "{class_name}" (only EDMPrecond)')
    try:
        net = EDMPrecond(**kwargs)
    except (TypeError, ValueError) as e:
        raise RuntimeError(f'{source}: cannot build the network from its stored kwargs ({e})') from None
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        ours = set(net.state_dict())
        missing, unexpected = sorted(ours - set(state_dict)), sorted(set(state_dict) - ours)
        detail = f'missing keys {missing[:5]}, unexpected keys {unexpected[:5]}' if missing or unexpected else str(e).splitlines()[-1]
        raise RuntimeError(f'{source}: weights do not match the network built from its kwargs: {detail}') from None
    return net.eval().requires_grad_(False)


def load_edm_pickle(path_or_url):
    """Eval-mode EDMPrecond with the `ema` weights of an EDM/SiD .pkl, or of our torch.save'd checkpoints
    ({'ema' or 'G_ema': state_dict, 'net_kwargs': dict}). Accepts a path, a URL or a PRESETS name."""
    if path_or_url in PRESETS:
        path_or_url = PRESETS[path_or_url]['url']
    path = download(path_or_url)
    if zipfile.is_zipfile(path):  # torch.save format: only tensors and plain containers are allowed
        try:
            data = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            raise RuntimeError(f'{path}: cannot read checkpoint safely ({str(e).splitlines()[0]})') from None
        key = next((k for k in ('ema', 'G_ema') if isinstance(data, dict) and k in data), None)
        if key is None or 'net_kwargs' not in data:
            raise RuntimeError(f'{path}: expected keys "ema" or "G_ema" and "net_kwargs", found {list(data)[:10] if isinstance(data, dict) else type(data).__name__}')
        net = _build_and_load(data['net_kwargs'], data[key], path)
        return net
    with open(path, 'rb') as f:
        try:
            data = _SafeUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise RuntimeError(f'{path}: not a readable EDM pickle ({e})') from None
    if not isinstance(data, dict) or 'ema' not in data:
        raise RuntimeError(f'{path}: no "ema" network in the checkpoint (found {list(data)[:10] if isinstance(data, dict) else type(data).__name__})')
    rec = data['ema']
    if not isinstance(rec, dict) or 'state' not in rec:
        raise RuntimeError(f'{path}: "ema" is not a persistent network record')
    state = rec['state']
    if state.get('_init_args'):
        raise RuntimeError(f'{path}: positional constructor arguments are not supported')
    net = _build_and_load(dict(state.get('_init_kwargs', {}), class_name=rec['class_name']), _flatten_state(rec), path)
    for attr in ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_min', 'sigma_max', 'sigma_data'):
        if attr in state and state[attr] != getattr(net, attr):
            raise RuntimeError(f'{path}: {attr}={state[attr]} in the pickle but {getattr(net, attr)} after rebuilding')
    net.checkpoint_info = dict(path=str(path), class_name=rec['class_name'], module_src_sha1=rec['module_src_sha1'])
    return net

#----------------------------------------------------------------------------
# EDM sampler: Heun's 2nd-order method with optional churn, Algorithm 2 of Karras et al. 2022.
# Time steps t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, t_N = 0; float64 throughout;
# the last step is plain Euler, so N steps cost 2N-1 network evaluations.

@torch.no_grad()
def edm_sampler(net, latents, class_labels=None, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
                S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, randn_like=torch.randn_like):
    if num_steps < 2:
        raise ValueError('edm_sampler needs num_steps >= 2')
    sigma_min = max(sigma_min, getattr(net, 'sigma_min', 0))
    sigma_max = min(sigma_max, getattr(net, 'sigma_max', float('inf')))
    i = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # (N+1,)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Churn: raise the noise level to t_hat by adding fresh noise (always drawn, as in EDM, to keep RNG streams).
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        # Euler step along the probability-flow ODE dx/dt = (x - D(x; t)) / t.
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:  # Heun correction (skipped at t_next = 0)
            d_prime = (x_next - net(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

#----------------------------------------------------------------------------
# EDM's non-leaky augmentation (Karras et al. 2022 App. B.6, after StyleGAN2-ADA), geometric part only, as
# configured by SiD/EDM: xflip, yflip, isotropic scale, rotation, anisotropic scale, fractional translation.
# Each enabled transform appends its parameters to the labels (1+1+1+2+2+2 = 9 columns for SiD's config),
# which the network is conditioned on. Sub-pixel warps use 2x oversampling with the sym6 wavelet filter.

_SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
         0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
         -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148]


def _rot(theta):  # 2D rotation matrices (N, 3, 3) in pixel coordinates (x right, y down)
    c, s, z, o = theta.cos(), theta.sin(), torch.zeros_like(theta), torch.ones_like(theta)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=-1).reshape(-1, 3, 3)


def _scale(sx, sy):
    z, o = torch.zeros_like(sx), torch.ones_like(sx)
    return torch.stack([sx, z, z, z, sy, z, z, z, o], dim=-1).reshape(-1, 3, 3)


def _translate(tx, ty):
    z, o = torch.zeros_like(tx), torch.ones_like(tx)
    return torch.stack([o, z, tx, z, o, ty, z, z, o], dim=-1).reshape(-1, 3, 3)


_FILTERS = {}  # (device, dtype) -> sym6 taps: made once per device, so later calls copy nothing host -> device


def _sym6(device, dtype):
    key = (str(device), dtype)
    if key not in _FILTERS:
        _FILTERS[key] = torch.tensor(_SYM6, dtype=dtype).to(device)
    return _FILTERS[key]


def _pow2(n):  # smallest power of two >= n
    return 1 << max(n - 1, 0).bit_length()


def warp_images(images, G_inv):
    """out(p) = in(G_inv p), p in pixel coordinates centred on the image; reflect padding outside.
    Band-limited: upsample 2x (sym6 synthesis), bilinear sample, downsample 2x (sym6 analysis).
    Free of host syncs: the reflect padding is the largest reflection allows (W-1, H-1 on every side), a bound
    fixed by the image size. EDM pads only as far as the warped footprint (+6 px of filter support) reaches,
    read back from the GPU, capped at the same bound; inside that footprint both paddings hold the same
    pixels, so the output is the same up to float rounding, and beyond the cap both sample zeros."""
    N, C, H, W = images.shape
    dev, L = images.device, len(_SYM6)
    h = _sym6(dev, images.dtype)
    cx, cy = (W - 1) / 2, (H - 1) / 2
    mx0 = mx1 = W - 1
    my0 = my1 = H - 1
    x = F.pad(images, [mx0, mx1, my0, my1], mode='reflect')
    # Upsample: U[k] = sum_i P[i] h[k - 2i]; sample k sits at padded pixel coordinate (k - 5.5) / 2.
    x = F.conv_transpose2d(x, h.reshape(1, 1, 1, L).tile([C, 1, 1, 1]), stride=(1, 2), groups=C)
    x = F.conv_transpose2d(x, h.reshape(1, 1, L, 1).tile([C, 1, 1, 1]), stride=(2, 1), groups=C)
    # Zeros after the last row/column (never sampled) make size - 1 a power of two, so grid_sample's coordinate
    # normalisation k / (size - 1) * 2 - 1 and its inverse round by less than 1e-5 px even on this larger canvas.
    x = F.pad(x, [0, _pow2(x.shape[3] - 1) + 1 - x.shape[3], 0, _pow2(x.shape[2] - 1) + 1 - x.shape[2]])
    # Sample the warped image on a 2x grid covering the output plus filter support: S[k] at (k - 5.5) / 2.
    ux = (torch.arange(2 * W + L - 2, device=dev, dtype=torch.float32) - (L - 1) / 2) / 2 - cx
    uy = (torch.arange(2 * H + L - 2, device=dev, dtype=torch.float32) - (L - 1) / 2) / 2 - cy
    G = G_inv.to(torch.float32)[:, :2, :, None, None]  # (N, 2, 3, 1, 1)
    src = G[:, :, 0] * ux[None, None, None, :] + G[:, :, 1] * uy[None, None, :, None] + G[:, :, 2]  # (N, 2, Hs, Ws)
    kx = 2 * (src[:, 0] + cx + mx0) + (L - 1) / 2  # index into the upsampled image
    ky = 2 * (src[:, 1] + cy + my0) + (L - 1) / 2
    grid = torch.stack([kx / (x.shape[3] - 1) * 2 - 1, ky / (x.shape[2] - 1) * 2 - 1], dim=-1)  # (N, Hs, Ws, 2)
    x = F.grid_sample(x, grid.to(x.dtype), mode='bilinear', padding_mode='zeros', align_corners=True)
    # Downsample: D[j] = sum_t h[t] S[2j + t], centred on output pixel j (exact inverse of the upsampling).
    x = F.conv2d(x, h.reshape(1, 1, 1, L).tile([C, 1, 1, 1]), stride=(1, 2), groups=C)
    x = F.conv2d(x, h.reshape(1, 1, L, 1).tile([C, 1, 1, 1]), stride=(2, 1), groups=C)
    return x  # (N, C, H, W)


class AugmentPipe:
    def __init__(self, p=1, xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0, scale_std=0.2,
                 rotate_frac_max=1, aniso_std=0.2, aniso_rotate_prob=0.5, translate_frac_std=0.125):
        self.p = float(p)                                  # overall probability multiplier
        self.xflip, self.yflip = float(xflip), float(yflip)  # per-transform multipliers (SiD: xflip=1e8 -> always a coin flip)
        self.scale, self.rotate_frac = float(scale), float(rotate_frac)
        self.aniso, self.translate_frac = float(aniso), float(translate_frac)
        self.scale_std = float(scale_std)                  # log2 std of isotropic scaling
        self.rotate_frac_max = float(rotate_frac_max)      # rotation range, 1 = full circle
        self.aniso_std = float(aniso_std)                  # log2 std of anisotropic scaling
        self.aniso_rotate_prob = float(aniso_rotate_prob)  # probability that aniso acts in a rotated frame
        self.translate_frac_std = float(translate_frac_std)  # translation std relative to image size

    def __call__(self, images):
        N, C, H, W = images.shape
        dev = images.device
        labels = [torch.zeros([N, 0], device=dev)]

        def gate(multiplier, w, shape):  # keep w with probability multiplier * p, else 0 (the identity)
            return torch.where(torch.rand(shape, device=dev) < multiplier * self.p, w, torch.zeros_like(w))

        # Flips are exact pixel operations.
        if self.xflip > 0:
            w = gate(self.xflip, torch.randint(2, [N, 1, 1, 1], device=dev), [N, 1, 1, 1])
            images = torch.where(w == 1, images.flip(3), images)
            labels.append(w)
        if self.yflip > 0:
            w = gate(self.yflip, torch.randint(2, [N, 1, 1, 1], device=dev), [N, 1, 1, 1])
            images = torch.where(w == 1, images.flip(2), images)
            labels.append(w)

        # Geometric transforms compose into one inverse matrix G_inv (output -> input coordinates); the
        # forward map applies scale, then rotation, then anisotropic scale, then translation.
        I_3 = torch.eye(3, device=dev).expand(N, 3, 3)
        G_inv = I_3
        moved = torch.zeros([N], dtype=torch.bool, device=dev)  # rows where some transform fired
        if self.scale > 0:
            w = gate(self.scale, torch.randn([N], device=dev), [N])
            s = w.mul(self.scale_std).exp2()
            G_inv = G_inv @ _scale(1 / s, 1 / s)
            moved |= w != 0
            labels.append(w)
        if self.rotate_frac > 0:
            w = gate(self.rotate_frac, (torch.rand([N], device=dev) * 2 - 1) * (np.pi * self.rotate_frac_max), [N])
            G_inv = G_inv @ _rot(w)  # inverse of a rotation by -w
            moved |= w != 0
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = torch.randn([N], device=dev)
            r = (torch.rand([N], device=dev) * 2 - 1) * np.pi
            w = gate(self.aniso, w, [N])
            r = torch.where(torch.rand([N], device=dev) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = w.mul(self.aniso_std).exp2()
            G_inv = G_inv @ _rot(-r) @ _scale(1 / s, s) @ _rot(r)  # the identity, up to rounding, when w = 0
            moved |= w != 0
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = gate(self.translate_frac, torch.randn([2, N], device=dev), [1, N])
            G_inv = G_inv @ _translate(-w[0] * W * self.translate_frac_std, -w[1] * H * self.translate_frac_std)
            moved |= (w != 0).any(dim=0)
            labels += [w[0], w[1]]
        if G_inv is not I_3:  # some geometric transform is enabled; rows where none fired stay bit-exact,
            # chosen per row on the device (a whole-batch test would make the host wait for the GPU)
            images = torch.where(moved.reshape(N, 1, 1, 1), warp_images(images, G_inv), images)

        labels = torch.cat([t.to(torch.float32).reshape(N, -1) for t in labels], dim=1)  # (N, 9) for SiD's config
        return images, labels

#----------------------------------------------------------------------------
