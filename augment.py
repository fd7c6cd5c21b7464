# EDM's non-leaky augmentation as SiD runs it: AugmentPipe, the band-limited warp, `edm_pipe(p)`.
#
# Re-implements the geometric part of EDM's augment.py (Karras et al. 2022, App. B.6,
# github.com/NVlabs/edm), itself taken from StyleGAN2-ADA's augmentation pipeline (Karras et al.
# 2020, "Training Generative Adversarial Networks with Limited Data"): xflip, yflip, isotropic
# scale, rotation, anisotropic scale, fractional translation. Each enabled transform appends its
# parameters to the labels (1+1+1+2+2+2 = 9 columns for SiD's config), which the network is
# conditioned on. Sub-pixel warps use 2x oversampling with the sym6 wavelet filter. Pure tensor
# code, no files.

import numpy as np
import torch
import torch.nn.functional as F

#----------------------------------------------------------------------------
# Homogeneous 2-D matrices (N, 3, 3) and the sym6 filter (ADA's wavelets['sym6']).

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


_FILTERS = {}  # (device, dtype) -> sym6 taps: made once per device, no later host -> device copy


def _sym6(device, dtype):
    key = (str(device), dtype)
    if key not in _FILTERS:
        _FILTERS[key] = torch.tensor(_SYM6, dtype=dtype).to(device)
    return _FILTERS[key]


def _pow2(n):  # smallest power of two >= n
    return 1 << max(n - 1, 0).bit_length()

#----------------------------------------------------------------------------
# The warp: out(p) = in(G_inv p), band-limited by 2x oversampling (ADA's geometric pipeline).

def _edm_margin(G, c, size):
    """EDM's padding per side (EDM augment.py): how far the batch's warped image corners reach
    beyond the image, plus 6 px of filter support, within [0, size - 1]; the max over the whole
    batch. G: (N, 2, 3) float32 rows of G_inv for one axis pair; c: the centre; -> (before, after)
    as 0-d tensors on the device (the corners (+-cx, +-cy) need no constant tensor)."""
    reach = G[:, 0].abs() * c[0] + G[:, 1].abs() * c[1]  # max over the 4 corners of |linear part|
    before = (reach - G[:, 2]).amax() + 6 - c[2]
    after = (reach + G[:, 2]).amax() + 6 - c[2]
    return before.clamp(0, size - 1).ceil(), after.clamp(0, size - 1).ceil()


def _inside(n, lo, hi, device):
    """[n] bool: lo <= k < hi (lo, hi 0-d device tensors)."""
    k = torch.arange(n, device=device)
    return (k >= lo) & (k < hi)


def warp_images(images, G_inv):
    """out(p) = in(G_inv p), p in pixel coordinates centred on the image; reflect padding outside.
    Band-limited: upsample 2x (sym6 synthesis), bilinear sample, downsample 2x (sym6 analysis).
    The same function as EDM's geometric pipeline, to float rounding, without its host sync: EDM
    pads by the batch's warped footprint (+6 px), a size it reads back from the GPU, and reads
    zeros beyond its padded and upsampled canvases. Here the padding is always the largest (W-1,
    H-1), and EDM's margin, computed on the device, zeroes what EDM would not have (it matters
    only at the border, after zooms out by more than ~1.4)."""
    N, C, H, W = images.shape
    dev, L = images.device, len(_SYM6)
    h = _sym6(dev, images.dtype)
    cx, cy = (W - 1) / 2, (H - 1) / 2
    G = G_inv.to(torch.float32)
    ex0, ex1 = _edm_margin(G[:, 0], (cx, cy, cx), W)
    ey0, ey1 = _edm_margin(G[:, 1], (cx, cy, cy), H)
    x = F.pad(images, [W - 1, W - 1, H - 1, H - 1], mode='reflect')
    keep = (_inside(3 * H - 2, H - 1 - ey0, 2 * H - 1 + ey1, dev)[:, None]
            & _inside(3 * W - 2, W - 1 - ex0, 2 * W - 1 + ex1, dev))
    x = torch.where(keep, x, 0)  # EDM's padded image
    # Upsample: U[k] = sum_i P[i] h[k - 2i]. Sample k sits at padded pixel coordinate (k - 5) / 2,
    # EDM's placement: its upsampled sample k (our k + 5) is where its grid_sample (align_corners
    # False, at twice the resolution, half a pixel shifted each way) reads padded coordinate k / 2.
    # The filter is not symmetric, so its midpoint (k - 5.5) / 2 would turn rotations and zooms
    # about a centre a quarter pixel off; translations and flips would not show it.
    k0 = L // 2 - 1  # 5 for the 12 taps of sym6
    x = F.conv_transpose2d(x, h.reshape(1, 1, 1, L).tile([C, 1, 1, 1]), stride=(1, 2), groups=C)
    x = F.conv_transpose2d(x, h.reshape(1, 1, L, 1).tile([C, 1, 1, 1]), stride=(2, 1), groups=C)
    # EDM's upsampled canvas: its 2 (size + margins) samples; zeros beyond, as its grid_sample.
    y0, x0 = 2 * (H - 1 - ey0) + k0, 2 * (W - 1 - ex0) + k0
    keep = (_inside(x.shape[2], y0, y0 + 2 * (H + ey0 + ey1), dev)[:, None]
            & _inside(x.shape[3], x0, x0 + 2 * (W + ex0 + ex1), dev))
    x = torch.where(keep, x, 0)
    # Zeros after the last row/column (never sampled) make size - 1 a power of two, so
    # grid_sample's coordinate normalisation k / (size - 1) * 2 - 1 and its inverse round by less
    # than 1e-5 px even on this larger canvas.
    pad_x = _pow2(x.shape[3] - 1) + 1 - x.shape[3]
    pad_y = _pow2(x.shape[2] - 1) + 1 - x.shape[2]
    x = F.pad(x, [0, pad_x, 0, pad_y])
    # Sample the warped image on a 2x grid covering the output plus filter support: S[k] at
    # output pixel coordinate (k - 5) / 2, the same placement as the upsampling's.
    ux = (torch.arange(2 * W + L - 2, device=dev, dtype=torch.float32) - k0) / 2 - cx
    uy = (torch.arange(2 * H + L - 2, device=dev, dtype=torch.float32) - k0) / 2 - cy
    G = G[:, :2, :, None, None]  # (N, 2, 3, 1, 1)
    src = (G[:, :, 0] * ux[None, None, None, :] + G[:, :, 1] * uy[None, None, :, None]
           + G[:, :, 2])  # (N, 2, Hs, Ws)
    kx = 2 * (src[:, 0] + cx + W - 1) + k0  # index into the upsampled image
    ky = 2 * (src[:, 1] + cy + H - 1) + k0
    grid = torch.stack([kx / (x.shape[3] - 1) * 2 - 1,
                        ky / (x.shape[2] - 1) * 2 - 1], dim=-1)  # (N, Hs, Ws, 2)
    x = F.grid_sample(x, grid.to(x.dtype), mode='bilinear', padding_mode='zeros',
                      align_corners=True)
    # Downsample: D[j] = sum_t h[t] S[2j + t], centred on output pixel j (exact inverse of the
    # upsampling).
    x = F.conv2d(x, h.reshape(1, 1, 1, L).tile([C, 1, 1, 1]), stride=(1, 2), groups=C)
    x = F.conv2d(x, h.reshape(1, 1, L, 1).tile([C, 1, 1, 1]), stride=(2, 1), groups=C)
    return x  # (N, C, H, W)

#----------------------------------------------------------------------------
# The pipe (EDM's AugmentPipe, geometric transforms only) and the one SiD's runs use.

class AugmentPipe:
    def __init__(self, p=1, xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0,
                 scale_std=0.2, rotate_frac_max=1, aniso_std=0.2, aniso_rotate_prob=0.5,
                 translate_frac_std=0.125):
        self.p = float(p)  # overall probability multiplier
        # per-transform multipliers (SiD: xflip=1e8 -> always a coin flip)
        self.xflip, self.yflip = float(xflip), float(yflip)
        self.scale, self.rotate_frac = float(scale), float(rotate_frac)
        self.aniso, self.translate_frac = float(aniso), float(translate_frac)
        self.scale_std = float(scale_std)  # log2 std of isotropic scaling
        self.rotate_frac_max = float(rotate_frac_max)  # rotation range, 1 = full circle
        self.aniso_std = float(aniso_std)  # log2 std of anisotropic scaling
        self.aniso_rotate_prob = float(aniso_rotate_prob)  # P(aniso acts in a rotated frame)
        self.translate_frac_std = float(translate_frac_std)  # translation std / image size

    def __call__(self, images):
        N, C, H, W = images.shape
        dev = images.device
        labels = [torch.zeros([N, 0], device=dev)]

        def gate(multiplier, w, shape):  # keep w with probability multiplier * p, else 0 (identity)
            keep = torch.rand(shape, device=dev) < multiplier * self.p
            return torch.where(keep, w, torch.zeros_like(w))

        # Flips are exact pixel operations.
        if self.xflip > 0:
            w = gate(self.xflip, torch.randint(2, [N, 1, 1, 1], device=dev), [N, 1, 1, 1])
            images = torch.where(w == 1, images.flip(3), images)
            labels.append(w)
        if self.yflip > 0:
            w = gate(self.yflip, torch.randint(2, [N, 1, 1, 1], device=dev), [N, 1, 1, 1])
            images = torch.where(w == 1, images.flip(2), images)
            labels.append(w)

        # Geometric transforms compose into one inverse matrix G_inv (output -> input
        # coordinates); the forward map applies scale, then rotation, then anisotropic scale, then
        # translation.
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
            angle = (torch.rand([N], device=dev) * 2 - 1) * (np.pi * self.rotate_frac_max)
            w = gate(self.rotate_frac, angle, [N])
            G_inv = G_inv @ _rot(w)  # inverse of a rotation by -w
            moved |= w != 0
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = torch.randn([N], device=dev)
            r = (torch.rand([N], device=dev) * 2 - 1) * np.pi
            w = gate(self.aniso, w, [N])
            rotated = torch.rand([N], device=dev) < self.aniso_rotate_prob
            r = torch.where(rotated, r, torch.zeros_like(r))
            s = w.mul(self.aniso_std).exp2()
            # the identity, up to rounding, when w = 0
            G_inv = G_inv @ _rot(-r) @ _scale(1 / s, s) @ _rot(r)
            moved |= w != 0
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = gate(self.translate_frac, torch.randn([2, N], device=dev), [1, N])
            tx = -w[0] * W * self.translate_frac_std
            ty = -w[1] * H * self.translate_frac_std
            G_inv = G_inv @ _translate(tx, ty)
            moved |= (w != 0).any(dim=0)
            labels += [w[0], w[1]]
        if G_inv is not I_3:
            # Some geometric transform is enabled; rows where none fired stay bit-exact, chosen
            # per row on the device (a whole-batch test would make the host wait for the GPU).
            images = torch.where(moved.reshape(N, 1, 1, 1), warp_images(images, G_inv), images)

        # (N, 9) for SiD's config
        labels = torch.cat([t.to(torch.float32).reshape(N, -1) for t in labels], dim=1)
        return images, labels


def edm_pipe(p):
    """The pipe of SiD's runs with augmentation probability p (SiD's --augment, EDM's
    augment_kwargs in train.py): every transform enabled, xflip=1e8 (a fair coin whatever p)."""
    return AugmentPipe(p=p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
