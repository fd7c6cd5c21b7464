"""Tests of edm_nets: structure against the official EDM configs, forwards against EDM's formulas,
preconditioning, SiDA's logits, attention layout, fp16, and the sampler against Algorithm 2."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import edm_nets
from conftest import NCSNPP, Stub, gaussian, net_inputs, perturb_copy, tiny_net

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


@pytest.mark.parametrize('name,overrides', [(n, {}) for n in edm_nets.PRESETS]
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
