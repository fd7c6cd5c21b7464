# EDM's and EDM2's networks: layers, U-Nets, preconditioning, teacher presets, EDM's sampler.
#
# A from-scratch re-implementation of the networks of Karras et al. 2022, "Elucidating the Design
# Space of Diffusion-Based Generative Models" (EDM, github.com/NVlabs/edm: training/networks.py,
# generate.py), written from a description of the maths. Class, argument and parameter names follow
# EDM on purpose, so that the official EDM checkpoints (and SiD's, which share the format) load with
# strict=True and readers' knowledge of EDM transfers. Additions for SiD/SiDA (Zhou et al. 2024):
# `return_logits` / `encoder_only` expose the channel mean of the last encoder feature map, which
# SiDA uses as its discriminator. The EDM2 networks (Karras et al. 2024) follow in their own
# section, with the same call convention. No file I/O here (checkpoints.py reads the official
# files).

import copy
import math

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
# Fully connected layer. Parameters stay float32; they are cast to the activation dtype at use,
# which is how EDM's use_fp16 works (per-layer casting, no autocast).

class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal',
                 init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        weight = weight_init([out_features, in_features], **fans) * init_weight
        self.weight = torch.nn.Parameter(weight)
        if bias:
            self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias)
        else:
            self.bias = None

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
                 resample_filter=[1, 1], fused_resample=False, init_mode='kaiming_normal',
                 init_weight=1, init_bias=0):
        assert not (up and down)
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel,
                    fan_out=out_channels * kernel * kernel)
        self.weight = None
        self.bias = None
        if kernel:
            shape = [out_channels, in_channels, kernel, kernel]
            self.weight = torch.nn.Parameter(weight_init(shape, **fans) * init_weight)
        if kernel and bias:
            self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias)
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
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]),
                                   groups=self.in_channels, stride=2,
                                   padding=max(f_pad - w_pad, 0))
            return F.conv2d(x, w, b, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            # Used by NCSN++'s aux_residual path: conv first (with extra padding), then a strided
            # blur.
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels,
                         stride=2)
        else:
            if self.up:  # x4 because the transposed conv spreads each pixel over 4 outputs
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]),
                                       groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                             stride=2, padding=f_pad)
            if w is not None:  # the bias inside the convolution: same sum, one rounding less
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
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                            bias=self.bias.to(x.dtype), eps=self.eps)

#----------------------------------------------------------------------------
# Self-attention softmax_k(q.k / sqrt(C_head)) v, always in float32 (EDM's AttentionOp keeps the
# logits and softmax in float32). One fused scaled_dot_product_attention call (default scale
# 1/sqrt(C_head)) replaces EDM's einsum-softmax-einsum: same formula, no HW x HW weight matrix kept
# for backward, and the product with v in float32 too (EDM rounds the weights to the activation
# dtype first). On CUDA the float32 call runs the memory-efficient kernel, whose products are
# 3xTF32 (float32 accuracy even with TF32 off). Autocast is switched off here so that bf16 autocast
# does not silently run the logits in low precision.

def attention(qkv, heads):
    """qkv: (B, 3C, H, W) in EDM's interleaved layout (channel (head*C/heads + c)*3 + j holds
    q/k/v for j = 0/1/2) -> (B, C, H, W) in qkv's dtype and memory format (NCHW or
    channels_last)."""
    B, C3, H, W = qkv.shape
    C, N = C3 // 3, B * heads
    # autocast has no 'meta' device (shape-only runs)
    device_type = 'cpu' if qkv.device.type == 'meta' else qkv.device.type
    # fp32 as EDM; a half-precision body on a GPU keeps its dtype: the fused kernels still take
    # the softmax in fp32
    half = qkv.dtype in (torch.float16, torch.bfloat16)
    dtype = qkv.dtype if qkv.is_cuda and half else torch.float32
    with torch.autocast(device_type=device_type, enabled=False):
        # (3, N, HW, C_head), contiguous in C_head as the fused kernels want it: one copy (+ cast)
        qkv_heads = qkv.reshape(N, C // heads, 3, H * W).permute(2, 0, 3, 1)
        q, k, v = qkv_heads.to(dtype).contiguous().unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # (N, HW, C_head)
    # back to (B, C, H, W): a view when heads == 1 (it is NHWC memory), then the layout of qkv
    a = a.to(qkv.dtype).reshape(B, heads, H, W, C // heads).permute(0, 1, 4, 2, 3)
    a = a.reshape(B, C, H, W)
    cl = qkv.is_contiguous(memory_format=torch.channels_last) and not qkv.is_contiguous()
    return a.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)

#----------------------------------------------------------------------------
# U-Net residual block with optional self-attention (EDM UNetBlock): GN-SiLU-conv, embedding
# injection (additive, or scale/shift when adaptive_scale), dropout, conv, skip; then an attention
# sub-block.

class UNetBlock(torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False,
                 attention=False, num_heads=None, channels_per_head=64, dropout=0, skip_scale=1,
                 eps=1e-5, resample_filter=[1, 1], resample_proj=False, adaptive_scale=True,
                 init=dict(), init_zero=dict(init_weight=0), init_attn=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        elif num_heads is not None:
            self.num_heads = num_heads
        else:
            self.num_heads = out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            # A 1x1 projection when channels change (or resample_proj), else a weightless
            # resampler.
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
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
            # EDM's interleaved q/k/v channel layout
            a = attention(self.qkv(self.norm2(x)), self.num_heads)
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
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
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
# DDPM++ / NCSN++ U-Net of Song et al. 2021 as re-parameterised by EDM (SongUNet). Returns the
# output of the last aux_conv. With return_logits/encoder_only it also/only returns the SiDA logit
# map: the channel mean of the last encoder block's output, (B, 1, 8, 8) for the official configs.

class SongUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=[16], dropout=0.10, label_dropout=0,
                 embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                 decoder_type='standard', resample_filter=[1, 1]):
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
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout,
                            skip_scale=np.sqrt(0.5), eps=1e-6, resample_filter=resample_filter,
                            resample_proj=True, adaptive_scale=False, init=init,
                            init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise level (+ class label + augmentation label) -> embedding.
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = None
        if augment_dim:
            self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init)
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
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(
                        caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter,
                        fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attn = res in attn_resolutions
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn,
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        self.dec = self.decoder(cout, skips, img_resolution, out_channels, model_channels,
                                channel_mult, num_blocks, attn_resolutions, decoder_type,
                                resample_filter, block_kwargs)

    @staticmethod
    def decoder(cout, skips, img_resolution, out_channels, model_channels, channel_mult,
                num_blocks, attn_resolutions, decoder_type, resample_filter, block_kwargs):
        """The decoder, mirroring the encoder (skips: its outputs' channels); attention only in
        the last block of a level (unlike ADM)."""
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
                dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn,
                                                           **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0,
                                                        up=True, resample_filter=resample_filter)
                dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)
        return dec

    def forward(self, x, noise_labels, class_labels, augment_labels=None, return_logits=False,
                encoder_only=False):
        # Mapping. EDM swaps the embedding halves to [sin, cos] and scales one-hot labels by
        # sqrt(label_dim).
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                tmp = tmp * keep.to(tmp.dtype)
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

        # Decoder. A block whose input width differs from x takes the next skip; the output is
        # `aux`.
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
# ADM U-Net of Dhariwal & Nichol 2021 as re-implemented by EDM (DhariwalUNet): scale/shift
# conditioning, 64 channels per attention head, bias-free class embedding added after map_layer1.

class DhariwalUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1 / 3),
                    init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
                            init=init, init_zero=init_zero)

        # Mapping network.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = None
        if augment_dim:
            self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = None
        if label_dim:
            self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal',
                                    init_weight=np.sqrt(label_dim))

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
                attn = res in attn_resolutions
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn,
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True,
                                                         **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = res in attn_resolutions
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn,
                                                                **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None, return_logits=False,
                encoder_only=False):
        # Mapping; labels are raw one-hot and enter after map_layer1.
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                tmp = tmp * keep.to(tmp.dtype)
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
#   D(x; sigma) = c_skip x + c_out F(c_in x; c_noise),  c_skip = sd^2/(s^2+sd^2),
#   c_out = s sd/sqrt(s^2+sd^2),  c_in = 1/sqrt(s^2+sd^2),  c_noise = ln(s)/4.
# Inputs and outputs are float32; with use_fp16 (on CUDA only, as in EDM) the U-Net body runs in
# fp16.

class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float('inf'), sigma_data=0.5, model_type='DhariwalUNet',
                 **model_kwargs):
        super().__init__()
        if model_type not in _MODEL_TYPES:
            raise ValueError(f'unknown model_type "{model_type}" '
                             f'(expected one of {sorted(_MODEL_TYPES)})')
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        if img_resolution:
            self.img_shape = [img_channels, img_resolution, img_resolution]
        else:
            self.img_shape = [img_channels]  # points: [C]
        # Everything needed to rebuild this net; saved next to our own checkpoints ('net_kwargs').
        self.init_kwargs = copy.deepcopy(dict(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
            use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data,
            model_type=model_type, **model_kwargs))
        self.model = _MODEL_TYPES[model_type](img_resolution=img_resolution,
                                              in_channels=img_channels, out_channels=img_channels,
                                              label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, augment_labels=None, force_fp32=False,
                return_logits=False, encoder_only=False):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32)
        sigma = sigma.reshape(-1, *[1] * (x.dim() - 1))  # a scalar broadcasts
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        fp16 = self.use_fp16 and not force_fp32 and x.device.type == 'cuda'
        dtype = torch.float16 if fp16 else torch.float32

        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4

        out = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels,
                         augment_labels=augment_labels, return_logits=return_logits,
                         encoder_only=encoder_only)
        if encoder_only:
            return out.to(torch.float32)
        F_x, logits = out if return_logits else (out, None)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)  # (B, C, H, W) float32
        return (D_x, logits.to(torch.float32)) if return_logits else D_x

#----------------------------------------------------------------------------
# The 2-D toy's body (sid's toy.py): an MLP on c_in*x and a sinusoidal embedding of c_noise. Inside
# EDMPrecond it is the toy's G and f_psi with the same preconditioning as the image nets; its first
# layers play SiDA's encoder.

class ToyMLP(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, hidden=128,
                 depth=3, dropout=0.0):
        super().__init__()
        nn = torch.nn
        self.enc = nn.Sequential(nn.Linear(in_channels + 16, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU())
        layers = []
        for _ in range(depth - 2):
            layers += [nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.SiLU()]
        self.dec = nn.Sequential(*layers, nn.Linear(hidden, out_channels))
        self.register_buffer('freqs', torch.arange(1, 9, dtype=torch.float32))

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, return_logits=False,
                encoder_only=False):
        c_noise = noise_labels.reshape(-1, 1).expand(x.shape[0], 1)
        h = self.enc(torch.cat([x, (c_noise * self.freqs).sin(), (c_noise * self.freqs).cos()], 1))
        # (B, 1): channel mean of the encoder features, as SiDA's on the U-Nets
        logits = h.mean(1, keepdim=True)
        if encoder_only:
            return logits
        return (self.dec(h), logits) if return_logits else self.dec(h)


_MODEL_TYPES = dict(SongUNet=SongUNet, DhariwalUNet=DhariwalUNet, ToyMLP=ToyMLP)

#----------------------------------------------------------------------------
# EDM2's networks (Karras et al., CVPR 2024, "Analyzing and Improving the Training Dynamics of
# Diffusion Models", github.com/NVlabs/edm2): the magnitude-preserving U-Net and its
# preconditioning, re-implemented from the paper's description. Module and parameter names follow
# EDM2's training/networks_edm2.py on purpose, so that NVIDIA's EDM2 checkpoints (Precond: unet.*
# + logvar_*) and the official SiD/SiDA EDM2 generators (unet.* only) load with strict=True. The
# paper builds the network in steps ("configs" B..G of its Sec. 2); each unit below names the
# config that introduces it. For SiDA (official sida branch) `return_logits` / `encoder_only`
# expose the channel mean of the last encoder block's output, as on the EDM nets.
#
# Config D/F: normalisation to unit RMS, x / (eps + ||x|| / sqrt(n)) over `dim` (default: all but
# the first), n = the number of elements reduced. On a weight [out, fan_in...] each output row gets
# unit RMS; with dim=1 on an activation it is the pixel norm (unit RMS over channels per pixel).
# eps is added after the scaling, so a zero row stays zero. The norm is taken in float32.

def normalize(x, dim=None, eps=1e-4):
    if dim is None:
        dim = list(range(1, x.ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    n = math.prod([x.shape[d] for d in dims])
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    rms = norm / math.sqrt(n)
    return x / (eps + rms).to(x.dtype)

#----------------------------------------------------------------------------
# Resampling with EDM2's only filter, [1, 1]: 2x2 average pooling down, nearest-neighbour up (both
# keep the magnitude of a smooth signal; EDM2 writes them as a depthwise [1,1]x[1,1] filter).

def resample(x, mode='keep'):
    if mode == 'keep':
        return x
    if mode == 'down':
        return F.avg_pool2d(x, kernel_size=2)
    if mode == 'up':
        return F.interpolate(x, scale_factor=2, mode='nearest')
    raise ValueError(f'unknown resample mode "{mode}" (expected keep, down or up)')

#----------------------------------------------------------------------------
# Config G, magnitude-preserving fixed-function layers.
#   MP-SiLU: silu(x) / 0.596, where 0.596 = sqrt(E[silu(z)^2]) for z ~ N(0, 1).
#   MP-Sum:  ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2), unit variance for independent unit a, b;
#            t is the weight of the second input (0.3 for residuals, 0.5 for the label embedding).
#   MP-Cat:  [w_a a, w_b b] along channels with w_a = K (1 - t) / sqrt(N_a), w_b = K t / sqrt(N_b),
#            K = sqrt((N_a + N_b) / ((1 - t)^2 + t^2)): unit overall variance, and a and b
#            contribute in the ratio (1 - t) : t whatever their channel counts N_a, N_b.

def mp_silu(x):
    return F.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=1, t=0.5):
    N_a = a.shape[dim]
    N_b = b.shape[dim]
    K = math.sqrt((N_a + N_b) / ((1 - t) ** 2 + t ** 2))
    w_a = K * (1 - t) / math.sqrt(N_a)
    w_b = K * t / math.sqrt(N_b)
    return torch.cat([w_a * a, w_b * b], dim=dim)

#----------------------------------------------------------------------------
# Config G, MP-Fourier: sqrt(2) cos(2 pi (f x + p)) with f ~ N(0, bandwidth^2), p ~ U[0, 1), which
# has unit variance over the random phases. freqs and phases are buffers (stored in checkpoints,
# already multiplied by 2 pi). Computed in float32, returned in the input's dtype.

class MPFourier(torch.nn.Module):
    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer('freqs', 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * math.pi * torch.rand(num_channels))

    def forward(self, x):
        y = x.to(torch.float32).outer(self.freqs.to(torch.float32))  # (N, num_channels)
        y = y + self.phases.to(torch.float32)
        y = y.cos() * math.sqrt(2)
        return y.to(x.dtype)

#----------------------------------------------------------------------------
# Config D/E, magnitude-preserving convolution / linear layer (no bias anywhere in EDM2):
#   y = conv(x, gain * normalize(w) / sqrt(fan_in)),
# so each output is a unit-norm combination of its fan_in inputs: unit-variance i.i.d. inputs give
# unit-variance outputs. A 2-D weight is a linear layer, a 4-D one a 'same'-padded convolution.
# `gain` is 1 or a learned scalar (emb_gain, out_gain), both initialised to 0 by EDM2.
#
# Forced weight normalisation (Config E): in training mode the stored weight itself is projected
# back to unit-RMS rows, so that its norm cannot grow and the effective learning rate stays fixed.
# EDM2 writes normalize(w) into the parameter in place inside every training-mode forward. SiDA's
# fake-score step calls f_psi twice in training mode (fakes with logits, then reals encoder_only)
# before one backward; a second in-place write would change a weight saved by the first call's graph
# and autograd's in-place check fails ("modified by an inplace operation"; it fails the same way in
# the official SiDA code with force_normalization=1). So here force_normalize_ writes only when the
# weight has changed since its last write (an optimizer step, a load, a copy): the stamp is
# (storage address, version counter), the counter being the one autograd's in-place check uses.
# One call per weight update writes exactly what EDM2 writes; further calls reuse the stored,
# already normalised weight (EDM2 would normalise it again, a change of O(eps) = 1e-4 relative).
# EDM2Precond.forward calls it for every MPConv before the U-Net runs, so forward itself is a pure
# function: torch.compile traces blocks without graph breaks, and gradient checkpointing (which
# re-runs blocks during backward) writes nothing. force_normalization=False (SiDA's flag, used by
# its S recipe) skips the write; the function is the same because forward always normalises.

class MPConv(torch.nn.Module):
    def __init__(self, in_channels, out_channels, kernel, force_normalization=True):
        super().__init__()
        self.out_channels = out_channels
        self.force_normalization = force_normalization
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self._stamp = None  # (data_ptr, _version) of the weight right after our last forced write

    @torch.no_grad()
    def force_normalize_(self):
        """Forced weight normalisation, skipped if the weight is unchanged since the last one."""
        if self._stamp != (self.weight.data_ptr(), self.weight._version):
            self.weight.copy_(normalize(self.weight.to(torch.float32)))
            self._stamp = (self.weight.data_ptr(), self.weight._version)

    def forward(self, x, gain=1):
        w = normalize(self.weight.to(torch.float32))
        w = w * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

#----------------------------------------------------------------------------
# EDM2's residual block (Configs C-G). 'enc' blocks: resample, 1x1 skip conv if the width changes,
# pixel norm (Config F: replaces group norm), then the residual branch; 'dec' blocks: the residual
# branch reads the un-projected input and the skip conv is applied to the main path afterwards.
#   y = conv_res1(dropout(mp_silu(conv_res0(mp_silu(x)) * (1 + emb_gain * emb_linear(emb)))))
#   x = mp_sum(x, y, res_balance)
# Attention (Config C, cosine attention): q, k, v each normalised over the 64 channels of a head,
# softmax_k(q.k / sqrt(64)) v, attn_proj, x = mp_sum(x, y, attn_balance). attn_qkv's 3C outputs are
# laid out as (head, channel, {q, k, v}) with the q/k/v index fastest, as in EDM2's checkpoints.
# The output is clipped to [-clip_act, clip_act] (a guard against fp16 overflow).

class EDM2Block(torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, flavor='enc', resample_mode='keep',
                 resample_filter=[1, 1], attention=False, channels_per_head=64, dropout=0,
                 res_balance=0.3, attn_balance=0.3, clip_act=256, force_normalization=True):
        super().__init__()
        if flavor not in ('enc', 'dec'):
            raise ValueError(f'unknown block flavor "{flavor}" (expected enc or dec)')
        if list(resample_filter) != [1, 1]:
            raise ValueError(f'resample_filter {resample_filter}: only [1, 1] (EDM2\'s) is built')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        fn = dict(force_normalization=force_normalization)
        # Registration order = EDM2's state-dict order.
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        cin_res = out_channels if flavor == 'enc' else in_channels
        self.conv_res0 = MPConv(cin_res, out_channels, kernel=[3, 3], **fn)
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[], **fn)
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3], **fn)
        self.conv_skip = None
        if in_channels != out_channels:
            self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1], **fn)
        self.attn_qkv = None
        self.attn_proj = None
        if self.num_heads != 0:
            self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1], **fn)
            self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1], **fn)

    def forward(self, x, emb):
        # Main path.
        x = resample(x, mode=self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        # Residual branch, modulated by the embedding (c = 1 at init, since emb_gain = 0).
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # (N, out_channels) float32
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        # Connect the branches.
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        # Self-attention over the H*W positions.
        if self.num_heads != 0:
            N, C, H, W = x.shape
            y = self.attn_qkv(x).reshape(N, self.num_heads, C // self.num_heads, 3, H * W)
            q, k, v = normalize(y, dim=2).unbind(3)  # each (N, heads, 64, H*W)
            y = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3),
                                               v.transpose(2, 3))  # (N, heads, H*W, 64)
            y = self.attn_proj(y.transpose(2, 3).reshape(N, C, H, W))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

#----------------------------------------------------------------------------
# EDM2's U-Net (Config G). Embedding: MP-Fourier of c_noise -> emb_noise, MP-summed (t = 0.5)
# with emb_label(one-hot * sqrt(label_dim)) (unit RMS over the label_dim entries), then MP-SiLU.
# Encoder: a constant-ones channel is appended to the input (it stands in for the biases that
# Config C removed), '{r}x{r}_conv', then per level a 'down' block and num_blocks blocks; every
# encoder output is a skip. Decoder from the lowest level: 'in0' (attention) and 'in1', or an 'up'
# block, then num_blocks + 1 blocks that each first MP-concatenate (t = 0.5) the next skip, main
# path first. out_conv's gain is the learned out_gain (0 at init: the raw net F starts at zero).
# SiDA's discriminator logits: the channel mean of the last encoder block's output, (N, 1, 8, 8) at
# 64x64 latents, no extra parameters; encoder_only stops there.

class EDM2UNet(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192,
                 channel_mult=[1, 2, 3, 4], channel_mult_noise=None, channel_mult_emb=None,
                 num_blocks=3, attn_resolutions=[16, 8], label_balance=0.5, concat_balance=0.5,
                 **block_kwargs):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = cblock[0]
        if channel_mult_noise is not None:
            cnoise = model_channels * channel_mult_noise
        cemb = max(cblock)
        if channel_mult_emb is not None:
            cemb = model_channels * channel_mult_emb
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        fn = dict(force_normalization=block_kwargs.get('force_normalization', True))
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[], **fn)
        self.emb_label = None
        if label_dim != 0:
            self.emb_label = MPConv(label_dim, cemb, kernel=[], **fn)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = channels
                self.enc[f'{res}x{res}_conv'] = MPConv(cin, cout, kernel=[3, 3], **fn)
            else:
                self.enc[f'{res}x{res}_down'] = EDM2Block(cout, cout, cemb, flavor='enc',
                                                          resample_mode='down', **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = channels
                attn = res in attn_resolutions
                self.enc[f'{res}x{res}_block{idx}'] = EDM2Block(cin, cout, cemb, flavor='enc',
                                                                attention=attn, **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f'{res}x{res}_in0'] = EDM2Block(cout, cout, cemb, flavor='dec',
                                                         attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = EDM2Block(cout, cout, cemb, flavor='dec',
                                                         **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = EDM2Block(cout, cout, cemb, flavor='dec',
                                                        resample_mode='up', **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = channels
                attn = res in attn_resolutions
                self.dec[f'{res}x{res}_block{idx}'] = EDM2Block(cin, cout, cemb, flavor='dec',
                                                                attention=attn, **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3], **fn)

    def forward(self, x, noise_labels, class_labels, return_logits=False, encoder_only=False):
        # Embedding, float32 (noise_labels and class_labels are float32).
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            onehot = class_labels * math.sqrt(class_labels.shape[1])
            emb = mp_sum(emb, self.emb_label(onehot), t=self.label_balance)
        emb = mp_silu(emb)  # (N, cemb)

        # Encoder.
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for block in self.enc.values():
            if isinstance(block, MPConv):
                x = block(x)
            else:
                x = block(x, emb)
            if not encoder_only:
                skips.append(x)
        logits = x.mean(dim=1, keepdim=True)  # (N, 1, 8, 8): SiDA's discriminator logits
        if encoder_only:
            return logits

        # Decoder.
        for name, block in self.dec.items():
            if 'block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        x = self.out_conv(x, gain=self.out_gain)
        if return_logits:
            return x, logits
        return x

#----------------------------------------------------------------------------
# EDM2's preconditioning (EDM's, Karras et al. 2022 Table 1, with sigma_data = 0.5):
#   D(x; sigma) = c_skip x + c_out F(c_in x; c_noise),
#   c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
#   c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4.
# Config B's uncertainty head u(sigma) = logvar_linear(MP-Fourier(c_noise)), a log-variance per
# sigma that the EDM2 loss uses as loss * exp(-u) + u; return_logvar returns it as (N, 1, 1, 1).
# logvar_channels=0 builds no head: the official SiD/SiDA generators (unet.* only, 200 entries).
# In training mode it first applies forced weight normalisation to all its MPConvs (see MPConv).
# Same call convention as sid's EDMPrecond: float32 in and out; use_fp16 runs the U-Net's image
# path in fp16 on CUDA only (embeddings, logvar and the skip term stay float32). EDM2 takes no
# augmentation labels; the official recipes train without augmentation.
# Outputs: D; (D, logits) with return_logits; logits with encoder_only; logvar appended last.

class EDM2Precond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=True, sigma_data=0.5,
                 logvar_channels=128, model_type='EDM2UNet', **unet_kwargs):
        super().__init__()
        if model_type != 'EDM2UNet':
            raise ValueError(f'model_type "{model_type}": EDM2Precond builds only EDM2UNet')
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.logvar_channels = logvar_channels
        self.img_shape = [img_channels, img_resolution, img_resolution]
        # Everything needed to rebuild this net; model_type tells an EDM2 net from an EDM one.
        self.init_kwargs = copy.deepcopy(dict(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
            use_fp16=use_fp16, sigma_data=sigma_data, logvar_channels=logvar_channels,
            model_type=model_type, **unet_kwargs))
        self.unet = EDM2UNet(img_resolution=img_resolution, img_channels=img_channels,
                             label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = None
        self.logvar_linear = None
        if logvar_channels != 0:
            fn = dict(force_normalization=unet_kwargs.get('force_normalization', True))
            self.logvar_fourier = MPFourier(logvar_channels)
            self.logvar_linear = MPConv(logvar_channels, 1, kernel=[], **fn)

    @torch.compiler.disable  # Python-side state (the stamps): run eagerly, never traced
    def force_weight_normalization_(self):
        """Config E: project every MPConv's stored weight that changed since its last projection."""
        for m in self.modules():
            if isinstance(m, MPConv) and m.force_normalization:
                m.force_normalize_()

    def forward(self, x, sigma, class_labels=None, augment_labels=None, force_fp32=False,
                return_logits=False, encoder_only=False, return_logvar=False):
        if augment_labels is not None:
            raise ValueError('EDM2 networks take no augmentation labels (set augment to 0)')
        if return_logvar and self.logvar_linear is None:
            raise ValueError('this EDM2 network has no logvar head (built with logvar_channels=0)')
        if self.training:
            self.force_weight_normalization_()
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        on_cuda = x.device.type == 'cuda'
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and on_cuda) else torch.float32

        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4  # (N,)

        out = self.unet((c_in * x).to(dtype), c_noise, class_labels, return_logits=return_logits,
                        encoder_only=encoder_only)
        result = []
        if encoder_only:
            result.append(out.to(torch.float32))
        else:
            F_x = out[0] if return_logits else out
            D_x = c_skip * x + c_out * F_x.to(torch.float32)  # (N, C, H, W) float32
            result.append(D_x)
            if return_logits:
                result.append(out[1].to(torch.float32))
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise))
            result.append(logvar.reshape(-1, 1, 1, 1))
        if len(result) == 1:
            return result[0]
        return tuple(result)

#----------------------------------------------------------------------------
# Gradient checkpointing per U-Net block (EDM's UNetBlock, EDM2's EDM2Block: both forward(x, emb)).

def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def checkpointed_forward(x, emb):
        if torch.is_grad_enabled():
            return checkpoint(forward, x, emb, use_reentrant=False, preserve_rng_state=True)
        return forward(x, emb)

    return checkpointed_forward


def checkpoint_blocks(net):
    """Gradient checkpointing: each U-Net block of `net` keeps only its inputs and recomputes its
    activations in backward. Non-reentrant checkpointing gives input gradients (the teacher's and
    f_psi's in SiD's generator step) and works under DDP and torch.compile; preserve_rng_state
    replays the same dropout masks. Patches the instances in place: apply it after any deepcopy
    of `net` (a copy would call the original's blocks). EDM2's forced weight normalisation
    happens in EDM2Precond.forward, outside the blocks, so the re-runs write no weight."""
    for block in net.modules():
        if isinstance(block, (UNetBlock, EDM2Block)):
            block.forward = _checkpointed(block.forward)
    return net

#----------------------------------------------------------------------------
# Regional compilation: torch.compile each U-Net block (UNetBlock, EDM2Block) instead of the whole
# network. All blocks share one compiled function (nn.Module.compile wraps the block's call), so
# blocks of the same configuration, input shape and mode reuse its compiled code and the warm-up
# compiles a few dozen small graphs instead of one huge one. Parameter names stay as they are (no
# `_orig_mod.`), so state dicts and checkpoints are unchanged.

def compile_blocks(net, **compile_kwargs):
    """Compile every U-Net block of `net` in place and return `net`. dynamic=False: each resolution
    (and batch size) gets its own static-shape kernels rather than one slower dynamic-shape graph
    for all of them. Works in train/eval, under no_grad, with frozen weights and input gradients,
    channels_last and autocast: each such mode is a guard, and the recompile limits are raised to
    cover all of them (CIFAR-10 DDPM++: 14 block kinds x 3 modes per micro-batch size: eval under
    no_grad, train with weight gradients, frozen with input gradients)."""
    import torch._dynamo
    limits = (('recompile_limit', 512), ('cache_size_limit', 512),
              ('accumulated_recompile_limit', 4096), ('accumulated_cache_size_limit', 4096))
    for name, value in limits:
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), value))
    for block in net.modules():
        if isinstance(block, (UNetBlock, EDM2Block)):
            block.compile(**{'dynamic': False, **compile_kwargs})
    return net

#----------------------------------------------------------------------------
# The five official EDM teachers used by SiD (EDM train.py presets; FIDs are EDM's, sampler in
# brackets).

_EDM_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-{}.pkl'
_DDPMPP = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
               decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
               model_channels=128)
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
    # FID 1.36 (256 steps, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003; NFE 511)
    'imagenet-64x64-cond-adm': dict(
        url=_EDM_URL.format('imagenet-64x64-cond-adm'),
        kwargs=dict(img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True,
                    model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4],
                    dropout=0.10)),
}

#----------------------------------------------------------------------------
# The six EDM2 ImageNet-512 teachers distilled by SiD/SiDA (EDM2's train_edm2.py presets: only
# model_channels and dropout differ; 4x64x64 SD-VAE latents, 1000 classes). The URLs are EDM2's
# post-hoc EMA reconstructions optimised for FID (generate_images.py's '-fid' presets, unguided);
# the FIDs are EDM2's (32-step Heun sampler, NFE 63). Parameter counts are with the logvar head.

_EDM2_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-{}.pkl'
_IMG512 = dict(img_resolution=64, img_channels=4, label_dim=1000, use_fp16=True,
               model_type='EDM2UNet')
PRESETS.update({
    'edm2-img512-xs': dict(  # FID 3.53, 124,713,253 parameters
        url=_EDM2_URL.format('xs-2147483-0.135'),
        kwargs=dict(_IMG512, model_channels=128, dropout=0.0)),
    'edm2-img512-s': dict(  # FID 2.56, 280,212,837 parameters
        url=_EDM2_URL.format('s-2147483-0.130'),
        kwargs=dict(_IMG512, model_channels=192, dropout=0.0)),
    'edm2-img512-m': dict(  # FID 2.25, 497,807,781 parameters
        url=_EDM2_URL.format('m-2147483-0.100'),
        kwargs=dict(_IMG512, model_channels=256, dropout=0.10)),
    'edm2-img512-l': dict(  # FID 2.06, 777,498,085 parameters
        url=_EDM2_URL.format('l-1879048-0.085'),
        kwargs=dict(_IMG512, model_channels=320, dropout=0.10)),
    'edm2-img512-xl': dict(  # FID 1.96, 1,119,283,749 parameters
        url=_EDM2_URL.format('xl-1342177-0.085'),
        kwargs=dict(_IMG512, model_channels=384, dropout=0.10)),
    'edm2-img512-xxl': dict(  # FID 1.91, 1,523,164,773 parameters
        url=_EDM2_URL.format('xxl-0939524-0.070'),
        kwargs=dict(_IMG512, model_channels=448, dropout=0.10)),
})


def build_net(**kwargs):
    """The network that `kwargs` describe (a net's init_kwargs): EDM2Precond for model_type
    'EDM2UNet', else EDMPrecond."""
    if kwargs.get('model_type') == 'EDM2UNet':
        return EDM2Precond(**kwargs)
    return EDMPrecond(**kwargs)


def build_preset(name, **overrides):
    """The network of an official teacher config, with keyword overrides (e.g. dropout, use_fp16,
    model_channels; logvar_channels=0 gives an EDM2 generator)."""
    if name not in PRESETS:
        raise ValueError(f'unknown preset "{name}" (expected one of {", ".join(PRESETS)})')
    return build_net(**{**copy.deepcopy(PRESETS[name]['kwargs']), **overrides})

#----------------------------------------------------------------------------
# EDM sampler: Heun's 2nd-order method with optional churn, Algorithm 2 of Karras et al. 2022.
# Time steps t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, t_N = 0; float64
# throughout; the last step is plain Euler, so N steps cost 2N-1 network evaluations.

@torch.no_grad()
def edm_sampler(net, latents, class_labels=None, num_steps=18, sigma_min=0.002, sigma_max=80,
                rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
                randn_like=torch.randn_like):
    if num_steps < 2:
        raise ValueError('edm_sampler needs num_steps >= 2')
    sigma_min = max(sigma_min, getattr(net, 'sigma_min', 0))
    sigma_max = min(sigma_max, getattr(net, 'sigma_max', float('inf')))
    i = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (sigma_max ** (1 / rho)
               + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # (N+1,)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Churn: raise the noise level to t_hat by adding fresh noise (always drawn, as in EDM, to
        # keep RNG streams).
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
