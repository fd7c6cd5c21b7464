# EDM teacher networks, all file I/O of sid (atomic writes, images, downloads, datasets, bounded checkpoint
# loading), the EDM sampler and EDM's augmentation, in one file.
#
# A from-scratch re-implementation of the networks of Karras et al. 2022, "Elucidating the Design Space
# of Diffusion-Based Generative Models" (EDM, github.com/NVlabs/edm), written from a description of the
# maths. Class, argument and parameter names follow EDM on purpose, so that the official EDM checkpoints
# (and SiD's, which share the format) load with strict=True and readers' knowledge of EDM transfers.
# Additions for SiD/SiDA (Zhou et al. 2024): `return_logits` / `encoder_only` expose the channel mean of
# the last encoder feature map, which SiDA uses as its discriminator.

import _compat_pickle
import collections
import contextlib
import copy
import hashlib
import http.client
import io
import json
import math
import os
import pathlib
import pickle
import re
import secrets
import struct
import sys
import tarfile
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib

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
    # fp32 as EDM; a half-precision body on a GPU keeps its dtype: the fused kernels still take the softmax in fp32
    dtype = qkv.dtype if qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16) else torch.float32
    with torch.autocast(device_type=device_type, enabled=False):
        # (3, N, HW, C_head), contiguous in C_head as the fused kernels want it: one copy (+ cast) of qkv
        q, k, v = qkv.reshape(N, C // heads, 3, H * W).permute(2, 0, 3, 1).to(dtype).contiguous().unbind(0)
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

        self.dec = self.decoder(cout, skips, img_resolution, out_channels, model_channels, channel_mult, num_blocks,
                                attn_resolutions, decoder_type, resample_filter, block_kwargs)

    @staticmethod
    def decoder(cout, skips, img_resolution, out_channels, model_channels, channel_mult, num_blocks, attn_resolutions,
                decoder_type, resample_filter, block_kwargs):
        """The decoder, mirroring the encoder (skips: its outputs' channels); attention only in the last block of a
        level (unlike ADM)."""
        dec, init_zero = torch.nn.ModuleDict(), block_kwargs['init_zero']
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)
                dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter)
                dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)
        return dec

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
        self.img_shape = [img_channels, img_resolution, img_resolution] if img_resolution else [img_channels]  # points: [C]
        # Everything needed to rebuild this net; saved next to our own checkpoints ('net_kwargs').
        self.init_kwargs = copy.deepcopy(dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                              use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max,
                                              sigma_data=sigma_data, model_type=model_type, **model_kwargs))
        self.model = _MODEL_TYPES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                              out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, augment_labels=None, force_fp32=False, return_logits=False, encoder_only=False):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, *[1] * (x.dim() - 1))  # scalar broadcasts
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


#----------------------------------------------------------------------------
# The 2-D toy's body (sid's toy.py): an MLP on c_in*x and a sinusoidal embedding of c_noise. Inside EDMPrecond it is
# the toy's G and f_psi with the same preconditioning as the image nets; its first layers play SiDA's encoder.

class ToyMLP(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, hidden=128, depth=3, dropout=0.0):
        super().__init__()
        nn = torch.nn
        self.enc = nn.Sequential(nn.Linear(in_channels + 16, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        layers = []
        for _ in range(depth - 2):
            layers += [nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.SiLU()]
        self.dec = nn.Sequential(*layers, nn.Linear(hidden, out_channels))
        self.register_buffer('freqs', torch.arange(1, 9, dtype=torch.float32))

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, return_logits=False, encoder_only=False):
        c_noise = noise_labels.reshape(-1, 1).expand(x.shape[0], 1)
        h = self.enc(torch.cat([x, (c_noise * self.freqs).sin(), (c_noise * self.freqs).cos()], 1))
        logits = h.mean(1, keepdim=True)  # (B, 1): channel mean of the encoder features, as SiDA's on the U-Nets
        if encoder_only:
            return logits
        return (self.dec(h), logits) if return_logits else self.dec(h)


_MODEL_TYPES = dict(SongUNet=SongUNet, DhariwalUNet=DhariwalUNet, ToyMLP=ToyMLP)


def checkpoint_blocks(net):
    """Gradient checkpointing: each UNetBlock of `net` keeps only its inputs and recomputes its activations in
    backward. Non-reentrant checkpointing gives input gradients (the teacher's and f_psi's in SiD's generator step)
    and works under DDP and torch.compile; preserve_rng_state replays the same dropout masks. Patches the instances
    in place: apply it after any deepcopy of `net` (a copy would call the original's blocks)."""
    from torch.utils.checkpoint import checkpoint
    for block in net.modules():
        if isinstance(block, UNetBlock):
            block.forward = lambda x, emb, fwd=block.forward: (
                checkpoint(fwd, x, emb, use_reentrant=False, preserve_rng_state=True) if torch.is_grad_enabled() else fwd(x, emb))
    return net

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
# Atomic writes: a uniquely named temporary file in the destination's folder, opened with O_EXCL|O_NOFOLLOW
# (a symlink planted at that name is never followed), fsync'ed and renamed; nothing is left on failure.

_TMP_PREFIX, _TMP_SUFFIX = '.', '.tmp'


@contextlib.contextmanager
def atomic_write(path):
    """Context manager yielding a binary file that replaces `path` only when the block ends without error."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, 'O_NOFOLLOW', 0) | getattr(os, 'O_BINARY', 0)
    for _ in range(100):
        tmp = os.path.join(folder, f'{_TMP_PREFIX}{name}.{secrets.token_hex(3)}{_TMP_SUFFIX}')
        try:
            fd = os.open(tmp, flags, 0o644)
            break
        except FileExistsError:  # a clash, or something planted: pick another name, never reuse it
            continue
    else:
        raise OSError(f'cannot create a temporary file next to {path}')
    try:
        with os.fdopen(fd, 'wb') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (not possible on every platform)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def remove_stale_temporaries(folder):
    """Delete leftovers `.NAME.XXXXXX.tmp` of atomic_write calls that were killed; returns their names."""
    pattern = re.compile(r'^\..+\.[0-9a-f]{6}\.tmp$')
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        p = os.path.join(folder, name)
        if pattern.match(name) and (os.path.islink(p) or os.path.isfile(p)):
            with contextlib.suppress(OSError):
                os.remove(p)
                removed.append(name)
    return removed

#----------------------------------------------------------------------------
# Images: the one PNG writer and the one image reader (bounded: decompression bombs are refused from the
# header, before any pixel is decoded).

MAX_IMAGE_PIXELS = 2 ** 26


def save_png(path, images, cols=None):
    """uint8 [C,H,W] -> one image, [N,C,H,W] -> a grid (cols = ceil(sqrt N)); C in {1, 3}; written atomically."""
    import PIL.Image
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).detach().cpu()
    if x.ndim == 3:
        x = x[None]
        cols = 1
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f'save_png expects uint8 [C,H,W] or [N,C,H,W] with C in (1, 3), got {x.dtype} {tuple(x.shape)}')
    n, ch, h, w = x.shape
    cols = int(cols or math.ceil(math.sqrt(n)))
    rows = (n + cols - 1) // cols
    grid = torch.zeros(rows * h, cols * w, ch, dtype=torch.uint8)
    for i, im in enumerate(x):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im.permute(1, 2, 0)
    arr = grid.numpy()
    with atomic_write(path) as f:
        PIL.Image.fromarray(arr[:, :, 0] if ch == 1 else arr).save(f, format='PNG')


def read_image(data_or_path, name=''):
    """Bytes or a path -> uint8 numpy [C,H,W]: grayscale -> C=1, anything else -> RGB (C=3)."""
    import PIL.Image
    name = name or (str(data_or_path) if not isinstance(data_or_path, (bytes, bytearray)) else '<bytes>')
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, (bytes, bytearray)) else data_or_path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', PIL.Image.DecompressionBombWarning)  # PIL's warning -> one-line error
            with PIL.Image.open(src) as im:
                w, h = im.size  # from the header: nothing decoded yet
                if w * h > MAX_IMAGE_PIXELS:
                    raise ValueError(f'{name}: image of {w}x{h} pixels exceeds the limit of {MAX_IMAGE_PIXELS} pixels')
                a = np.asarray(im if im.mode in ('L', 'RGB') else im.convert('L' if im.mode in ('1', 'LA') else 'RGB'))
    except ValueError as e:
        raise ValueError(str(e).splitlines()[0] if str(e).startswith(name) else f'{name}: {e}') from None
    except (OSError, SyntaxError, EOFError, PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning,
            zlib.error) as e:
        raise ValueError(f'{name}: unreadable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from None
    return np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))

#----------------------------------------------------------------------------
# Download with a cache keyed on the whole URL (so two URLs with one file name never collide); atomic,
# optionally checked against a sha256.

def download(url, cache_dir=None, sha256=None):
    """Local path of a file; URLs are fetched once into `cache_dir` or $SID_CACHE (default ~/.cache/sid)."""
    src = os.fspath(url) if not isinstance(url, str) else url
    if '://' not in src:
        if not os.path.isfile(src):
            raise FileNotFoundError(f'no such file: {src}')
        return src
    cache_dir = cache_dir or os.environ.get('SID_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'sid')
    base = re.sub(r'[^A-Za-z0-9._-]', '_', os.path.basename(urllib.parse.urlparse(src).path)) or 'download'
    path = os.path.join(cache_dir, f'{hashlib.sha256(src.encode()).hexdigest()[:16]}-{base}')
    if os.path.isfile(path):
        _check_sha256(path, sha256)
        return path
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_write(path) as f, urllib.request.urlopen(src, timeout=60) as resp:
            total = resp.headers.get('Content-Length')
            total, done, h = (int(total) if total else None), 0, hashlib.sha256()
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
                done += len(chunk)
                print(f'\rdownloading {src}: {done / 2**20:.1f}' + (f'/{total / 2**20:.1f}' if total else '') + ' MiB',
                      end='', file=sys.stderr, flush=True)
            print(file=sys.stderr)
            if total is not None and done != total:
                raise OSError(f'truncated download, got {done} of {total} bytes')
            if sha256 and h.hexdigest() != sha256.lower():
                raise OSError(f'sha256 mismatch: got {h.hexdigest()}, expected {sha256}')
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise RuntimeError(f'could not download {src} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); '
                           f'fetch it by hand to {path}') from None
    return path


def _check_sha256(path, sha256):
    if sha256:
        h = hashlib.sha256()
        with open(path, 'rb') as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != sha256.lower():
            raise RuntimeError(f'{path}: sha256 {h.hexdigest()} does not match the expected {sha256}; delete it to refetch')
#----------------------------------------------------------------------------
# One bounded unpickler for every pickle we read (EDM/SiD .pkl, the storages inside them, the data.pkl of
# torch.save files, the CIFAR-10 batches). Besides an exact allow-list of globals per use, it bounds the
# work a hostile file can cause: reads never exceed the file, dict keys and set elements are plain scalars
# (so no attacker-built object is ever hashed), numpy arrays are never object arrays and must match their
# bytes, tensor views must fit their storage, and the result's depth and tree size are capped.

MAX_DEPTH, MAX_CONTAINER, MAX_NODES = 64, 10 ** 6, 2 * 10 ** 6
_KEY_TYPES = (str, bytes, int, float, bool, type(None))
_Refused = pickle.UnpicklingError


class _BoundedReader:
    """File wrapper for the unpickler: a read larger than what is left is refused before any allocation."""
    def __init__(self, f):
        pos = f.tell()
        self.f, self.left = f, f.seek(0, 2) - pos
        f.seek(pos)

    def read(self, n=-1):
        if n is None or n < 0 or n > self.left:
            raise _Refused(f'the pickle claims {n} bytes but only {self.left} remain')
        b = self.f.read(n)
        self.left -= len(b)
        return b

    def readline(self):
        b = self.f.readline()
        self.left -= len(b)
        return b


def _check_keys(keys):
    for k in keys:
        if type(k) not in _KEY_TYPES:
            raise _Refused(f'refusing a {type(k).__name__} as a dict key or set element (only plain scalars)')


def _check_size(n):
    if n > MAX_CONTAINER:
        raise _Refused(f'a container of {n} items exceeds the limit of {MAX_CONTAINER}')


class _BoundedUnpickler(pickle._Unpickler):  # the pure-Python unpickler, so that opcodes can be overridden
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, f, allow, persistent=None, encoding='ASCII'):
        super().__init__(_BoundedReader(f), encoding=encoding)
        self.allow, self.persistent = allow, persistent

    def find_class(self, module, name):
        if self.proto < 3 and self.fix_imports:  # Python 2 spellings (__builtin__.set, ...), as pickle does
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in self.allow:
            raise _Refused(f'refusing to load global {module}.{name} (not on the allow-list for this file)')
        return self.allow[(module, name)]

    def persistent_load(self, pid):
        if self.persistent is None:
            raise _Refused('refusing a persistent id in this pickle')
        return self.persistent(pid)

    def _dict_items(self, d, items):
        if not isinstance(d, dict):
            raise _Refused(f'refusing to set items on a {type(d).__name__}')
        _check_keys(items[::2])
        _check_size(len(d) + len(items) // 2)
        for i in range(0, len(items) - 1, 2):
            d[items[i]] = items[i + 1]

    def load_dict(self):
        items = self.pop_mark()
        d = {}
        self._dict_items(d, items)
        self.append(d)

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._dict_items(self.stack[-1], [key, value])

    def load_setitems(self):
        items = self.pop_mark()
        self._dict_items(self.stack[-1], items)

    def load_additems(self):
        items = self.pop_mark()
        s = self.stack[-1]
        if not isinstance(s, set):
            raise _Refused(f'refusing to add items to a {type(s).__name__}')
        _check_keys(items)
        _check_size(len(s) + len(items))
        s.update(items)

    def load_frozenset(self):
        items = self.pop_mark()
        _check_keys(items)
        _check_size(len(items))
        self.append(frozenset(items))

    def load_appends(self):
        items = self.pop_mark()
        lst = self.stack[-1]
        if not isinstance(lst, list):
            raise _Refused(f'refusing to append to a {type(lst).__name__}')
        _check_size(len(lst) + len(items))
        lst.extend(items)

    def load_appends_one(self):
        value = self.stack.pop()
        lst = self.stack[-1]
        if not isinstance(lst, list):
            raise _Refused(f'refusing to append to a {type(lst).__name__}')
        _check_size(len(lst) + 1)
        lst.append(value)

    def load_build(self):
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.ndarray):
            _check_array_state(state)
        elif isinstance(inst, np.dtype):
            if not (isinstance(state, tuple) and len(state) == 8 and state[2:5] == (None, None, None)):
                raise _Refused('refusing a structured or sub-array numpy dtype')
        elif isinstance(inst, dict):  # OrderedDict state dicts carry `_metadata` as instance state
            if not isinstance(state, dict) and not (isinstance(state, tuple) and len(state) == 2 and state[1] is None):
                raise _Refused('refusing slot state on a dict')
        elif not isinstance(inst, _InertModule):
            raise _Refused(f'refusing to set the state of a {type(inst).__name__}')
        super().load_build()

    for _op, _fn in ((pickle.DICT, load_dict), (pickle.SETITEM, load_setitem), (pickle.SETITEMS, load_setitems),
                     (pickle.ADDITEMS, load_additems), (pickle.FROZENSET, load_frozenset),
                     (pickle.APPENDS, load_appends), (pickle.APPEND, load_appends_one), (pickle.BUILD, load_build)):
        dispatch[_op[0]] = _fn
    del _op, _fn


def _check_tree(obj):
    """Depth <= MAX_DEPTH and at most MAX_NODES nodes counted as a tree (shared sub-objects count each
    time), so that no later walk (repr, json, state-dict flattening) can blow up; cycles exceed the depth."""
    todo, count = [(obj, 0)], 0
    while todo:
        x, depth = todo.pop()
        count += 1
        if depth > MAX_DEPTH or count > MAX_NODES:
            raise _Refused(f'nesting deeper than {MAX_DEPTH} or more than {MAX_NODES} objects')
        if isinstance(x, dict):
            todo += [(v, depth + 1) for v in x.values()]
            if type(x) is not dict and getattr(x, '__dict__', None):
                todo.append((x.__dict__, depth + 1))
        elif isinstance(x, (list, tuple, set, frozenset)):
            todo += [(v, depth + 1) for v in x]
        elif isinstance(x, _InertModule):
            todo.append((x.state, depth + 1))


def bounded_unpickle(f, allow, source, persistent=None, encoding='ASCII'):
    """Unpickle one object from the binary file `f` with the allow-list `allow` {(module, name): callable};
    every refusal or malformation becomes one ValueError line naming `source`."""
    try:
        obj = _BoundedUnpickler(f, allow, persistent, encoding).load()
        _check_tree(obj)
        return obj
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            struct.error, MemoryError, RecursionError, OverflowError, RuntimeError, UnicodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f'{source}: unsafe or unreadable pickle ({msg})') from None

#----------------------------------------------------------------------------
# Safe stand-ins for the globals that the allowed pickles use (numpy arrays and dtypes, bytes, sets,
# ordered dicts, torch tensors and storages, EDM's persistence records).

try:
    from numpy._core import multiarray as _np_multiarray  # numpy >= 2
except ImportError:  # pragma: no cover
    from numpy.core import multiarray as _np_multiarray

_NDARRAY = object()  # numpy.ndarray is only a marker for _reconstruct: calling it would allocate any shape


def _check_array_state(state):
    ok = isinstance(state, tuple) and len(state) == 5 and isinstance(state[1], tuple) and len(state[1]) <= 32
    if ok:
        _, shape, dtype, _, raw = state
        ok = (isinstance(dtype, np.dtype) and not dtype.hasobject and dtype.names is None and dtype.subdtype is None
              and all(type(s) is int and s >= 0 for s in shape) and isinstance(raw, (bytes, str))
              and math.prod(shape) * dtype.itemsize == len(raw))
    if not ok:
        raise _Refused('refusing a numpy array whose dtype is object/structured or whose data does not match its shape')


def _np_reconstruct(subtype, shape, code):
    if subtype is not _NDARRAY or shape != (0,):
        raise _Refused('refusing numpy _reconstruct other than the empty placeholder array')
    return _np_multiarray._reconstruct(np.ndarray, (0,), b'b')


def _np_dtype(spec, align=False, copy=True):
    if not (isinstance(spec, str) and re.fullmatch(r'[biufc]\d{1,2}', spec)):
        raise _Refused(f'refusing numpy dtype {spec!r} (only plain numeric dtypes)')
    return np.dtype(spec, align=bool(align), copy=bool(copy))


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, str)) or len(data) != dtype.itemsize:
        raise _Refused('refusing a numpy scalar that is not a plain number')
    return _np_multiarray.scalar(dtype, data)


def _codecs_encode(s, encoding='utf-8'):  # bytes in protocol-2 pickles written by Python 3
    if not isinstance(s, str) or encoding not in ('latin1', 'latin-1', 'utf-8', 'utf8'):
        raise _Refused('refusing _codecs.encode other than text to bytes')
    return s.encode(encoding)


def _ordered_dict(*args):
    if args:
        raise _Refused('refusing OrderedDict built from arguments (items must come as plain dict items)')
    return collections.OrderedDict()


def _safe_set(items=()):
    items = list(items) if isinstance(items, (list, tuple)) else None
    if items is None:
        raise _Refused('refusing a set built from a non-list')
    _check_keys(items)
    _check_size(len(items))
    return set(items)


_NUMPY_GLOBALS = {('numpy', 'ndarray'): _NDARRAY, ('numpy', 'dtype'): _np_dtype, ('_codecs', 'encode'): _codecs_encode}
for _mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):  # numpy 1.x and 2.x spellings
    _NUMPY_GLOBALS[(_mod, 'scalar')] = _np_scalar
    _NUMPY_GLOBALS[(_mod, '_reconstruct')] = _np_reconstruct
CIFAR_GLOBALS = dict(_NUMPY_GLOBALS)

_STORAGE_DTYPES = dict(FloatStorage=torch.float32, DoubleStorage=torch.float64, HalfStorage=torch.float16,
                       BFloat16Storage=torch.bfloat16, LongStorage=torch.int64, IntStorage=torch.int32,
                       ShortStorage=torch.int16, CharStorage=torch.int8, ByteStorage=torch.uint8, BoolStorage=torch.bool)


class _StorageType:
    def __init__(self, dtype):
        self.dtype, self.itemsize = dtype, torch.empty(0, dtype=dtype).element_size()


_STORAGE_GLOBALS = {('torch', k): _StorageType(v) for k, v in _STORAGE_DTYPES.items()}


def _check_view(numel, offset, size, stride):
    """A tensor view (offset, size, stride) must lie inside a storage of `numel` elements."""
    ok = (type(offset) is int and offset >= 0 and isinstance(size, tuple) and isinstance(stride, tuple)
          and len(size) == len(stride) <= 16 and all(type(s) is int and s >= 0 for s in size + stride))
    if not ok:
        raise _Refused('refusing a tensor with a malformed offset/size/stride')
    if 0 not in size and offset + sum((s - 1) * st for s, st in zip(size, stride)) >= numel:
        raise _Refused(f'refusing a tensor view {list(size)} at offset {offset} that exceeds its storage of {numel} elements')


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, torch.storage.TypedStorage) or hooks or metadata:
        raise _Refused('refusing a tensor without plain storage or with hooks/metadata')
    _check_view(storage._size(), offset, size, stride)  # _size: the same, without the deprecation warning
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, bool(requires_grad), collections.OrderedDict())


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, torch.Tensor) or hooks or state:
        raise _Refused('refusing a parameter with hooks or extra state')
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def _legacy_storage(b):
    """torch.storage._load_from_bytes, re-done within bounds: the legacy torch.save stream of one storage
    (magic, protocol, sys info, the storage record, its keys, then per key int64 numel + raw bytes)."""
    if not isinstance(b, bytes):
        raise _Refused('refusing a storage that is not bytes')
    f, src = io.BytesIO(b), 'embedded storage'
    head = [bounded_unpickle(f, {}, src) for _ in range(3)]
    if head[0] != 0x1950a86a20f9469cfc6c or head[1] != 1001 or not isinstance(head[2], dict) or head[2].get('little_endian') is not True:
        raise _Refused('refusing an embedded storage that is not a little-endian legacy torch.save stream')
    pids = []
    def persistent(pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == 'storage' and isinstance(pid[1], _StorageType)
                and type(pid[4]) is int and pid[5] is None):
            raise _Refused('refusing a malformed storage record')
        pids.append(pid)
        return len(pids) - 1
    if bounded_unpickle(f, _STORAGE_GLOBALS, src, persistent) != 0 or len(pids) != 1:
        raise _Refused('refusing an embedded stream that is not exactly one storage')
    keys = bounded_unpickle(f, {}, src)
    _, stype, key, _, numel, _ = pids[0]
    n = struct.unpack('<q', f.read(8))[0] if keys == [key] else -1
    if n != numel or n < 0 or n * stype.itemsize != len(b) - f.tell():
        raise _Refused(f'refusing a storage that declares {numel} elements but holds {len(b) - f.tell()} bytes')
    data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
    return torch.storage.TypedStorage(wrap_storage=data.view(stype.dtype).untyped_storage() if n else
                                      torch.empty(0, dtype=stype.dtype).untyped_storage(), dtype=stype.dtype, _internal=True)
#----------------------------------------------------------------------------
# EDM/SiD `.pkl` records (pickled torch_utils.persistence objects): persistent objects become inert records,
# their embedded `module_src` is hashed, never executed; the module tree is then flattened to a state dict.

class _InertModule:
    """Stand-in for torch container modules (ModuleDict etc.) in the pickle: keeps their state, runs nothing."""
    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise _Refused('refusing a module state that is not a dict')
        self.state = state


class _EasyDict(dict):
    def __init__(self, *args, **kwargs):  # only NEWOBJ + dict items: arguments would hash arbitrary keys
        if args or kwargs:
            raise _Refused('refusing EasyDict built from arguments')


def _inert_persistent_obj(meta):
    # Replaces torch_utils.persistence._reconstruct_persistent_obj, which would exec meta['module_src'].
    if not isinstance(meta, dict) or meta.get('type') != 'class' or not isinstance(meta.get('state') or {}, dict):
        raise _Refused('unexpected persistent object record in the pickle')
    if meta.get('version') != 6:
        print(f'warning: persistence format version {meta.get("version")} (expected 6)', file=sys.stderr)
    state, src = meta.get('state') or {}, meta.get('module_src') or ''
    return dict(class_name=meta.get('class_name'), init_kwargs=state.get('_init_kwargs', {}), state=state,
                module_src_sha1=hashlib.sha1(str(src).encode()).hexdigest())


EDM_GLOBALS = {
    **_NUMPY_GLOBALS,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _legacy_storage,
    ('collections', 'OrderedDict'): _ordered_dict,
    ('torch.nn.modules.container', 'ModuleDict'): _InertModule,
    ('torch.nn.modules.container', 'ModuleList'): _InertModule,
    ('torch.nn.modules.container', 'Sequential'): _InertModule,
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _inert_persistent_obj,
    ('dnnlib.util', 'EasyDict'): _EasyDict,
    ('builtins', 'set'): _safe_set,  # sets in protocol < 4 pickles
}


def _flatten_state(rec, prefix='', out=None):
    """module.state_dict() equivalent of a pickled module tree (records / _InertModule)."""
    out = {} if out is None else out
    state = rec['state'] if isinstance(rec, dict) else getattr(rec, 'state', {})
    skip = set(state.get('_non_persistent_buffers_set', ()))
    for group in ('_parameters', '_buffers'):
        for name, t in (state.get(group) or {}).items():
            if t is not None and not (group == '_buffers' and name in skip):
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f'checkpoint entry {prefix}{name} is not a tensor')
                out[f'{prefix}{name}'] = t.detach()
    for name, child in (state.get('_modules') or {}).items():
        if child is not None:
            _flatten_state(child, f'{prefix}{name}.', out)
    return out

#----------------------------------------------------------------------------
# Network kwargs: checked per model_type (types and ranges) before anything is built; then the net is built
# on the meta device to compare every shape with the stored tensors and to count its parameters.

MAX_PARAMS = 2e9
_i = lambda lo, hi: lambda v: type(v) is int and lo <= v <= hi
_f = lambda lo, hi: lambda v: type(v) in (int, float) and lo <= v <= hi
_ints = lambda lo, hi, n: lambda v: isinstance(v, (list, tuple)) and len(v) <= n and all(_i(lo, hi)(x) for x in v)
_one_of = lambda *c: lambda v: isinstance(v, str) and v in c
_UNET_KWARGS = dict(augment_dim=_i(0, 64), model_channels=_i(1, 4096), channel_mult=_ints(1, 64, 8),
                    channel_mult_emb=_i(1, 64), num_blocks=_i(1, 64), attn_resolutions=_ints(1, 4096, 16),
                    dropout=_f(0, 1), label_dropout=_f(0, 1))
NET_KWARGS = {  # None: EDMPrecond's own arguments; then one table per model_type (extend here)
    None: dict(img_resolution=_i(0, 4096), img_channels=_i(1, 16), label_dim=_i(0, 100000),
               use_fp16=lambda v: type(v) is bool, sigma_min=_f(0, math.inf), sigma_max=_f(0, math.inf),
               sigma_data=_f(1e-9, 1e9), model_type=lambda v: v in NET_KWARGS and v is not None),
    'SongUNet': dict(_UNET_KWARGS, embedding_type=_one_of('positional', 'fourier'), channel_mult_noise=_i(1, 64),
                     encoder_type=_one_of('standard', 'skip', 'residual'), decoder_type=_one_of('standard', 'skip'),
                     resample_filter=_ints(1, 1 << 16, 8)),
    'DhariwalUNet': dict(_UNET_KWARGS),
    'ToyMLP': dict(hidden=_i(1, 1 << 16), depth=_i(1, 64), dropout=_f(0, 1)),
}


def check_net_kwargs(kwargs, source):
    """EDMPrecond kwargs from a file -> a plain dict, or one ValueError line naming the offending key."""
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f'{source}: network kwargs are not a dict of names')
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    table = dict(NET_KWARGS[None], **NET_KWARGS.get(kwargs.get('model_type', 'DhariwalUNet'), {}))
    for k, v in kwargs.items():
        if k not in table or not table[k](v):
            raise ValueError(f'{source}: network kwarg {k}={str(v)[:60]} is unknown or out of range')
    return kwargs


def parse_net_overrides(text, preset=None):
    """A JSON object of network kwargs (sid's --net-overrides), checked on top of the preset's network kwargs."""
    try:
        over = json.loads(text or '{}')
    except json.JSONDecodeError:
        over = None
    if not isinstance(over, dict):
        raise ValueError(f"--net-overrides must be a JSON object of network arguments, e.g. '{{\"model_channels\": 16}}'")
    check_net_kwargs(dict(PRESETS[preset]['kwargs'], **over) if preset in PRESETS else over, '--net-overrides')
    return over


def _build_checked(kwargs, state_dict, source):
    """An eval-mode frozen EDMPrecond with `state_dict`, built for real only after the meta-device check."""
    kwargs = check_net_kwargs(kwargs, source)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f'{source}: the weights are not a dict of tensors')
    try:
        with torch.device('meta'):
            meta = EDMPrecond(**kwargs)
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as e:
        raise ValueError(f'{source}: cannot build the network from its stored kwargs ({str(e).splitlines()[0]})') from None
    count = sum(p.numel() for p in meta.parameters())
    if count > MAX_PARAMS:
        raise ValueError(f'{source}: the stored kwargs describe {count:.3g} parameters (limit {MAX_PARAMS:.3g})')
    ours = meta.state_dict()
    missing, unexpected = sorted(set(ours) - set(state_dict)), sorted(set(state_dict) - set(ours))
    if missing or unexpected:
        raise ValueError(f'{source}: weights do not match the network built from its kwargs: '
                         f'missing keys {missing[:5]}, unexpected keys {unexpected[:5]}')
    for k, t in ours.items():
        if state_dict[k].shape != t.shape:
            raise ValueError(f'{source}: {k} has shape {list(state_dict[k].shape)}, the network needs {list(t.shape)}')
    net = EDMPrecond(**kwargs)
    net.load_state_dict(state_dict, strict=True)
    return net.eval().requires_grad_(False)

#----------------------------------------------------------------------------
# The one checkpoint reader: official EDM/SiD .pkl, or our torch.save files.

def _scan_torch_zip(path):
    """Bounded pre-scan of a torch.save zip: member sizes, then data.pkl through the bounded unpickler with
    every storage checked against its member and every tensor view against its storage."""
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        total = sum(i.file_size for i in infos.values())
        if total > os.path.getsize(path) + (1 << 20):  # torch stores members uncompressed
            raise ValueError(f'{path}: zip members declare {total} bytes, more than the file holds')
        pkl = [n for n in infos if n.endswith('/data.pkl') and n.count('/') == 1]
        if len(pkl) != 1:
            raise ValueError(f'{path}: not a torch.save archive (no single */data.pkl)')
        prefix = pkl[0][:-len('data.pkl')]
        def persistent(pid):
            ok = (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage' and isinstance(pid[1], _StorageType)
                  and isinstance(pid[2], str) and type(pid[4]) is int and f'{prefix}data/{pid[2]}' in infos)
            if not ok or infos[f'{prefix}data/{pid[2]}'].file_size != pid[4] * pid[1].itemsize:
                raise _Refused(f'refusing a storage record that does not match its data member: {str(pid)[:80]}')
            return pid[4]
        def tensor(numel, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
            _check_view(numel, offset, size, stride)
            return ()
        allow = {**_STORAGE_GLOBALS, ('collections', 'OrderedDict'): _ordered_dict,
                 ('torch._utils', '_rebuild_tensor_v2'): tensor}
        with zf.open(pkl[0]) as f:
            bounded_unpickle(io.BytesIO(f.read()), allow, path, persistent)


def _load_torch_file(path):
    _scan_torch_zip(path)
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises many types for a bad archive
        raise ValueError(f'{path}: cannot read checkpoint safely ({str(e).splitlines()[0]})') from None
    key = next((k for k in ('G_ema', 'ema') if isinstance(data, dict) and k in data), None)
    if key is None or 'net_kwargs' not in data:
        found = list(data)[:10] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f'{path}: expected keys "ema" or "G_ema" and "net_kwargs", found {found}')
    config = data.get('config')
    info = dict(path=str(path), config=config if isinstance(config, dict) else {}, kimg=data.get('kimg'))
    return _build_checked(data['net_kwargs'], data[key], path), info


def _load_edm_file(path):
    with open(path, 'rb') as f:
        data = bounded_unpickle(f, EDM_GLOBALS, path)
    if not isinstance(data, dict) or 'ema' not in data:
        found = list(data)[:10] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f'{path}: no "ema" network in the checkpoint (found {found})')
    rec = data['ema']
    if not isinstance(rec, dict) or 'state' not in rec:
        raise ValueError(f'{path}: "ema" is not a persistent network record')
    state = rec['state']
    if state.get('_init_args'):
        raise ValueError(f'{path}: positional constructor arguments are not supported')
    if str(rec['class_name']).rsplit('.', 1)[-1] != 'EDMPrecond':
        raise ValueError(f'{path}: unsupported network class "{rec["class_name"]}" (only EDMPrecond)')
    net = _build_checked(state.get('_init_kwargs', {}), _flatten_state(rec), path)
    for attr in ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_min', 'sigma_max', 'sigma_data'):
        if attr in state and state[attr] != getattr(net, attr):
            raise ValueError(f'{path}: {attr}={state[attr]} in the pickle but {getattr(net, attr)} after rebuilding')
    return net, dict(path=str(path), config={}, kimg=None, class_name=rec['class_name'],
                     module_src_sha1=rec['module_src_sha1'])


def load_checkpoint(src):
    """(eval-mode frozen EDMPrecond, info) from an EDM/SiD .pkl (its `ema`) or our torch.save file
    ({'G_ema' or 'ema': state_dict, 'net_kwargs': dict, 'config': dict, 'kimg'}); src: a path, URL or
    PRESETS name. info = dict(path, config ({} for .pkl), kimg). Nothing from the file is executed."""
    path = download(PRESETS[src]['url'] if src in PRESETS else src)
    return _load_torch_file(path) if zipfile.is_zipfile(path) else _load_edm_file(path)
#----------------------------------------------------------------------------
# Real data (SiDA's real images; fid.py's reference sets): the CIFAR-10 python archive, or an EDM-style
# zip / folder of images with optional dataset.json labels, decoded once into memory as uint8 (like EDM's
# ImageFolderDataset(cache=True)). Sizes declared by archives are checked before anything is read.

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
MAX_MEMBER_BYTES, MAX_DATASET_BYTES, MAX_LABEL = 1 << 28, 1 << 36, 100000


def _one_hot(ys, path, num=None):
    """Integer class labels -> float32 one-hot [N, num], num = max + 1 unless given (EDM's label_dim)."""
    if not all(type(y) is int and 0 <= y < (num or MAX_LABEL) for y in ys):
        raise ValueError(f'{path}: labels must be one integer class in [0, {num or MAX_LABEL}) per image')
    ys = torch.as_tensor(ys, dtype=torch.long)
    return F.one_hot(ys, num or (int(ys.max()) + 1 if len(ys) else 0)).float()


def _load_cifar_archive(path):
    """cifar-10-python.tar.gz -> uint8 [50000,3,32,32] and labels, data_batch_1..5 in order (as EDM's dataset_tool)."""
    xs, ys = [], []
    try:
        with tarfile.open(path, 'r:gz') as tar:
            for i in range(1, 6):
                member = tar.getmember(f'cifar-10-batches-py/data_batch_{i}')
                if not member.isfile() or member.size > MAX_MEMBER_BYTES:
                    raise ValueError(f'{member.name} is not a file of at most {MAX_MEMBER_BYTES} bytes')
                d = bounded_unpickle(tar.extractfile(member), CIFAR_GLOBALS, f'{path}:{member.name}', encoding='bytes')
                x, y = d[b'data'], d[b'labels']
                if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072
                        and isinstance(y, list) and len(y) == len(x)):
                    raise ValueError(f'{member.name}: expected uint8 data [N, 3072] and N labels')
                xs.append(x.reshape(-1, 3, 32, 32))
                ys += y
    except (tarfile.TarError, EOFError, OSError, zlib.error, KeyError, TypeError, ValueError) as e:
        raise ValueError(f'{path}: not a readable CIFAR-10 python archive ({type(e).__name__}: {e})') from None
    return np.concatenate(xs), _one_hot(ys, path, 10)


def _list_members(path):
    """(names, read(name) -> bytes) for a folder or a zip; every size is checked before reading."""
    if os.path.isdir(path):
        names = [os.path.relpath(os.path.join(r, f), path).replace(os.sep, '/') for r, _, fs in os.walk(path) for f in fs]
        def read(name):
            p = os.path.join(path, name)
            if os.path.getsize(p) > MAX_MEMBER_BYTES:
                raise ValueError(f'{path}: {name} is larger than {MAX_MEMBER_BYTES} bytes')
            return pathlib.Path(p).read_bytes()
        return names, read
    zf = zipfile.ZipFile(path)
    infos = {i.filename: i for i in zf.infolist() if not i.is_dir()}
    big = [i for i in infos.values() if i.file_size > MAX_MEMBER_BYTES]
    if big:
        raise ValueError(f'{path}: member {big[0].filename} declares {big[0].file_size} bytes (limit {MAX_MEMBER_BYTES})')
    total = sum(i.file_size for i in infos.values())
    if total > max(MAX_DATASET_BYTES, 0):
        raise ValueError(f'{path}: members declare {total} bytes in all (limit {MAX_DATASET_BYTES})')
    return list(infos), zf.read  # zipfile stops at the declared size and checks the CRC


def _read_labels(path, names, read, files):
    """dataset.json {"labels": [[name, int], ...] or null} -> labels of `files`, checked before decoding."""
    try:
        meta = json.loads(read('dataset.json')) if 'dataset.json' in names else None
    except (ValueError, RecursionError) as e:
        raise ValueError(f'{path}: dataset.json is not valid JSON ({type(e).__name__})') from None
    labels = meta.get('labels') if isinstance(meta, dict) else None
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f'{path}: dataset.json must be an object with "labels"')
    if labels is None:
        return torch.zeros(len(files), 0)
    if not (isinstance(labels, list) and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                             and type(p[1]) is int and 0 <= p[1] < MAX_LABEL for p in labels)):
        raise ValueError(f'{path}: dataset.json labels must be a list of [name, int in [0, {MAX_LABEL})] pairs')
    meta = dict(labels)
    if len(meta) != len(labels):
        raise ValueError(f'{path}: dataset.json names an image twice')
    missing, extra = [n for n in files if n not in meta], sorted(set(meta) - set(files))
    if missing:
        raise ValueError(f'{path}: dataset.json has no label for {len(missing)} image(s), e.g. {missing[0]}')
    if extra:
        raise ValueError(f'{path}: dataset.json names {len(extra)} file(s) not in the dataset, e.g. {extra[0]}')
    return _one_hot([meta[n] for n in files], path)


def _load_image_files(path):
    """EDM layout: image files at any depth, sorted by name, all of one size; optional dataset.json labels."""
    names, read = _list_members(path)
    files = sorted(n for n in names if n.lower().endswith(('.png', '.jpg', '.jpeg')))
    if not files:
        raise ValueError(f'{path}: no .png/.jpg images found')
    labels = _read_labels(path, names, read, files)
    images = None
    for i, name in enumerate(files):
        a = read_image(read(name), f'{path}:{name}')
        if images is None:
            if len(files) * a.size > MAX_DATASET_BYTES:
                raise ValueError(f'{path}: {len(files)} images of {a.shape} exceed {MAX_DATASET_BYTES} bytes')
            images = np.empty((len(files), *a.shape), dtype=np.uint8)
        elif a.shape != images.shape[1:]:
            raise ValueError(f'{path}: {name} is {a.shape} (C,H,W) but {files[0]} is {images.shape[1:]}')
        images[i] = a
    return images, labels


def load_dataset(path):
    """Real images -> (uint8 [N,C,H,W], float32 one-hot labels [N,L], L=0 without labels). path: 'cifar10'
    (the python archive, downloaded once to the cache), a cifar-10-python.tar.gz, an EDM .zip or a folder."""
    path = os.fspath(path)
    if path == 'cifar10':
        path = download(CIFAR10_URL)
    if not os.path.exists(path):
        raise FileNotFoundError(f'dataset not found: {path}')
    if path.endswith(('.tar.gz', '.tgz')):
        images, labels = _load_cifar_archive(path)
    elif os.path.isdir(path) or path.endswith('.zip'):
        try:
            images, labels = _load_image_files(path)
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile, MemoryError) as e:
            raise ValueError(f'{path}: unreadable dataset ({type(e).__name__}: {e})') from None
    else:
        raise ValueError(f'{path}: expected cifar10, a CIFAR-10 python .tar.gz, an EDM-style .zip or a folder')
    return torch.from_numpy(images), labels

def infinite_batches(images, labels, batch, seed, rank=0, world_size=1, start=0, pin=False):
    """Endless (x [batch,C,H,W] in [-1,1], labels). Epoch e is a permutation drawn from (seed, e), the same on all
    ranks; rank r takes every world_size-th entry (disjoint shards). `start` skips batches (resume) without drawing."""
    n, idx = len(images), torch.zeros(0, dtype=torch.long)
    if n < world_size:
        raise ValueError(f'{n} images cannot be sharded over {world_size} ranks')
    epoch, skip = divmod(start * batch, len(range(rank, n, world_size)))
    while True:
        while len(idx) < batch:
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]))
            idx, epoch, skip = torch.cat([idx, torch.randperm(n, generator=gen)[rank::world_size][skip:]]), epoch + 1, 0
        b, idx = idx[:batch], idx[batch:]
        x = images[b].float() / 127.5 - 1
        yield (x.pin_memory() if pin else x), labels[b]  # pinned: the copy to the GPU needs no synchronisation


def check_dataset_matches(images, labels, net):
    """Fail before training if the data cannot feed the network; -> the labels to use (none if unconditional)."""
    C, H, W = images.shape[1:]
    if H != net.img_resolution or W != net.img_resolution:
        raise ValueError(f'dataset resolution {H}x{W} does not match the teacher resolution {net.img_resolution}')
    if C != net.img_channels:
        raise ValueError(f'dataset has {C} channels but the teacher has {net.img_channels}')
    if net.label_dim and labels.shape[1] != net.label_dim:
        raise ValueError(f'dataset label_dim {labels.shape[1]} does not match the teacher label_dim {net.label_dim}')
    return labels if net.label_dim else labels[:, :0]

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
