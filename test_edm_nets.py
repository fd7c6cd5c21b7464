"""Tests of edm_nets: structure against the official EDM configs, forwards against EDM's formulas,
preconditioning, SiDA's logits, attention layout, fp16, and the sampler against Algorithm 2; EDM2's
network against its formulas, official state dicts and counts, and EDM2's check vector."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import edm_nets
from conftest import (EDM_PRESETS, NCSNPP, Stub, gaussian, net_inputs, perturb_copy, tiny_edm2,
                      tiny_net)

#----------------------------------------------------------------------------
# Structure against the official configs (EDM train.py presets): parameter and state-dict key
# counts of the full-size teachers, shapes only (meta device).

@pytest.mark.parametrize('name,overrides,n_params,n_keys', [
    ('cifar10-32x32-cond-vp', {}, 55_735_299, 427),
    ('cifar10-32x32-uncond-vp', {}, 55_733_891, 425),
    ('ffhq-64x64-uncond-vp', {}, 61_805_571, 553),
    ('afhqv2-64x64-uncond-vp', {}, 61_805_571, 553),
    ('imagenet-64x64-cond-adm', {}, 295_899_267, 553),
    ('cifar10-32x32-cond-vp', NCSNPP, 56_400_643, 434),
    ('ffhq-64x64-uncond-vp', NCSNPP, 62_761_091, 563)])
def test_official_config_sizes(monkeypatch, name, overrides, n_params, n_keys):
    monkeypatch.setattr(edm_nets, 'weight_init', lambda shape, **kw: torch.empty(*shape))
    with torch.device('meta'):  # shapes only: full-size SiDA logits are 8x8 for every teacher
        net, B = edm_nets.build_preset(name, **overrides), 2
        x, sigma = torch.empty(B, *net.img_shape), torch.empty(B, 1, 1, 1)
        aug, labels = torch.empty(B, 9), torch.empty(B, net.label_dim)
        D, logits = net(x, sigma, labels, aug, return_logits=True)
        assert D.shape == x.shape and logits.shape == (B, 1, 8, 8)
        assert net(x, sigma, labels, aug, encoder_only=True).shape == (B, 1, 8, 8)
    sd = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == n_params and len(sd) == n_keys
    shapes = {}
    if name == 'cifar10-32x32-cond-vp' and not overrides:
        shapes = {'model.map_label.weight': (128, 10), 'model.map_augment.weight': (128, 9),
                  'model.enc.16x16_block0.qkv.weight': (768, 256, 1, 1),
                  'model.dec.32x32_aux_conv.weight': (3, 256, 3, 3)}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert ('model.map_noise.freqs' in sd) == bool(overrides)  # NCSN++: Fourier features
    if name.startswith('imagenet'):
        assert sd['model.map_label.weight'].shape == (768, 1000)
        assert 'model.map_label.bias' not in sd
        heads = {k: m.num_heads for k, m in net.model.enc.items() if getattr(m, 'num_heads', 0)}
        assert heads['32x32_block0'] == 6 and heads['16x16_block0'] == 9
        assert heads['8x8_block0'] == 12
    with pytest.raises(ValueError, match='unknown preset'):
        edm_nets.build_preset('cifar10-32x32-uncond-ve')

#----------------------------------------------------------------------------
# The U-Nets' forwards against an independent implementation of EDM's formulas (Karras et al.
# 2022, networks.py), written here on the nets' own weights in float64: embeddings, label and
# augmentation paths, blocks, attention, resampling, skips. Tiny conditional configs with two
# levels (so down- and up-sampling run) and attention at 4x4.

def ref_group_norm(x, w, b, eps):  # min(32, C // 4) groups, biased variance
    N, C = x.shape[:2]
    g = x.reshape(N, min(32, C // 4), -1)
    g = (g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    return g.reshape(x.shape) * w[None, :, None, None] + b[None, :, None, None]


def ref_up(x):  # EDM's 2x upsampling with filter [1, 1]: nearest neighbour, gain 1
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def ref_down(x):  # EDM's 2x downsampling with filter [1, 1]: 2x2 average pooling
    return F.avg_pool2d(x, 2)


def ref_conv(p, name, x):
    w = p[f'{name}.weight']
    return F.conv2d(x, w, p.get(f'{name}.bias'), padding=w.shape[-1] // 2)


def ref_linear(p, name, x):
    bias = p.get(f'{name}.bias')
    return x @ p[f'{name}.weight'].T + (bias if bias is not None else 0)


def ref_attention(p, name, x, heads, eps):
    """EDM's UNetBlock attention: qkv channel (head*C_head + c)*3 + j holds q/k/v (j = 0/1/2)."""
    N, C, H, W = x.shape
    qkv = ref_conv(p, f'{name}.qkv', ref_group_norm(x, p[f'{name}.norm2.weight'],
                                                    p[f'{name}.norm2.bias'], eps))
    qkv = qkv.reshape(N * heads, C // heads, 3, H * W)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    w = torch.softmax(torch.einsum('ncq,nck->nqk', q, k) / math.sqrt(C // heads), dim=2)
    a = torch.einsum('nqk,nck->ncq', w, v).reshape(N, C, H, W)
    return ref_conv(p, f'{name}.proj', a)


def ref_block(p, name, x, emb, adaptive, skip_scale, eps, heads=0, resample=None):
    """EDM's UNetBlock: GN-SiLU-conv0 (resampled first), embedding (scale/shift or added), GN-SiLU,
    conv1, skip (resampled, 1x1 projection where it has weights), attention."""
    norm = lambda i, v: ref_group_norm(v, p[f'{name}.norm{i}.weight'], p[f'{name}.norm{i}.bias'],
                                       eps)
    h = F.silu(norm(0, x))
    h = ref_conv(p, f'{name}.conv0', resample(h) if resample else h)
    e = ref_linear(p, f'{name}.affine', emb)[:, :, None, None]
    if adaptive:
        scale, shift = e.chunk(2, dim=1)
        h = F.silu(shift + norm(1, h) * (scale + 1))
    else:
        h = F.silu(norm(1, h + e))
    h = ref_conv(p, f'{name}.conv1', h)
    skip = resample(x) if resample else x
    if f'{name}.skip.weight' in p:
        skip = ref_conv(p, f'{name}.skip', skip)
    x = (h + skip) * skip_scale
    if heads:
        x = (ref_attention(p, name, x, heads, eps) + x) * skip_scale
    return x


def ref_sinusoids(c_noise, channels, endpoint):
    """EDM's PositionalEmbedding: [cos(c f), sin(c f)], f_j = (1/10000)^(j / (C/2 - endpoint))."""
    j = torch.arange(channels // 2, dtype=torch.float64)
    f = (1 / 10000) ** (j / (channels // 2 - (1 if endpoint else 0)))
    return torch.cos(c_noise[:, None] * f), torch.sin(c_noise[:, None] * f)


def ref_unet(p, x, block, heads, attention_in_every_block, out_norm, out_conv, eps):
    """EDM's encoder/decoder walk for two levels with one block each and attention at 4x4: every
    encoder output is a skip, the decoder's blocks take them back in reverse order; the 4x4
    decoder's first block attends in ADM only (DDPM++: the last block of a level)."""
    skips = [ref_conv(p, 'enc.8x8_conv', x)]
    skips.append(block('enc.8x8_block0', skips[-1]))
    skips.append(block('enc.4x4_down', skips[-1], resample=ref_down))
    skips.append(block('enc.4x4_block0', skips[-1], heads=heads))
    logits = skips[-1].mean(dim=1, keepdim=True)
    h = block('dec.4x4_in1', block('dec.4x4_in0', skips[-1], heads=heads))
    h = block('dec.4x4_block0', torch.cat([h, skips.pop()], dim=1),
              heads=heads if attention_in_every_block else 0)
    h = block('dec.4x4_block1', torch.cat([h, skips.pop()], dim=1), heads=heads)
    h = block('dec.8x8_up', h, resample=ref_up)
    h = block('dec.8x8_block0', torch.cat([h, skips.pop()], dim=1))
    h = block('dec.8x8_block1', torch.cat([h, skips.pop()], dim=1))
    h = ref_group_norm(h, p[f'{out_norm}.weight'], p[f'{out_norm}.bias'], eps)
    return ref_conv(p, out_conv, F.silu(h)), logits


def ref_ddpmpp(p, x, c_noise, labels, aug):
    """EDM's SongUNet (DDPM++) for img 8, model_channels 16, channel_mult [1, 2], one block,
    attention at 4x4: embedding [sin, cos], labels * sqrt(label_dim) and augmentation labels added
    before map_layer0; every block's skip_scale sqrt(1/2), eps 1e-6, one attention head."""
    cos, sin = ref_sinusoids(c_noise, 16, endpoint=True)
    emb = torch.cat([sin, cos], dim=1)
    emb = emb + ref_linear(p, 'map_label', labels * math.sqrt(labels.shape[1]))
    emb = emb + ref_linear(p, 'map_augment', aug)
    emb = F.silu(ref_linear(p, 'map_layer1', F.silu(ref_linear(p, 'map_layer0', emb))))
    block = lambda name, x, **kw: ref_block(p, name, x, emb, False, math.sqrt(0.5), 1e-6, **kw)
    return ref_unet(p, x, block, 1, False, 'dec.8x8_aux_norm', 'dec.8x8_aux_conv', 1e-6)


def ref_adm(p, x, c_noise, labels):
    """EDM's DhariwalUNet (ADM) for img 8, model_channels 64, channel_mult [1, 2], one block,
    attention at 4x4: embedding [cos, sin], raw one-hot labels added after map_layer1 (no bias);
    scale/shift blocks, skip_scale 1, eps 1e-5, 64 channels per head, weightless resampling skips
    where the width stays."""
    emb = torch.cat(ref_sinusoids(c_noise, 64, endpoint=False), dim=1)
    emb = ref_linear(p, 'map_layer1', F.silu(ref_linear(p, 'map_layer0', emb)))
    emb = F.silu(emb + ref_linear(p, 'map_label', labels))
    block = lambda name, x, **kw: ref_block(p, name, x, emb, True, 1.0, 1e-5, **kw)
    return ref_unet(p, x, block, 2, True, 'out_norm', 'out_conv', 1e-5)


REF_NETS = {
    'ddpmpp': dict(model_type='SongUNet', model_channels=16, augment_dim=9, **{
        k: v for k, v in edm_nets.PRESETS['cifar10-32x32-cond-vp']['kwargs'].items()
        if k in ('embedding_type', 'encoder_type', 'decoder_type', 'channel_mult_noise',
                 'resample_filter')}),
    'adm': dict(model_type='DhariwalUNet', model_channels=64),
}


def ref_net(kind, seed=0, **kw):
    torch.manual_seed(seed)
    net = edm_nets.EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, channel_mult=[1, 2],
                              num_blocks=1, attn_resolutions=[4], dropout=0.0,
                              **{**REF_NETS[kind], **kw})
    return perturb_copy(net.eval(), seed, 0.2)  # every weight matters (EDM zero-inits outputs)


@pytest.mark.parametrize('kind', ['ddpmpp', 'adm'])
def test_unet_forward_matches_edm_formulas(kind):
    net = ref_net(kind)
    g = torch.Generator().manual_seed(2)
    x, c_noise = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, generator=g)
    labels = torch.eye(4)[[0, 3, 1]]  # class 0 included
    aug = torch.randn(3, 9, generator=g) if kind == 'ddpmpp' else None
    with torch.no_grad():
        out, logits = net.model(x, c_noise, labels, aug, return_logits=True)
    p = {k: v.double() for k, v in net.model.state_dict().items()}

    def reference(y):
        if kind == 'ddpmpp':
            return ref_ddpmpp(p, x.double(), c_noise.double(), y.double(), aug.double())
        return ref_adm(p, x.double(), c_noise.double(), y.double())

    ref, ref_logits = reference(labels)
    scale = ref.abs().max()
    assert scale > 0.1 and ref_logits.abs().max() > 0.1  # no path is silenced by its weights
    torch.testing.assert_close(out.double() / scale, ref / scale, atol=2e-5, rtol=0)
    torch.testing.assert_close(logits.double(), ref_logits, atol=2e-5 * scale, rtol=0)
    other = reference(labels.flip(0))[0]
    assert (other - ref).abs().max() > 0.05 * scale  # the labels matter at this tolerance


@pytest.mark.parametrize('kind', ['ddpmpp', 'adm'])
def test_label_dropout_in_training_only(kind):
    """EDM: in training each row's labels are zeroed with probability label_dropout; in eval
    never."""
    net = ref_net(kind, label_dropout=0.5)
    x, c_noise = torch.randn(64, 3, 8, 8), torch.randn(64)
    labels = torch.eye(4)[torch.arange(64) % 4]
    aug = torch.zeros(64, 9) if kind == 'ddpmpp' else None
    with torch.no_grad():
        kept, dropped = (net.model(x, c_noise, y, aug) for y in (labels, labels * 0))
        assert torch.equal(net.model(x, c_noise, labels, aug), kept)  # eval: labels always used
        net.train()  # dropout=0: training differs from eval only by the label dropout
        out = net.model(x, c_noise, labels, aug)
    is_kept = ((out - kept).flatten(1).abs().amax(1) < 1e-5)
    is_dropped = ((out - dropped).flatten(1).abs().amax(1) < 1e-5)
    assert torch.all(is_kept ^ is_dropped)  # every row is one or the other
    assert 16 <= int(is_dropped.sum()) <= 48  # about half (Binomial(64, 1/2): 5 sigma)

#----------------------------------------------------------------------------
# EDM preconditioning, SiDA's logits, attention layout, precision.

@pytest.mark.parametrize('sigma,c_skip,c_out,c_in,c_noise', [
    (2.5, 0.038462, 0.490290, 0.392232, 0.229073),
    (0.5, 0.5, 0.5 / math.sqrt(2), 1 / (0.5 * math.sqrt(2)), math.log(0.5) / 4)])
def test_precond_coefficients(sigma, c_skip, c_out, c_in, c_noise):
    """EDM Table 1 at SiD's sigma_init = 2.5 and at sigma_data; the toy's EDMPrecond(ToyMLP) shares
    them."""
    image_net = tiny_net('cifar10-32x32-uncond-vp', randomize=False)
    toy_net = edm_nets.EDMPrecond(img_resolution=0, img_channels=2, model_type='ToyMLP')
    for net, x in ((image_net, torch.randn(3, 3, 32, 32)), (toy_net, torch.randn(3, 2))):
        # the body F: a constant, its inputs recorded
        body = net.model = Stub(lambda m, x, s: torch.full_like(x, m.value))
        body.value = 0.0
        close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        D0 = net(x, torch.tensor(sigma))  # scalar sigma broadcasts
        close(D0, c_skip * x)
        close(body.calls[0]['x'], c_in * x)
        close(body.calls[0]['sigma'], torch.tensor([c_noise]))
        body.value = 1.0
        close(net(x, sigma) - D0, torch.full_like(x, c_out))


@pytest.mark.parametrize('name,overrides', [(n, {}) for n in EDM_PRESETS]
                         + [('cifar10-32x32-cond-vp', NCSNPP)])
def test_logits_and_encoder_only(name, overrides):
    net = tiny_net(name, **overrides)
    x, sigma, labels, aug = net_inputs(net)
    D, logits = net(x, sigma, labels, aug, return_logits=True)
    r = net.img_resolution >> (len(net.init_kwargs['channel_mult']) - 1)
    assert D.shape == x.shape and logits.shape == (2, 1, r, r)
    assert logits.dtype == D.dtype == torch.float32
    assert torch.equal(D, net(x, sigma, labels, aug))
    assert torch.equal(logits, net(x, sigma, labels, aug, encoder_only=True))
    feats = []  # the logits are the channel mean of the last encoder feature map
    handle = list(net.model.enc.values())[-1].register_forward_hook(
        lambda m, i, o: feats.append(o))
    net(x, sigma, labels, aug, encoder_only=True)
    handle.remove()
    torch.testing.assert_close(logits, feats[0].mean(dim=1, keepdim=True))
    net.requires_grad_(True)
    # gradients reach the mapping network and the encoder, never the decoder or the output layers
    net(x, sigma, labels, aug, encoder_only=True).square().sum().backward()
    decoder = ('model.dec.', 'model.out_')
    names = [k for k, _ in net.named_parameters()]
    assert any(k.startswith(decoder[1]) for k in names) == name.startswith('imagenet')  # ADM
    for k, p in net.named_parameters():
        assert (p.grad is None) == k.startswith(decoder), k
    if net.label_dim:  # labels None = zeros; labels and augmentation are used
        zeros = torch.zeros(2, net.label_dim)
        torch.testing.assert_close(net(x, sigma),
                                   net(x, sigma, zeros, aug * 0 if aug is not None else None))
        assert not torch.allclose(net(x, sigma, labels, aug), net(x, sigma, None, aug))


def test_attention_uses_interleaved_qkv_layout():
    torch.manual_seed(0)
    block = edm_nets.UNetBlock(64, 64, emb_channels=8, attention=True, num_heads=2)
    block = perturb_copy(block.eval(), 0, 0.3)
    x, emb, seen = torch.randn(2, 64, 4, 4), torch.randn(2, 8), {}
    block.norm2.register_forward_hook(lambda m, i, o: seen.update(h=i[0], n=o))
    y = block(x, emb)
    qkv = block.qkv(seen['n']).flatten(2)  # channel (head*C_head + c)*3 + j holds q/k/v (j = 0/1/2)
    q, k, v = (qkv[:, j::3].reshape(2, 2, 32, 16) for j in range(3))
    w = torch.softmax(torch.einsum('bhcq,bhck->bhqk', q, k) / math.sqrt(32), dim=-1)
    a = torch.einsum('bhqk,bhck->bhcq', w, v).reshape(2, 64, 4, 4)
    torch.testing.assert_close(y, block.proj(a) + seen['h'], atol=1e-5, rtol=1e-5)


def test_fp16_body_close_to_fp32():
    # fp16 has 11 mantissa bits (0.02 % per op): 1 % leaves room for a few dozen layers; an unused
    # fp16 body has the wrong dtype. fp16 convolutions are slow on CPU: a 16x16 two-level ADM.
    torch.manual_seed(0)
    net = edm_nets.EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, use_fp16=True,
                              model_type='DhariwalUNet', model_channels=64, channel_mult=[1, 2],
                              num_blocks=1, attn_resolutions=[8])
    net = perturb_copy(net.eval(), 0, 0.05)
    with torch.no_grad():
        x, sigma, labels, _ = net_inputs(net)
        ref, out = (net.model(v, sigma.log().flatten() / 4, labels) for v in (x, x.half()))
    assert out.dtype == torch.float16 and all(p.dtype == torch.float32 for p in net.parameters())
    assert ((out.float() - ref).norm() / ref.norm()) < 0.01
    # CPU: fp32, as EDM
    torch.testing.assert_close(net(x, sigma, labels), net(x, sigma, labels, force_fp32=True),
                               rtol=0, atol=0)

#----------------------------------------------------------------------------
# The EDM sampler (Karras et al. 2022, Algorithm 2): Heun's second order on the probability-flow
# ODE, and the stochastic churn step by step against the paper's algorithm.

def test_edm_sampler_heun_matches_ode_solution():
    """For data N(mu, s^2) the probability-flow ODE maps x_T to
    mu + (x_T - mu) sqrt(s^2 + t^2)/sqrt(s^2 + T^2)."""
    mu, s = 0.7, 0.3
    den = gaussian(mu, s)
    z = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    x = edm_nets.edm_sampler(den, z)
    assert x.dtype == torch.float64 and len(den.calls) == 35  # 18 steps, the last plain Euler
    sigmas = [float(c['sigma']) for c in den.calls]
    np.testing.assert_allclose(sorted(set(sigmas), reverse=True)[:4] + [min(sigmas)],
                               [80, 57.586, 40.786, 28.375, 0.002], rtol=1e-4)
    exact = mu + (80 * z.double() - mu) * s / math.sqrt(s ** 2 + 80 ** 2)
    err18, err50, err200 = ((edm_nets.edm_sampler(den, z, num_steps=n) - exact).abs().max()
                            for n in (18, 50, 200))
    # second order
    assert err18 < 0.1 and err50 < err18 / 6 and err200 < err50 / 12, (err18, err50, err200)
    # churn (EDM's ImageNet setting) keeps the distribution
    g, den = torch.Generator().manual_seed(1), gaussian(-0.4, 0.5)
    x = edm_nets.edm_sampler(den, torch.randn(20000, 1, 1, 1, generator=g), num_steps=256,
                             S_churn=40, S_min=0.05, S_max=50, S_noise=1.003,
                             randn_like=lambda t: torch.randn(t.shape, dtype=t.dtype, generator=g))
    assert len(den.calls) == 511 and abs(x.mean() + 0.4) < 0.02 and abs(x.std() / 0.5 - 1) < 0.02


def algorithm_2(D, latents, t, eps, S_churn, S_min, S_max, S_noise):
    """Karras et al. 2022, Algorithm 2, in numpy float64 on time steps t_0 > ... > t_N = 0 and the
    noises eps_i (one per step, drawn whether used or not): -> (x_N, noise levels D was called
    at)."""
    N, x, seen = len(t) - 1, latents * t[0], []
    for i in range(N):
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_min <= t[i] <= S_max else 0.0
        t_hat = t[i] + gamma * t[i]
        x_hat = x + math.sqrt(t_hat ** 2 - t[i] ** 2) * S_noise * eps[i]
        seen.append(t_hat)
        d = (x_hat - D(x_hat, t_hat)) / t_hat
        x = x_hat + (t[i + 1] - t_hat) * d
        if t[i + 1] != 0:
            seen.append(t[i + 1])
            d_prime = (x - D(x, t[i + 1])) / t[i + 1]
            x = x_hat + (t[i + 1] - t_hat) * (d / 2 + d_prime / 2)
    return x, seen


@pytest.mark.parametrize('S_churn,S_min,S_max,S_noise', [
    (2.0, 0.5, 't2', 1.007),  # gamma = S_churn/N < sqrt 2 - 1, only for t in [S_min, S_max]
    (40.0, 0.0, float('inf'), 1.0)])  # gamma clamped at sqrt 2 - 1 on every step
def test_edm_sampler_churn_matches_algorithm_2(S_churn, S_min, S_max, S_noise):
    N, mu, s, rho = 8, 0.3, 0.6, 7
    i = np.arange(N)
    t = (80 ** (1 / rho) + i / (N - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    t = np.append(t, 0.0)  # EDM's time steps (Eq. 5), t_N = 0
    z = torch.randn(500, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    den, g, noises = gaussian(mu, s), torch.Generator().manual_seed(1), []

    def randn_like(x):
        noises.append(torch.randn(x.shape, dtype=x.dtype, generator=g))
        return noises[-1]

    edm_nets.edm_sampler(den, z, num_steps=N, randn_like=randn_like)  # no churn
    steps = [float(c['sigma']) for c in den.calls[::2]] + [0.0]  # the sampler's t_i
    np.testing.assert_allclose(steps, t, rtol=1e-12)
    if S_max == 't2':  # S_max exactly at the sampler's t_2: the range is closed
        S_max = steps[2]
    den.calls.clear()
    noises.clear()
    x = edm_nets.edm_sampler(den, z, num_steps=N, S_churn=S_churn, S_min=S_min, S_max=S_max,
                             S_noise=S_noise, randn_like=randn_like)
    D = lambda v, sigma: mu + s ** 2 / (s ** 2 + sigma ** 2) * (v - mu)
    eps = [e.numpy() for e in noises]
    ref, seen = algorithm_2(D, z.double().numpy(), steps, eps, S_churn, S_min, S_max, S_noise)
    assert len(noises) == N  # one draw per step, used or not (EDM keeps its random stream)
    np.testing.assert_allclose([float(c['sigma']) for c in den.calls], seen, rtol=1e-12)
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-10, atol=1e-10)
    churned = [t_hat > t_i for t_hat, t_i in zip(seen[::2], steps)]
    # t_i = 80, 35.0, 13.7, 4.64, 1.29, 0.267, 0.0352, 0.002
    in_range = [False, False, True, True, True, False, False, False]
    assert churned == (in_range if S_min else [True] * N)

#----------------------------------------------------------------------------
# EDM2 (Karras et al. 2024): the layers against the paper's formulas computed here independently,
# magnitude preservation, forced weight normalisation (and SiDA's two calls before one backward),
# the preconditioning, state-dict keys/shapes/counts of the six official sizes, EDM2's numerical
# check vector (deterministic XS weights) and SiDA's encoder logits.
#
# Independent computations of the paper's formulas (plain tensor algebra, none of edm_nets'
# functions): unit-RMS rows, MP-SiLU/Sum/Cat, the weight-normalised conv and one block.

EPS = 1e-4  # EDM2's normalisation eps


def unit_rms(w):
    """Each slice w[i] divided by (eps + sqrt(mean(w[i]^2)))."""
    rms = w.reshape(w.shape[0], -1).pow(2).mean(1).sqrt()
    return w / (EPS + rms.reshape(-1, *[1] * (w.ndim - 1)))


def pixel_norm(x):
    return x / (EPS + x.pow(2).mean(1, keepdim=True).sqrt())


def silu_mp(x):
    return x * torch.sigmoid(x) / 0.596


def sum_mp(a, b, t):
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t ** 2)


def cat_mp(a, b, t):
    Na, Nb = a.shape[1], b.shape[1]
    K = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (K * (1 - t) / math.sqrt(Na)), b * (K * t / math.sqrt(Nb))], 1)


def conv_mp(x, w, gain=1.0):
    """y = conv(x, gain * unit_rms(w) / sqrt(fan_in)); 2-D weights act as x @ W^T."""
    fan_in = w[0].numel()
    wn = unit_rms(w) * gain / math.sqrt(fan_in)
    if w.ndim == 2:
        return x @ wn.T
    return F.conv2d(x, wn, padding=w.shape[-1] // 2)


def down2(x):
    N, C, H, W = x.shape
    return x.reshape(N, C, H // 2, 2, W // 2, 2).mean((3, 5))


def up2(x):
    return x.repeat_interleave(2, 2).repeat_interleave(2, 3)


def attention_ref(x, w_qkv, w_proj, heads):
    """Cosine attention: q, k, v unit-RMS over each head's channels, softmax(q.k / sqrt(c)) v."""
    N, C, H, W = x.shape
    c = C // heads
    y = conv_mp(x, w_qkv).reshape(N, heads, c, 3, H * W)
    y = y / (EPS + y.pow(2).mean(2, keepdim=True).sqrt())
    q, k, v = y[:, :, :, 0], y[:, :, :, 1], y[:, :, :, 2]
    a = torch.einsum('nhcq,nhck->nhqk', q, k) / math.sqrt(c)
    out = torch.einsum('nhqk,nhck->nhcq', a.softmax(-1), v)
    return conv_mp(out.reshape(N, C, H, W), w_proj)


def block_ref(blk, x, emb, flavor, resample, clip):
    """One EDM2 block from the paper's description, with blk's weights."""
    if resample == 'down':
        x = down2(x)
    if resample == 'up':
        x = up2(x)
    if flavor == 'enc':
        if blk.conv_skip is not None:
            x = conv_mp(x, blk.conv_skip.weight)
        x = pixel_norm(x)
    y = conv_mp(silu_mp(x), blk.conv_res0.weight)
    c = conv_mp(emb, blk.emb_linear.weight, gain=blk.emb_gain) + 1
    y = silu_mp(y * c[:, :, None, None])
    y = conv_mp(y, blk.conv_res1.weight)
    if flavor == 'dec' and blk.conv_skip is not None:
        x = conv_mp(x, blk.conv_skip.weight)
    x = sum_mp(x, y, 0.3)
    if blk.attn_qkv is not None:
        y = attention_ref(x, blk.attn_qkv.weight, blk.attn_proj.weight, blk.num_heads)
        x = sum_mp(x, y, 0.3)
    return x.clamp(-clip, clip)


#----------------------------------------------------------------------------
# Config G fixed-function layers, the normalisation, and the weight-normalised layer.

def test_mp_silu_constant_is_the_rms_of_silu_on_a_unit_gaussian():
    z = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    density = torch.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi)
    rms = torch.trapezoid((z * torch.sigmoid(z)) ** 2 * density, z).sqrt().item()
    assert abs(rms - 0.596) < 5e-4  # 0.596 is sqrt(E[silu(z)^2]) = 0.59647 rounded


def test_mp_layers_equal_their_formulas():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 5, 4, 4, generator=g)
    b = torch.randn(3, 5, 4, 4, generator=g)
    c = torch.randn(3, 7, 4, 4, generator=g)
    torch.testing.assert_close(edm_nets.mp_silu(a), silu_mp(a))
    for t in (0.3, 0.5, 0.8):
        torch.testing.assert_close(edm_nets.mp_sum(a, b, t=t), sum_mp(a, b, t))
        torch.testing.assert_close(edm_nets.mp_cat(a, c, t=t), cat_mp(a, c, t))
    ones = torch.ones(1)
    # EDM2's denominators
    assert abs(1 / edm_nets.mp_sum(ones, ones, t=0.3).item() - 0.7615773) < 1e-6
    assert abs(1 / edm_nets.mp_sum(ones, ones, t=0.5).item() - 0.7071068) < 1e-6
    torch.testing.assert_close(edm_nets.normalize(a, dim=1), pixel_norm(a))
    torch.testing.assert_close(edm_nets.normalize(c), unit_rms(c))
    torch.testing.assert_close(edm_nets.resample(a, 'down'), down2(a))
    torch.testing.assert_close(edm_nets.resample(a, 'up'), up2(a))


def test_mp_fourier_equals_its_formula():
    f = edm_nets.MPFourier(64, bandwidth=2)
    x = torch.tensor([0.3, -1.2, 2.0])
    ref = math.sqrt(2) * torch.cos(x[:, None] * f.freqs[None] + f.phases[None])
    torch.testing.assert_close(f(x), ref)


@pytest.mark.parametrize('kernel', [[], [1, 1], [3, 3]])
def test_mpconv_equals_weight_normalised_conv(kernel):
    torch.manual_seed(2)
    conv = edm_nets.MPConv(6, 5, kernel).eval()
    x = torch.randn(2, 6) if kernel == [] else torch.randn(2, 6, 7, 7)
    w0 = conv.weight.detach().clone()
    for gain in (1.0, torch.tensor(-0.37)):
        torch.testing.assert_close(conv(x, gain=gain), conv_mp(x, w0, gain))
    assert torch.equal(conv.weight, w0)  # eval mode never writes the weight

#----------------------------------------------------------------------------
# Magnitude preservation: unit-variance inputs give unit mean-square outputs. The tolerance is 5
# standard errors of the mean over B independent draws (measured from the draws themselves), plus
# the rounding of a constant where one is rounded (MP-SiLU's 0.596: 2 * 0.0005 / 0.596 < 2e-3).

B = 64


def assert_unit_mean_square(ms, extra=0.0):
    """ms: the mean square of the output of each of B independent draws."""
    se = ms.std() / math.sqrt(len(ms))
    assert abs(ms.mean().item() - 1) < 5 * se.item() + extra, (ms.mean().item(), se.item())


def test_magnitude_preservation():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, 32, 9, 9, generator=g)
    y = torch.randn(B, 32, 9, 9, generator=g)
    z = torch.randn(B, 8, 9, 9, generator=g)
    assert_unit_mean_square(edm_nets.mp_silu(x).pow(2).mean((1, 2, 3)), extra=2e-3)
    assert_unit_mean_square(edm_nets.mp_sum(x, y, t=0.3).pow(2).mean((1, 2, 3)))
    assert_unit_mean_square(edm_nets.mp_cat(x, z, t=0.3).pow(2).mean((1, 2, 3)))
    pix = edm_nets.normalize(x, dim=1).pow(2).mean((1, 2, 3))
    assert_unit_mean_square(pix, extra=3 * EPS)  # exactly 1 / (1 + eps / rms)^2 per pixel
    ms_lin = []
    ms_conv = []
    ms_four = []
    for i in range(B):  # a fresh layer per draw: the claim is over random weights and inputs
        torch.manual_seed(100 + i)
        lin = edm_nets.MPConv(256, 16, kernel=[]).eval()
        conv = edm_nets.MPConv(32, 16, kernel=[3, 3]).eval()
        four = edm_nets.MPFourier(256)
        ms_lin.append(lin(torch.randn(4, 256)).pow(2).mean())
        # the interior only: zero padding feeds border outputs fewer unit-variance inputs
        ms_conv.append(conv(x[i:i + 1])[:, :, 1:-1, 1:-1].pow(2).mean())
        ms_four.append(four(torch.randn(4)).pow(2).mean())
    assert_unit_mean_square(torch.stack(ms_lin))
    assert_unit_mean_square(torch.stack(ms_conv))
    assert_unit_mean_square(torch.stack(ms_four))

#----------------------------------------------------------------------------
# Config E, forced weight normalisation, and SiDA's fake-score step (two training-mode calls
# before one backward, which fails autograd's in-place check with EDM2's write-on-every-call).

def weights(net):
    return {n: m.weight.detach().clone() for n, m in net.named_modules()
            if isinstance(m, edm_nets.MPConv)}


def test_forced_weight_normalisation_writes_unit_rms_rows_in_training_only():
    torch.manual_seed(4)
    conv = edm_nets.MPConv(6, 5, [3, 3])
    w0 = conv.weight.detach().clone()
    conv.force_normalize_()
    torch.testing.assert_close(conv.weight.detach(), unit_rms(w0))
    x = torch.randn(2, 4, 16, 16)
    for force in (True, False):
        net = tiny_edm2(force_normalization=force)
        before = weights(net)
        assert all(not torch.allclose(w, unit_rms(w), atol=1e-3) for w in before.values())
        net.eval()(x, 1.0)
        assert all(torch.equal(w, before[n]) for n, w in weights(net).items())  # eval: no write
        net.train()(x, 1.0)
        for n, w in weights(net).items():
            if force:
                torch.testing.assert_close(w, unit_rms(before[n]))  # every MPConv, logvar included
            else:
                assert torch.equal(w, before[n])


def test_two_training_calls_before_one_backward_and_renormalisation_after_a_step():
    net = tiny_edm2(dropout=0.0).train()
    x1 = torch.randn(2, 4, 16, 16)
    x2 = torch.randn(2, 4, 16, 16)
    w = net.unet.enc['16x16_block0'].conv_res0.weight
    (net(x1, 1.0).square().sum() + net(x2, 2.0).square().sum()).backward()  # 2nd call: no write
    g_both = w.grad.clone()
    net.zero_grad(set_to_none=True)
    net(x1, 1.0).square().sum().backward()
    g_1 = w.grad.clone()
    net.zero_grad(set_to_none=True)
    net(x2, 2.0).square().sum().backward()
    torch.testing.assert_close(g_both, g_1 + w.grad)  # both calls saw the same weights
    torch.optim.SGD(net.parameters(), lr=10.0).step()
    moved = weights(net)
    assert not torch.allclose(w, unit_rms(w), atol=1e-3)
    stepped = {n for n, m in net.named_modules() if isinstance(m, edm_nets.MPConv) and
               m.weight.grad is not None}
    assert 'logvar_linear' not in stepped  # no gradient, so SGD left it alone
    net(x1, 1.0)  # the first call after a step projects the updated weights back, only those
    for n, w_n in weights(net).items():
        if n in stepped:
            torch.testing.assert_close(w_n, unit_rms(moved[n]))
        else:
            assert torch.equal(w_n, moved[n])
    loaded = {k: v * 2 for k, v in net.state_dict().items()}
    net.load_state_dict(loaded)
    net(x1, 1.0)  # and so does the first call after a load
    key = 'unet.enc.16x16_block0.conv_res0.weight'
    torch.testing.assert_close(w.detach(), unit_rms(loaded[key]))


def test_sida_fake_score_step_runs_in_training_mode():
    net = tiny_edm2().train()
    x_g = torch.randn(3, 4, 16, 16)
    x_r = torch.randn(3, 4, 16, 16)
    sigma = torch.tensor([0.3, 1.0, 4.0])
    labels = F.one_hot(torch.tensor([1, 2, 3]), 10).float()
    D_x, logits_fake, logvar = net(x_g, sigma, labels, return_logits=True, return_logvar=True)
    logits_real, _ = net(x_r, sigma, labels, encoder_only=True, return_logvar=True)
    loss = (D_x - x_g).square().sum() + logits_fake.sum() - logits_real.sum() + logvar.sum()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
    for m in net.modules():
        if isinstance(m, edm_nets.MPConv):
            torch.testing.assert_close(m.weight.detach(), unit_rms(m.weight.detach()),
                                       atol=1e-3, rtol=1e-3)  # normalised (to O(eps))

#----------------------------------------------------------------------------
# One block (Configs C-G) against block_ref, and the preconditioning's coefficients.

@pytest.mark.parametrize('flavor, resample, cin, cout, attention, clip', [
    ('enc', 'down', 16, 32, True, 256),    # skip conv before the pixel norm, 2 heads
    ('enc', 'keep', 32, 32, False, 0.5),   # no skip conv; the clip is active
    ('dec', 'up', 48, 32, True, 256),      # skip conv after the residual branch
    ('dec', 'keep', 32, 32, False, 256),
])
def test_block_equals_its_formulas(flavor, resample, cin, cout, attention, clip):
    torch.manual_seed(6)
    blk = edm_nets.EDM2Block(cin, cout, emb_channels=24, flavor=flavor, resample_mode=resample,
                       attention=attention, channels_per_head=16, clip_act=clip).eval()
    with torch.no_grad():
        blk.emb_gain.fill_(0.8)
    x = torch.randn(2, cin, 8, 8)
    emb = torch.randn(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(blk(x, emb), block_ref(blk, x, emb, flavor, resample, clip),
                                   rtol=1e-5, atol=1e-5)
    assert (blk.conv_skip is not None) == (cin != cout)
    assert (blk.num_heads, blk.attn_qkv is not None) == ((2, True) if attention else (0, False))


def unet_ref(unet, x, c_noise, labels):
    """The tiny U-Net (levels 16 and 8, one block per level) wired by hand from the paper: Fourier
    and label embeddings, the ones channel, the skips popped in reverse, out_conv with out_gain."""
    phase = c_noise[:, None] * unet.emb_fourier.freqs + unet.emb_fourier.phases
    emb = conv_mp(math.sqrt(2) * torch.cos(phase), unet.emb_noise.weight)
    emb = sum_mp(emb, conv_mp(labels * math.sqrt(10), unet.emb_label.weight), 0.5)
    emb = silu_mp(emb)
    x = conv_mp(torch.cat([x, torch.ones_like(x[:, :1])], 1), unet.enc['16x16_conv'].weight)
    skips = [x]
    for name, resample in (('16x16_block0', 'keep'), ('8x8_down', 'down'), ('8x8_block0', 'keep')):
        x = block_ref(unet.enc[name], x, emb, 'enc', resample, 256)
        skips.append(x)
    x = block_ref(unet.dec['8x8_in0'], x, emb, 'dec', 'keep', 256)
    x = block_ref(unet.dec['8x8_in1'], x, emb, 'dec', 'keep', 256)
    for name in ('8x8_block0', '8x8_block1', '16x16_up', '16x16_block0', '16x16_block1'):
        if 'block' in name:
            x = cat_mp(x, skips.pop(), 0.5)
        x = block_ref(unet.dec[name], x, emb, 'dec', 'up' if 'up' in name else 'keep', 256)
    return conv_mp(x, unet.out_conv.weight, gain=unet.out_gain)


def test_unet_equals_its_wiring():
    net = tiny_edm2(use_fp16=False).eval()
    x = torch.randn(2, 4, 16, 16)
    c_noise = torch.tensor([-0.4, 0.3])
    labels = F.one_hot(torch.tensor([3, 8]), 10).float()
    with torch.no_grad():
        F_x = net.unet(x, c_noise, labels)
        ref = unet_ref(net.unet, x, c_noise, labels)
    torch.testing.assert_close(F_x, ref, rtol=1e-5, atol=1e-5)


class RecordingUNet(torch.nn.Module):
    """F(x_in; c_noise) = 0.25 (a constant): D = c_skip x + c_out / 4. Records the inputs."""
    def forward(self, x, noise_labels, class_labels, return_logits=False, encoder_only=False):
        self.seen = (x, noise_labels, class_labels)
        return torch.full_like(x, 0.25)


def test_preconditioning_coefficients():
    net = tiny_edm2()
    net.unet = RecordingUNet()
    sigma = torch.tensor([0.002, 0.5, 2.5, 80.0])
    sd = 0.5
    x = torch.randn(4, 4, 16, 16)
    D_x = net(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1).double()
    c_skip = sd ** 2 / (s ** 2 + sd ** 2)
    c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
    c_in = 1 / (s ** 2 + sd ** 2).sqrt()
    torch.testing.assert_close(D_x.double(), c_skip * x.double() + c_out * 0.25)
    x_in, c_noise, labels = net.unet.seen
    torch.testing.assert_close(x_in.double(), c_in * x.double())
    torch.testing.assert_close(c_noise.double(), sigma.double().log() / 4)
    assert labels.shape == (1, 10) and labels.abs().sum() == 0  # no labels: zeros, broadcast
    # EDM2's check values at the generator's input level sigma = 2.5
    D = net(torch.zeros(1, 4, 16, 16), 2.5)
    assert abs(D[0, 0, 0, 0].item() * 4 - 0.4902903) < 1e-6  # c_out
    D = net(torch.ones(1, 4, 16, 16), 2.5)
    assert abs(D[0, 0, 0, 0].item() - 0.4902903 / 4 - 0.0384615) < 1e-6  # + c_skip
    assert abs(net.unet.seen[0][0, 0, 0, 0].item() - 0.3922323) < 1e-6  # c_in
    assert abs(net.unet.seen[1].item() - 0.2290727) < 1e-6  # c_noise


def test_bad_calls_are_refused():
    net = tiny_edm2()
    x = torch.randn(1, 4, 16, 16)
    with pytest.raises(ValueError, match='augmentation'):
        net(x, 1.0, augment_labels=torch.zeros(1, 9))
    with pytest.raises(ValueError, match='logvar'):
        tiny_edm2(logvar_channels=0)(x, 1.0, return_logvar=True)
    with pytest.raises(ValueError, match='unknown preset'):
        edm_nets.build_preset('edm2-img512-xxxl')
    with pytest.raises(ValueError, match='model_type'):
        edm_nets.EDM2Precond(16, 4, model_type='SongUNet')

#----------------------------------------------------------------------------
# State dicts of the six official sizes: keys, shapes and order as EDM2's Precond (203 entries) and
# the SiD/SiDA generator (its first 200, unet.* only); parameter counts as measured on the official
# classes. The expected entries are written here from EDM2's layer tables, not from edm2_draft.

OFFICIAL = {  # size: (model_channels, Precond parameters, generator parameters)
    'xs': (128, 124_713_253, 124_713_125),
    's': (192, 280_212_837, 280_212_709),
    'm': (256, 497_807_781, 497_807_653),
    'l': (320, 777_498_085, 777_497_957),
    'xl': (384, 1_119_283_749, 1_119_283_621),
    'xxl': (448, 1_523_164_773, 1_523_164_645),
}
DEC_IN = {8: [8, 8, 8, 7], 16: [7, 6, 6, 5], 32: [5, 4, 4, 3], 64: [3, 2, 2, 2]}  # x C


def official_entries(C):
    E = 4 * C
    width = {64: C, 32: 2 * C, 16: 3 * C, 8: 4 * C}
    rows = [('unet.out_gain', []), ('unet.emb_fourier.freqs', [C]),
            ('unet.emb_fourier.phases', [C]), ('unet.emb_noise.weight', [E, C]),
            ('unet.emb_label.weight', [E, 1000]), ('unet.enc.64x64_conv.weight', [C, 5, 3, 3])]

    def block(name, cin, cout, flavor, attn):
        rows.append((f'{name}.emb_gain', []))
        rows.append((f'{name}.conv_res0.weight', [cout, cout if flavor == 'enc' else cin, 3, 3]))
        rows.append((f'{name}.emb_linear.weight', [cout, E]))
        rows.append((f'{name}.conv_res1.weight', [cout, cout, 3, 3]))
        if cin != cout:
            rows.append((f'{name}.conv_skip.weight', [cout, cin, 1, 1]))
        if attn:
            rows.append((f'{name}.attn_qkv.weight', [3 * cout, cout, 1, 1]))
            rows.append((f'{name}.attn_proj.weight', [cout, cout, 1, 1]))

    c = C
    for r in (64, 32, 16, 8):
        if r != 64:
            block(f'unet.enc.{r}x{r}_down', c, c, 'enc', False)
        for i in range(3):
            block(f'unet.enc.{r}x{r}_block{i}', c, width[r], 'enc', r <= 16)
            c = width[r]
    block('unet.dec.8x8_in0', 4 * C, 4 * C, 'dec', True)
    block('unet.dec.8x8_in1', 4 * C, 4 * C, 'dec', False)
    for r in (8, 16, 32, 64):
        if r != 8:
            block(f'unet.dec.{r}x{r}_up', width[r // 2], width[r // 2], 'dec', False)
        for i in range(4):
            block(f'unet.dec.{r}x{r}_block{i}', DEC_IN[r][i] * C, width[r], 'dec', r <= 16)
    rows.append(('unet.out_conv.weight', [4, C, 3, 3]))
    rows += [('logvar_fourier.freqs', [128]), ('logvar_fourier.phases', [128]),
             ('logvar_linear.weight', [1, 128])]
    return rows


@pytest.mark.parametrize('size', list(OFFICIAL))
def test_state_dict_and_parameter_counts_equal_the_official_ones(size):
    C, n_precond, n_generator = OFFICIAL[size]
    with torch.device('meta'):
        net = edm_nets.build_preset(f'edm2-img512-{size}')
        G = edm_nets.build_preset(f'edm2-img512-{size}', logvar_channels=0)
    ours = [(k, list(v.shape)) for k, v in net.state_dict().items()]
    assert len(ours) == 203
    assert ours == official_entries(C)
    assert [(k, list(v.shape)) for k, v in G.state_dict().items()] == ours[:200]
    assert sum(p.numel() for p in net.parameters()) == n_precond
    assert sum(p.numel() for p in G.parameters()) == n_generator
    assert sum(b.numel() for b in net.buffers()) == 2 * C + 256
    assert sum(b.numel() for b in G.buffers()) == 2 * C
    if size == 'xs':  # EDM2's concrete examples
        sd = net.state_dict()
        assert list(sd['unet.enc.16x16_block0.attn_qkv.weight'].shape) == [1152, 384, 1, 1]
        assert list(sd['unet.dec.8x8_block3.conv_res0.weight'].shape) == [512, 896, 3, 3]
        assert list(sd['unet.dec.64x64_block0.conv_skip.weight'].shape) == [128, 384, 1, 1]


def test_generator_takes_the_teachers_unet_strictly_and_gives_the_same_output():
    f_phi = tiny_edm2().eval()
    G = tiny_edm2(logvar_channels=0).eval()
    unet_only = {k: v for k, v in f_phi.state_dict().items() if k.startswith('unet.')}
    G.load_state_dict(unet_only, strict=True)
    x = torch.randn(2, 4, 16, 16)
    labels = F.one_hot(torch.tensor([0, 9]), 10).float()
    with torch.no_grad():
        assert torch.equal(G(x, 2.5, labels), f_phi(x, 2.5, labels))

#----------------------------------------------------------------------------
# EDM2's numerical check vector: XS in fp32, eval mode, state-dict entry i (buffers included, in
# EDM2's order) filled with sin(0.001 j + i + 1) over its flat index j; x_j = 2.5 cos(0.01 j);
# class 3. These smooth weights drive many activations into the +-256 clip, so the vector is blind
# to some changes (e.g. zeros for the ones channel); test_unet_equals_its_wiring covers those.

def test_xs_check_vector():
    torch.manual_seed(0)
    net = edm_nets.build_preset('edm2-img512-xs', use_fp16=False).eval()
    with torch.no_grad():
        for i, v in enumerate(net.state_dict().values()):
            j = torch.arange(v.numel(), dtype=torch.float64)
            v.copy_(torch.sin(0.001 * j + i + 1).to(torch.float32).reshape(v.shape))
        x = 2.5 * torch.cos(0.01 * torch.arange(4 * 64 * 64, dtype=torch.float64))
        x = x.to(torch.float32).reshape(1, 4, 64, 64)
        c = F.one_hot(torch.tensor([3]), 1000).float()
        D_x, logits, logvar = net(x, 2.5, c, return_logits=True, return_logvar=True)
        D_low = net(x, 0.5, c)
    rel = dict(rel_tol=1e-5)
    assert math.isclose(D_x.sum().item(), -592137.875, **rel)
    assert math.isclose(D_x.abs().mean().item(), 75.936615, **rel)
    for got, want in zip(D_x[0, 0, 0, :4].tolist(), [36.08197, 54.12612, 54.12610, 54.12608]):
        assert math.isclose(got, want, **rel)
    assert logits.shape == (1, 1, 8, 8)
    assert math.isclose(logits.mean().item(), 12.848519, **rel)
    for got, want in zip(logits[0, 0, 0, :4].tolist(), [6.550877, 11.084340, 11.925411, 11.975816]):
        assert math.isclose(got, want, **rel)
    assert math.isclose(logvar.item(), 10.653071, **rel)
    assert math.isclose(D_low.sum().item(), -426942.34, **rel)
    assert math.isclose(D_low.abs().mean().item(), 54.753784, **rel)

#----------------------------------------------------------------------------
# SiDA's discriminator on EDM2: the channel mean of the last encoder block's output.

def test_sida_logits_shapes_and_encoder_only():
    net = tiny_edm2().eval()
    x = torch.randn(3, 4, 16, 16)
    labels = F.one_hot(torch.tensor([1, 4, 7]), 10).float()
    calls = []
    for name, m in net.unet.named_modules():
        if name.startswith('dec.') or name == 'out_conv':
            m.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    last = list(net.unet.enc.values())[-1]
    feats = []
    last.register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        logits = net(x, 1.3, labels, encoder_only=True)
        assert calls == []
        D_x, logits_2 = net(x, 1.3, labels, return_logits=True)
        assert 'out_conv' in calls and any(c.startswith('dec.') for c in calls)
        assert torch.equal(D_x, net(x, 1.3, labels))
    assert logits.shape == (3, 1, 8, 8) and logits.dtype == torch.float32
    assert torch.equal(logits, logits_2)
    torch.testing.assert_close(logits, feats[0].mean(1, keepdim=True))


def test_sida_logits_gradient_reaches_only_the_encoder():
    net = tiny_edm2().train()
    x = torch.randn(2, 4, 16, 16)
    labels = F.one_hot(torch.tensor([2, 5]), 10).float()
    encoder = ('unet.enc.', 'unet.emb_')
    net(x, 0.8, labels, encoder_only=True).square().sum().backward()
    for name, p in net.named_parameters():
        if name.startswith(encoder):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    net.zero_grad(set_to_none=True)
    net(x, 0.8, labels).square().sum().backward()  # control: D's gradient does reach the decoder
    for name, p in net.named_parameters():
        if not name.startswith('logvar_'):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_edm2_blocks_are_checkpointed_and_compiled_regionally():
    """checkpoint_blocks and compile_blocks reach EDM2's blocks (forward(x, emb), as EDM's); the
    checkpointed net gives the same outputs and gradients, and its re-runs write no weight."""
    net = tiny_edm2(dropout=0.0).train()
    ref = tiny_edm2(dropout=0.0).train()
    edm_nets.checkpoint_blocks(net)
    blocks = [m for m in net.modules() if isinstance(m, edm_nets.EDM2Block)]
    assert len(blocks) == 10 and all('forward' in vars(m) for m in blocks)
    x, labels = torch.randn(2, 4, 16, 16), torch.eye(10)[[1, 2]]
    for n in (net, ref):
        loss = n(x, 0.7, labels).square().sum()
        versions = [p._version for p in n.parameters()]
        loss.backward()  # the checkpointed blocks run again here
        assert [p._version for p in n.parameters()] == versions
    for (k, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=k)
    compiled = edm_nets.compile_blocks(tiny_edm2())  # wraps the call; compiles on first use
    assert all(m._compiled_call_impl is not None for m in compiled.modules()
               if isinstance(m, edm_nets.EDM2Block))
