# EDM2's magnitude-preserving U-Net, its preconditioning and the six ImageNet-512 presets (draft).
#
# A from-scratch re-implementation of the network of Karras et al. 2024, "Analyzing and Improving
# the Training Dynamics of Diffusion Models" (EDM2, CVPR 2024, github.com/NVlabs/edm2), written
# from the paper's description. Module and parameter names follow EDM2's training/networks_edm2.py
# on purpose, so that NVIDIA's EDM2 checkpoints (Precond: unet.* + logvar_*) and the official SiD /
# SiDA EDM2 generators (unet.* only) load with strict=True. The paper builds the network in steps
# ("configs" B..G of its Sec. 2); each unit below names the config that introduces it.
# Addition for SiDA (Zhou et al., ICLR 2025, github.com/mingyuanzhou/SiD, branch sida):
# `return_logits` / `encoder_only` expose the channel mean of the last encoder block's output,
# which SiDA uses as its discriminator on EDM2, as on the EDM nets.

import copy
import math

import torch
import torch.nn.functional as F

#----------------------------------------------------------------------------
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
# The six EDM2 ImageNet-512 teachers distilled by SiD/SiDA (EDM2 train_edm2.py presets: only
# model_channels and dropout differ; 4x64x64 SD-VAE latents, 1000 classes). The URLs are EDM2's
# post-hoc EMA reconstructions optimised for FID (generate_images.py's '-fid' presets, unguided);
# the FIDs are EDM2's (32-step Heun sampler, NFE 63). Parameter counts are with the logvar head.

_EDM2_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-{}.pkl'
_IMG512 = dict(img_resolution=64, img_channels=4, label_dim=1000, use_fp16=True,
               model_type='EDM2UNet')
EDM2_PRESETS = {
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
}


def build_edm2_preset(name, **overrides):
    """EDM2Precond for an EDM2 ImageNet-512 size, with keyword overrides (e.g. dropout, use_fp16,
    logvar_channels=0 for a generator, model_channels for a tiny test net)."""
    if name not in EDM2_PRESETS:
        raise ValueError(f'unknown preset "{name}" (expected one of {", ".join(EDM2_PRESETS)})')
    return EDM2Precond(**{**copy.deepcopy(EDM2_PRESETS[name]['kwargs']), **overrides})
