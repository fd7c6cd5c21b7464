"""Tests of edm2_draft.py: EDM2's layers against the paper's formulas computed here independently,
magnitude preservation, forced weight normalisation (and SiDA's two calls before one backward),
the preconditioning, state-dict keys/shapes/counts of the six official sizes, EDM2's numerical check
vector (deterministic XS weights) and SiDA's encoder logits."""
import math

import pytest
import torch
import torch.nn.functional as F

import edm2_draft as e2

EPS = 1e-4  # EDM2's normalisation eps

#----------------------------------------------------------------------------
# Independent computations of the paper's formulas (plain tensor algebra, none of edm2_draft's
# functions): unit-RMS rows, MP-SiLU/Sum/Cat, the weight-normalised conv and one block.

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


def tiny(**kw):
    """A tiny EDM2 net: 16x16x4 inputs, levels 16 and 8 (so SiDA's logits are 8x8), 10 classes,
    attention at 8x8 with 2 heads of 16 channels, and every gain made non-zero."""
    args = dict(img_resolution=16, img_channels=4, label_dim=10, use_fp16=False,
                model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                channels_per_head=16, logvar_channels=8)
    torch.manual_seed(0)
    net = e2.EDM2Precond(**{**args, **kw})
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    return net

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
    torch.testing.assert_close(e2.mp_silu(a), silu_mp(a))
    for t in (0.3, 0.5, 0.8):
        torch.testing.assert_close(e2.mp_sum(a, b, t=t), sum_mp(a, b, t))
        torch.testing.assert_close(e2.mp_cat(a, c, t=t), cat_mp(a, c, t))
    ones = torch.ones(1)
    assert abs(1 / e2.mp_sum(ones, ones, t=0.3).item() - 0.7615773) < 1e-6  # EDM2's denominators
    assert abs(1 / e2.mp_sum(ones, ones, t=0.5).item() - 0.7071068) < 1e-6
    torch.testing.assert_close(e2.normalize(a, dim=1), pixel_norm(a))
    torch.testing.assert_close(e2.normalize(c), unit_rms(c))
    torch.testing.assert_close(e2.resample(a, 'down'), down2(a))
    torch.testing.assert_close(e2.resample(a, 'up'), up2(a))


def test_mp_fourier_equals_its_formula():
    f = e2.MPFourier(64, bandwidth=2)
    x = torch.tensor([0.3, -1.2, 2.0])
    ref = math.sqrt(2) * torch.cos(x[:, None] * f.freqs[None] + f.phases[None])
    torch.testing.assert_close(f(x), ref)


@pytest.mark.parametrize('kernel', [[], [1, 1], [3, 3]])
def test_mpconv_equals_weight_normalised_conv(kernel):
    torch.manual_seed(2)
    conv = e2.MPConv(6, 5, kernel).eval()
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
    assert_unit_mean_square(e2.mp_silu(x).pow(2).mean((1, 2, 3)), extra=2e-3)
    assert_unit_mean_square(e2.mp_sum(x, y, t=0.3).pow(2).mean((1, 2, 3)))
    assert_unit_mean_square(e2.mp_cat(x, z, t=0.3).pow(2).mean((1, 2, 3)))
    pix = e2.normalize(x, dim=1).pow(2).mean((1, 2, 3))
    assert_unit_mean_square(pix, extra=3 * EPS)  # exactly 1 / (1 + eps / rms)^2 per pixel
    ms_lin = []
    ms_conv = []
    ms_four = []
    for i in range(B):  # a fresh layer per draw: the claim is over random weights and inputs
        torch.manual_seed(100 + i)
        lin = e2.MPConv(256, 16, kernel=[]).eval()
        conv = e2.MPConv(32, 16, kernel=[3, 3]).eval()
        four = e2.MPFourier(256)
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
            if isinstance(m, e2.MPConv)}


def test_forced_weight_normalisation_writes_unit_rms_rows_in_training_only():
    torch.manual_seed(4)
    conv = e2.MPConv(6, 5, [3, 3])
    w0 = conv.weight.detach().clone()
    conv.force_normalize_()
    torch.testing.assert_close(conv.weight.detach(), unit_rms(w0))
    x = torch.randn(2, 4, 16, 16)
    for force in (True, False):
        net = tiny(force_normalization=force)
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
    net = tiny(dropout=0.0).train()
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
    stepped = {n for n, m in net.named_modules() if isinstance(m, e2.MPConv) and
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
    net = tiny().train()
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
        if isinstance(m, e2.MPConv):
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
    blk = e2.EDM2Block(cin, cout, emb_channels=24, flavor=flavor, resample_mode=resample,
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
    net = tiny(use_fp16=False).eval()
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
    net = tiny()
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
    net = tiny()
    x = torch.randn(1, 4, 16, 16)
    with pytest.raises(ValueError, match='augmentation'):
        net(x, 1.0, augment_labels=torch.zeros(1, 9))
    with pytest.raises(ValueError, match='logvar'):
        tiny(logvar_channels=0)(x, 1.0, return_logvar=True)
    with pytest.raises(ValueError, match='unknown preset'):
        e2.build_edm2_preset('edm2-img512-xxxl')
    with pytest.raises(ValueError, match='model_type'):
        e2.EDM2Precond(16, 4, model_type='SongUNet')

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
        net = e2.build_edm2_preset(f'edm2-img512-{size}')
        G = e2.build_edm2_preset(f'edm2-img512-{size}', logvar_channels=0)
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
    f_phi = tiny().eval()
    G = tiny(logvar_channels=0).eval()
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
    net = e2.build_edm2_preset('edm2-img512-xs', use_fp16=False).eval()
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
    net = tiny().eval()
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
    net = tiny().train()
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
