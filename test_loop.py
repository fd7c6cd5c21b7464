"""Tests of sid's training loop (SiD Algorithm 1): network states per phase, augmentation labels,
random draws per phase, labels, Adam, NaN gradients, the EMA, SiDA's schedule and clip, precision
switches, logged losses, bitwise resume, DDP across two processes, the fast options, and EDM2's
forced weight normalisation, checkpointed blocks and unclipped SiDA.

Most tests drive sid.setup and sid.iterate directly (no files); resume and DDP go through the
driver. Under torchrun this file is the multi-process worker of the DDP tests (_driver).
"""
import contextlib
import copy
import dataclasses
import importlib
import io
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import edm_nets
import fileio
import runs
import sid
from conftest import (HERE, slow, NET, EDM2_NET, cfg_for, edm2_nets, perturb_copy, nets_for,
                      loop_state, run_quiet, states_equal, read_stats, load_state, edm_files,
                      write_dataset, write_pngs)

#----------------------------------------------------------------------------
# One iteration seen from inside: which network runs in which mode, with which inputs.

def record_calls(nets, tag):
    """Forward pre-hooks on (f_phi, G, f_psi) recording mode, inputs and grad state per call."""
    names = {id(n): k for n, k in zip(nets, ('phi', 'G', 'psi'))}
    calls = []

    def pre(module, args, kwargs):
        if id(module) not in names:  # G_ema is a deepcopy of G and inherits the hooks
            return
        x = args[0]
        aug = args[3] if len(args) > 3 else kwargs.get('augment_labels')
        labels = args[2] if len(args) > 2 else kwargs.get('class_labels')
        blocks = [m for m in module.modules() if type(m).__name__ == 'UNetBlock']
        calls.append(dict(net=names[id(module)], training=module.training, B=x.shape[0],
                          blocks={m.training for m in blocks}, p_drop={m.dropout for m in blocks},
                          grad_enabled=torch.is_grad_enabled(), x_graph=x.requires_grad,
                          params_grad={p.requires_grad for p in module.parameters()},
                          aug=None if aug is None else aug.detach().clone(),
                          x=x.detach().clone(), labels=labels, **tag))

    def post(module, args, out):
        if id(module) == id(nets[1]):
            calls[-1].update(out_graph=out.requires_grad)

    for n in nets:
        n.register_forward_pre_hook(pre, with_kwargs=True)
        n.register_forward_hook(post)
    return calls


def test_phase_states_micro_batches_and_augmentation_labels(tmp_path):
    """Per iteration: G makes f_psi's samples without graph or dropout; f_psi trains with dropout on
    augmented images and the pipe's labels; in G's step G has dropout and a graph, the teacher and
    f_psi are frozen in eval mode but differentiated in x_t, and every network gets ZERO
    augmentation labels (official; map_augment(0) = 0)."""
    cfg = cfg_for(tmp_path)  # 2 iterations, 2 micro-batches of 2 per step, augmentation p = 0.12
    nets = nets_for(cfg)
    calls = record_calls(nets, {})
    s = loop_state(cfg, nets)
    assert s.pipe is not None and s.zero_aug.shape == (2, 9) and not s.zero_aug.any()
    for _ in sid.iterate(s):
        pass
    assert [c['net'] for c in calls] == ['G', 'psi', 'G', 'psi', 'G', 'phi', 'psi', 'G', 'phi',
                                         'psi'] * 2  # 2 rounds per step
    assert all(c['B'] == cfg.batch_gpu and c['aug'].shape == (2, 9) for c in calls)
    psi_aug = torch.stack([c['aug'] for i, c in enumerate(calls)
                           if c['net'] == 'psi' and i % 10 < 4])
    assert (psi_aug[..., 0] != 0).any()  # the pipe's labels: x-flips happen
    for i, c in enumerate(calls):
        G_step, frozen = i % 10 >= 4, dict(training=False, blocks={False})
        if c['net'] == 'G':
            if G_step:
                want = dict(training=True, blocks={True}, out_graph=True)
            else:
                want = dict(frozen, grad_enabled=False, out_graph=False)
        elif G_step:  # frozen, differentiated in x_t
            want = dict(frozen, params_grad={False}, x_graph=True, grad_enabled=True)
        else:  # f_psi's step: dropout on, trainable, x_g without graph
            want = dict(training=True, blocks={True}, params_grad={True}, x_graph=False)
        assert {k: c[k] for k in want} == want, (i, {k: c[k] for k in want})
        if c['net'] != 'psi' or G_step:
            assert not c['aug'].any(), i
    # the teacher never drops out
    assert all(c['p_drop'] == ({0.0} if c['net'] == 'phi' else {cfg.dropout}) for c in calls)


def test_fake_score_denoises_the_augmented_image_its_labels_describe(tmp_path, monkeypatch):
    """EDM's loss, which SiD trains f_psi with: y, labels = augment_pipe(x_g); f_psi denoises
    y + sigma n given those labels, and its target is y. A pipe that mirrors every image and a
    near-zero sigma make f_psi's input the mirrored sample, far from the sample itself."""
    cfg = cfg_for(tmp_path)
    nets = nets_for(cfg)
    calls = record_calls(nets, {})
    s = loop_state(cfg, nets)
    seen = []

    def mirror(x):
        seen.append(x.detach().clone())
        return x.flip(3), torch.ones(len(x), 9)

    s.pipe = mirror
    monkeypatch.setattr(sid, 'draw_sigma_fake',
                        lambda x, *levels: torch.full([len(x), 1, 1, 1], 1e-4))
    for _ in sid.iterate(s):
        pass
    psi = [c for i, c in enumerate(calls) if c['net'] == 'psi' and i % 10 < 4]
    assert len(psi) == len(seen) == 4
    for c, x_g in zip(psi, seen):
        assert (c['x'] - x_g.flip(3)).abs().max() < 1e-2
        assert (c['x'] - x_g).abs().max() > 0.1  # the mirror changes the sample
        assert torch.equal(c['aug'], torch.ones(len(x_g), 9))


def test_zero_augmentation_labels_leave_outputs_and_gradients_bitwise_unchanged():
    """EDM's map_augment(0) = 0: an augment_dim-9 net gives bitwise the same output and parameter
    gradients with zero labels as with none; map_augment gets a zero gradient (so DDP needs no
    list of parameters to ignore)."""
    torch.manual_seed(0)
    net = perturb_copy(edm_nets.EDMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet',
                                           model_channels=16, channel_mult=[1], num_blocks=1,
                                           attn_resolutions=[], augment_dim=9, dropout=0.0), 0, 0.1)
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.3, 1.0, 4.0]).view(3, 1, 1, 1)
    grads = []
    for aug in (None, torch.zeros(3, 9)):
        net.zero_grad(set_to_none=True)
        out = net(x, sigma, None, aug)
        out.square().sum().backward()
        grads.append({k: p.grad for k, p in net.named_parameters()})
        grads[-1]['out'] = out.detach()
    assert grads[0]['model.map_augment.weight'] is None
    assert not grads[1]['model.map_augment.weight'].any()
    assert all(torch.equal(v, grads[1][k]) for k, v in grads[0].items() if v is not None)

#----------------------------------------------------------------------------
# Random draws and labels: the phase is part of the seed, labels are uniform without data and the
# data's with it.

def test_each_phase_and_micro_batch_draws_its_own_numbers(tmp_path):
    """G's latents differ between the f_psi step and the G step of one iteration and between the
    rounds; the same (seed, iteration, phase, round) replays the same numbers; another seed not."""
    def latents(seed):
        cfg = cfg_for(tmp_path, 'toy', 2, batch=8, batch_gpu=4, seed=seed)
        nets = nets_for(cfg)
        calls = record_calls(nets, {})
        for _ in sid.iterate(loop_state(cfg, nets)):
            pass
        return [c['x'] for c in calls if c['net'] == 'G']  # [it][phase][round]
    z = latents(0)
    assert len(z) == 8 and all(not torch.allclose(a, b) for i, a in enumerate(z) for b in z[:i])
    assert all(torch.equal(a, b) for a, b in zip(z, latents(0)))
    assert not any(torch.allclose(a, b) for a, b in zip(z, latents(1)))
    noise = {}  # the f_psi step's and G step's noise of one micro-batch differ too
    for phase in (1, 2):
        s = loop_state(cfg_for(tmp_path, 'toy', 1, batch=8, batch_gpu=4))
        sid.reseed(s, phase, 0)
        noise[phase] = torch.randn(4)
    assert not torch.allclose(noise[1], noise[2])


def test_data_free_conditional_runs_draw_every_class(tmp_path):
    """Without --data a conditional G gets uniform one-hot labels: all 10 classes within 10
    iterations (80 draws; a class is missed with probability 10 * 0.9^80 = 0.2 %), the same labels
    for G's samples and for f_psi/the teacher in the G step."""
    cfg = cfg_for(tmp_path, 'cifar10-cond', 10)
    nets = nets_for(cfg)
    calls = record_calls(nets, {})
    for _ in sid.iterate(loop_state(cfg, nets)):
        pass
    G_labels = torch.cat([c['labels'] for c in calls if c['net'] == 'G'])
    assert G_labels.shape == (80, 10) and torch.equal(G_labels.sum(1), torch.ones(80))
    assert set(G_labels.argmax(1).tolist()) == set(range(10))
    rounds = [i for i in range(len(calls) - 2)
              if calls[i]['net'] == 'G' and calls[i + 1]['net'] == 'phi']
    assert len(rounds) == 20  # each round of a G step: G, the teacher and f_psi share its labels
    assert all(calls[i + 1]['labels'] is calls[i]['labels'] is calls[i + 2]['labels']
               for i in rounds)


def test_labels_and_real_images_come_from_the_data_in_order(tmp_path):
    """With --data, each micro-batch's labels are those of the real images drawn with it (the
    dataset's, matched to its images), fed to G and f_psi; SiDA's discriminator sees the images."""
    files, chw, _ = edm_files(n=6, size=32)
    classes = [0, 9, 3, 5, 9, 1]
    folder = write_dataset(tmp_path / 'data', files,
                         {'labels': [[n, c] for n, c in zip(files, classes)]})
    cfg = cfg_for(tmp_path, 'cifar10-cond', 2, method='sida', data=folder, sida_warmup_kimg=0)
    nets = nets_for(cfg)
    calls = record_calls(nets, {})
    s = loop_state(cfg, nets)
    images, labels = data.load_dataset(folder)
    s.data = data.infinite_batches(images, labels, s.batch_gpu, cfg.seed)
    seen = []
    objective = sid.METHODS['sida'].fake_loss

    def fake(s_, x_g, x_r, c):
        seen.append((x_r, c))
        return objective(s_, x_g, x_r, c)

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sid.METHODS, 'sida', dataclasses.replace(sid.METHODS['sida'], fake_loss=fake))
        for _ in sid.iterate(s):
            pass
    assert s.data_batches == 6 and len(seen) == 4  # iteration 0 is SiDA's frozen phase: no G step
    for x_r, c in seen:  # each real image's label is its own
        idx = [min(range(6), key=lambda k: (torch.from_numpy(chw[k]).float() / 127.5 - 1
                                           - x).abs().sum()) for x in x_r]
        assert c.argmax(1).tolist() == [classes[k] for k in idx]
    G_calls = [c for c in calls if c['net'] == 'G' and not c['training']]  # f_psi's samples
    assert len(G_calls) == 4
    assert all(torch.equal(c['labels'], seen_c) for c, (_, seen_c) in zip(G_calls, seen))

def test_init_generator_starts_G_alone_from_the_sid_generator(tmp_path):
    """SiD²A (--init-generator): G, and so G_ema, start from the SiD generator's weights (a run
    folder: its best or latest snapshot); the teacher and f_psi stay the teacher."""
    cfg = cfg_for(tmp_path / 'a')
    teacher, G0, _ = nets_for(cfg, perturb=False)
    sid_G = perturb_copy(G0, 4, 0.1).eval()
    os.makedirs(tmp_path / 'sid_run')
    runs.save_snapshot(str(tmp_path / 'sid_run' / 'network-snapshot-000000004.pt'), sid_G, 4, cfg)
    cfg2 = dataclasses.replace(cfg, method='sida', init_generator=str(tmp_path / 'sid_run'))
    f_phi, G, f_psi = runs.load_networks(cfg2, None, torch.device('cpu'))
    assert states_equal(G, sid_G) and states_equal(f_psi, teacher) and states_equal(f_phi, teacher)
    s = loop_state(cfg2, (f_phi, G, f_psi))
    assert states_equal(s.G_ema, sid_G) and not states_equal(s.f_psi, sid_G)


#----------------------------------------------------------------------------
# Optimisers, NaN gradients, the EMA, SiDA's schedule and clip, precision switches.

@pytest.mark.parametrize('precision,eps', [('fp32', 1e-8), ('fp16', 1e-6)])
def test_adam_settings_and_nonfinite_grads(tmp_path, precision, eps):
    cfg = cfg_for(tmp_path / 'a', g_beta1=0.9, lr=2e-5, glr=3e-5, precision=precision)
    s = loop_state(cfg, nets_for(cfg, perturb=False))
    for opt, lr, b1 in ((s.opt_psi, 2e-5, 0.0), (s.opt_G, 3e-5, 0.9)):  # official; fp16: eps 1e-6
        d = opt.defaults
        assert (d['lr'], d['betas'], d['eps'], d['weight_decay']) == (lr, (b1, 0.999), eps, 0)
    assert [p for g in s.opt_G.param_groups for p in g['params']] == list(s.G.parameters())
    assert [p for g in s.opt_psi.param_groups for p in g['params']] == list(s.f_psi.parameters())
    assert s.G.use_fp16 == s.f_psi.use_fp16 == s.f_phi.use_fp16 == (precision == 'fp16')
    if precision == 'fp32':  # NaN gradients become 0: Adam leaves those weights alone
        f_phi, G, f_psi = nets = nets_for(cfg)
        pG, ppsi = G.model.enc['32x32_conv'].weight, f_psi.model.dec['32x32_aux_conv'].weight
        before = (pG.detach().clone(), ppsi.detach().clone())
        other = G.model.enc['32x32_block0'].conv0.weight.detach().clone()
        for p in (pG, ppsi):
            p.register_hook(lambda g: torch.full_like(g, float('nan')))
        s = loop_state(cfg_for(tmp_path / 'b', iters=1), nets)
        for _ in sid.iterate(s):
            pass
        assert torch.equal(pG, before[0]) and torch.equal(ppsi, before[1])
        assert not torch.equal(s.G.model.enc['32x32_block0'].conv0.weight, other)
        assert all(torch.isfinite(p).all() for n in (s.G, s.f_psi) for p in n.parameters())


@pytest.mark.parametrize('ema_mimg', [8e-6, 1.0])  # half-life 8 images / pure ramp-up
def test_ema_closed_form_with_accumulation(tmp_path, ema_mimg):
    """beta = 0.5^(batch / max(h, 1e-8)), h = min(half-life, 5 % of the images seen): the WHOLE
    batch, not batch_gpu."""
    batch, iters = 8, 30
    cfg = cfg_for(tmp_path, 'toy', iters, batch=batch, batch_gpu=4, ema_mimg=ema_mimg, lr=1e-2,
                  glr=1e-2)
    s = loop_state(cfg)
    ema, n = [p.detach().double().clone() for p in s.G.parameters()], 0  # G_ema starts as G
    for _ in sid.iterate(s):
        G_i = [p.detach().double().clone() for p in s.G.parameters()]
        beta = 0.5 ** (batch / max(min(ema_mimg * 1e6, 0.05 * n * batch), 1e-8))
        ema, n = [beta * e + (1 - beta) * g for e, g in zip(ema, G_i)], n + 1
        err = max((a.double() - b).abs().max().item() for a, b in zip(s.G_ema.parameters(), ema))
        assert err < 1e-6
    assert n == iters and max((a - b).abs().max().item() for a, b in zip(ema, G_i)) > 1e-3


def test_sida_loop_schedule_and_clip(tmp_path, monkeypatch):
    """Phases from the images seen BEFORE the step (frozen, SiD, mix); f_psi's gradients clipped to
    +-1, which matters."""
    m, G_seen, clips, sanitize = sid.METHODS['sida'], [], [], sid.sanitize_grads_

    def G_obj(s, *a):
        loss, logs = m.G_loss(s, *a)
        G_seen.append((s.cur_nimg, loss.item(), (0.5 * logs[0] + 0.5 * logs[1]).item(),
                       logs[0].item()))
        return loss, logs

    def sanitize_logged(params, clip=None):
        params = list(params)

        def grad_max():
            return max(p.grad.abs().max().item() for p in params if p.grad is not None)

        before = grad_max()
        sanitize(params, clip)
        clips.append((clip, before, grad_max()))

    monkeypatch.setitem(sid.METHODS, 'sida', dataclasses.replace(m, G_loss=G_obj))
    monkeypatch.setattr(sid, 'sanitize_grads_', sanitize_logged)
    cfg = cfg_for(tmp_path / 'a', 'toy', 6, method='sida', batch_gpu=64, sida_warmup_kimg=0.128,
                  sida_mix_kimg=0.256, ls=100.0)
    _, s_clipped, _ = run_quiet(cfg)
    assert [n for n, *_ in G_seen] == [192, 256, 320]  # 0, 64, 128: frozen; 192, 256: SiD; mix
    for n, loss, mix, sid_only in G_seen:
        assert loss == pytest.approx(mix if n > 256 else sid_only, rel=1e-6)
    psi_clips = [c for c in clips if c[0] is not None]
    assert len(psi_clips) == 6 and all(c == 1.0 and after <= 1.0 for c, _, after in psi_clips)
    assert any(before > 1 for _, before, _ in psi_clips), psi_clips
    monkeypatch.setitem(sid.METHODS, 'sida', dataclasses.replace(m, psi_clip=None))
    _, s_free, _ = run_quiet(dataclasses.replace(cfg, outdir=str(tmp_path / 'b')))
    assert not states_equal(s_clipped.f_psi, s_free.f_psi)


PRECISION_NET = json.dumps(dict(img_resolution=8, model_channels=16, channel_mult=[1], num_blocks=1,
                                attn_resolutions=[8]))  # one attention block at the logits' level

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA here')


def dtypes_inside_the_loop(tmp_path, method, precision, device, monkeypatch):
    """One SiD or SiDA run through sid.setup and sid.iterate (SiDA: 2 iterations, the second in the
    mixed phase, with real images), forward hooks inside the three networks -> what they saw."""
    iters = 2 if method == 'sida' else 1
    folder = write_pngs(tmp_path / 'data', 4, size=8)
    cfg = cfg_for(tmp_path / 'run', 'cifar10', iters, method=method, net_overrides=PRECISION_NET,
                  precision=precision, device=device, sida_warmup_kimg=0, sida_mix_kimg=0,
                  data=folder if method == 'sida' else '')
    nets = runs.load_networks(cfg, None, torch.device(device))
    convs = {id(m) for net in nets for m in net.model.modules() if isinstance(m, edm_nets.Conv2d)}
    tops = {id(net) for net in nets}  # not G_ema, a copy of G that inherits the hooks
    seen = dict(body=set(), outputs=set(), attention=set(), losses=set())

    def body(m, args, out):
        if id(m) in convs:
            seen['body'].add(out.dtype)

    def top(m, args, out):
        if id(m) in tops:
            seen['outputs'].update(t.dtype for t in (out if isinstance(out, tuple) else (out,)))

    for net in nets:
        net.register_forward_hook(top)
        for m in net.model.modules():
            if isinstance(m, edm_nets.Conv2d):
                m.register_forward_hook(body)
    sdpa = F.scaled_dot_product_attention

    def attention(*a, **k):
        out = sdpa(*a, **k)
        seen['attention'].add(out.dtype)
        return out

    monkeypatch.setattr(F, 'scaled_dot_product_attention', attention)
    m = sid.METHODS[method]

    def recorded(objective):
        def run(*a):
            loss, logs = objective(*a)
            seen['losses'].add(loss.dtype)
            return loss, logs
        return run

    monkeypatch.setitem(sid.METHODS, method, dataclasses.replace(
        m, fake_loss=recorded(m.fake_loss), G_loss=recorded(m.G_loss)))
    s = loop_state(cfg, nets)
    if method == 'sida':
        images, _ = data.load_dataset(folder)
        s.data = data.infinite_batches(images, torch.zeros(len(images), 0), s.batch_gpu, cfg.seed)
    calls = record_calls(nets, {})
    for _ in sid.iterate(s):
        pass
    assert {c['net'] for c in calls} == {'phi', 'G', 'psi'}  # G trained: every network ran
    return s, seen


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=CUDA)])
@pytest.mark.parametrize('precision', ['fp32', 'tf32', 'bf16', 'fp16'])
def test_precision_switches_do_what_they_say(tmp_path, monkeypatch, precision, device):
    """Inside the networks' forwards of SiD's and SiDA's iterations (every network, SiDA's
    discriminator and mixed G loss included), as sid.setup and the loop build them:
    - the U-Net bodies' convolutions run in bfloat16 under bf16 (autocast); under fp16 with EDM's
      per-layer casting, in float16 on CUDA (EDM runs a CPU's body in float32); else float32;
    - every network's output (D_x, SiDA's logits) and every loss is float32, and attention's
      softmax float32 (EDM's AttentionOp), except a half-precision body's on CUDA;
    - the weights stay float32 (master weights; fp16 casts them per layer); Adam's eps is 1e-6 for
      fp16 alone and 1e-8 otherwise (official); TF32 only with tf32."""
    if device == 'cpu':
        body = torch.bfloat16 if precision == 'bf16' else torch.float32
        softmax = torch.float32
    else:
        body = dict(bf16=torch.bfloat16, fp16=torch.float16).get(precision, torch.float32)
        softmax = body
    for method in ('sid', 'sida'):
        s, seen = dtypes_inside_the_loop(tmp_path / method, method, precision, device, monkeypatch)
        assert seen['body'] == {body}, (method, seen)
        assert seen['outputs'] == seen['losses'] == {torch.float32}, (method, seen)
        assert seen['attention'] == {softmax}, (method, seen)
        assert {n.use_fp16 for n in (s.f_phi, s.G, s.f_psi)} == {precision == 'fp16'}
        assert {p.dtype for n in (s.f_phi, s.G, s.f_psi, s.G_ema) for p in n.parameters()} == {
            torch.float32}
        eps = 1e-6 if precision == 'fp16' else 1e-8
        assert s.opt_G.defaults['eps'] == s.opt_psi.defaults['eps'] == eps
        assert torch.backends.cuda.matmul.allow_tf32 == (precision == 'tf32')
        assert torch.backends.cudnn.allow_tf32 == (precision == 'tf32')

#----------------------------------------------------------------------------
# The logged losses are the quantities they name: iteration 0 recomputed here from the formulas
# (EDM's DSM, SiD's loss) with the loop's draws, so a logged value shared by two runs (resume,
# DDP) cannot hide a wrong loss.

def first_losses(cfg, nets):
    """(loss_fake, loss_G) of iteration 0 of a SiD run without augmentation or dropout, from the
    formulas: f_psi's DSM on G's samples, then SiD's loss against the updated f_psi; summed over
    the micro-batches (ours), and of the last one (the official print)."""
    assert cfg.method == 'sid' and cfg.augment == 0 and cfg.dropout == 0
    f_phi, G, f_psi = (copy.deepcopy(n) for n in nets)
    s = loop_state(cfg, (f_phi, G, f_psi))
    G0 = copy.deepcopy(G)
    it = next(sid.iterate(s))  # the loop's own iteration 0, for f_psi after its step
    s.cur_nimg = 0  # the draws of iteration 0

    def draw(phase, r):
        sid.reseed(s, phase, r)
        c = None
        if G.label_dim:
            c = F.one_hot(torch.randint(G.label_dim, (s.batch_gpu,)), G.label_dim).float()
        z = cfg.sigma_init * torch.randn([s.batch_gpu, *G.img_shape])
        return c, z

    loss_fake = loss_G = 0.0
    with torch.no_grad():
        for r in range(s.rounds):
            last = loss_fake, loss_G
            c, z = draw(1, r)
            x_g = G0(z, torch.full([len(z), 1, 1, 1], cfg.sigma_init), c)
            sigma = (torch.randn(len(z), 1, 1, 1) * 1.2 - 1.2).exp()
            x_t = x_g + sigma * torch.randn_like(x_g)
            # f_psi before its step: the nets passed in (dropout 0: train mode changes nothing)
            D = nets[2](x_t, sigma, c)
            lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
            loss_fake += float((lam * (D - x_g) ** 2).sum()) * cfg.ls / s.n
            c, z = draw(2, r)
            x_g = G0(z, torch.full([len(z), 1, 1, 1], cfg.sigma_init), c)
            t = torch.rand(len(z), 1, 1, 1) * cfg.tmax / 1000
            sigma = (80 ** (1 / 7) + (1 - t) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
            x_t = x_g + sigma * torch.randn_like(x_g)
            y_phi, y_psi = f_phi(x_t, sigma, c), s.f_psi(x_t, sigma, c)
            w = (x_g - y_phi).abs().flatten(1).mean(1).clamp_min(1e-5)
            per = ((y_phi - y_psi) * (y_psi - x_g) + (1 - cfg.alpha) * (y_phi - y_psi) ** 2)
            loss_G += float((per.flatten(1).sum(1) / w).sum()) * cfg.lsg / s.n
    it.last_expected = [loss_fake - last[0], loss_G - last[1]]  # the last micro-batch's
    return loss_fake, loss_G, it


def test_logged_losses_are_the_quantities_they_name(tmp_path):
    cfg = cfg_for(tmp_path, 'cifar10-cond', 1, augment=0.0, dropout=0.0, sigma_init=1.5, tmax=600)
    loss_fake, loss_G, it = first_losses(cfg, nets_for(cfg))
    assert it.loss_fake.item() == pytest.approx(loss_fake, rel=1e-5)
    assert it.loss_G.item() == pytest.approx(loss_G, rel=1e-4) and it.loss_extra == 0
    assert abs(loss_fake) > 0 and abs(loss_G) > 0
    # the official print: the last of the 2 micro-batches alone ([f_psi, SiDA's D, G, extra])
    fake_last, G_last = it.last_expected
    assert it.last[[1, 3]].tolist() == [0, 0] and abs(fake_last - loss_fake) > 1e-3 * loss_fake
    assert it.last[0].item() == pytest.approx(fake_last, rel=1e-5)
    assert it.last[2].item() == pytest.approx(G_last, rel=1e-4)


def test_status_line_and_stats_give_both_conventions(tmp_path):
    """Each tick logs the mean over its iterations of the summed micro-batches (ours, named) and
    the official print under the official names: the last micro-batch of the tick's last
    iteration, SiDA's f_psi loss split into its DSM and D terms."""
    cfg = cfg_for(tmp_path, 'toy', 4, method='sida', sida_warmup_kimg=0, tick_kimg=0.128)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        run, s = runs.start(cfg, nets_for(cfg))
        lasts = []
        for it in sid.iterate(s):
            lasts.append(it.last.tolist())
            runs.maintain(run, s, it)
        runs.finish(run, s)
    stats = read_stats(tmp_path)
    assert len(stats) == 2 and s.rounds == 2
    for e, last in zip(stats, (lasts[1], lasts[3])):
        assert e['loss_convention'] == runs.LOSS_CONVENTION
        assert e['last_micro_batch'] == dict(loss_fake_score=last[0], loss_D=last[1],
                                             loss_G=last[2], loss_G_gan=last[3])
        assert all(v != 0 for v in last)
    lines = [line for line in out.getvalue().splitlines() if line.startswith('tick ')]
    assert len(lines) == 2 and all(' batch: loss_fake ' in line for line in lines)
    assert lines[1].endswith(f"| last micro-batch: loss_fake_score {lasts[3][0]:.4g} loss_D "
                             f"{lasts[3][1]:.4g} loss_G {lasts[3][2]:.4g} loss_G_gan "
                             f"{lasts[3][3]:.4g}")
    assert runs.last_micro_batch('sign', torch.tensor([1.0, 0, 2, 3])) == dict(
        loss_fake_score=1.0, loss_G=2.0, loss_ign=3.0)
    assert runs.last_micro_batch('sid', torch.tensor([1.0, 0, 2, 0])) == dict(
        loss_fake_score=1.0, loss_G=2.0)

#----------------------------------------------------------------------------
# A non-finite sample of G (official sid_loss.py / sida_loss.py drop it; the reduction keeps
# dividing by the images per GPU, n): zeroed before any network sees it, so the other samples'
# gradients stay finite and f_psi's gradient is that of the micro-batch without it, with the same
# n. (Dropped after the networks, as officially, 0 * NaN in backward makes them all NaN.)

def recording(fn, store):
    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        store.append(out)
        return out
    return call


@pytest.mark.parametrize('method', ['sid', 'sida', 'sign'])
def test_nan_latent_drops_its_sample_and_f_psi_still_learns(tmp_path, monkeypatch, method):
    sida = dict(sida_warmup_kimg=0, sida_mix_kimg=0) if method == 'sida' else {}
    cfg = cfg_for(tmp_path, method=method, batch=4, batch_gpu=4, augment=0.0, dropout=0.0, **sida)
    f_phi, G, f_psi = nets_for(cfg)
    s = loop_state(cfg, (f_phi, G, perturb_copy(f_psi, 2, 0.02)))  # f_psi != f_phi: loss_G != 0
    m = sid.METHODS[method]
    g = torch.Generator().manual_seed(0)
    z = cfg.sigma_init * torch.randn([4, *s.G.img_shape], generator=g)
    z[1, 0, 5, 5] = float('nan')  # one NaN latent: G's sample 1 is NaN everywhere
    with torch.no_grad():
        x_g = sid.generate(s.G.eval(), z, None, cfg.sigma_init, s.zero_aug)
    keep = torch.tensor([True, False, True, True])
    assert x_g[1].isnan().all() and x_g[keep].isfinite().all()
    x_r = torch.rand([4, *s.G.img_shape], generator=g) * 2 - 1
    s.f_psi.train().requires_grad_(True)
    draws, params = [], list(s.f_psi.parameters())
    monkeypatch.setattr(sid, 'draw_sigma_fake', recording(sid.draw_sigma_fake, draws))
    monkeypatch.setattr(torch, 'randn_like', recording(torch.randn_like, draws))
    loss, logs = m.fake_loss(s, x_g, x_r, None)
    grads = torch.autograd.grad(loss, params)
    assert all(gr.isfinite().all() for gr in grads) and logs.isfinite().all()
    sigma, noise = draws[0][keep], draws[1][keep]  # DSM over the kept samples, / 4 images per GPU
    with torch.no_grad():
        D = s.f_psi(x_g[keep] + sigma * noise, sigma, None, s.zero_aug[keep])
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    assert logs[0].item() == pytest.approx((lam * (D - x_g[keep]) ** 2).sum().item() / 4, rel=1e-5)
    # the micro-batch without sample 1, the same draws for the other samples, the same n
    replay = iter([d[keep] for d in draws])
    monkeypatch.setattr(sid, 'draw_sigma_fake', lambda x, *levels: next(replay))
    monkeypatch.setattr(torch, 'randn_like', lambda x: next(replay))
    monkeypatch.setattr(s, 'zero_aug', s.zero_aug[keep])
    loss_ref, logs_ref = m.fake_loss(s, x_g[keep], x_r[keep], None)
    grads_ref = torch.autograd.grad(loss_ref, params)
    assert torch.allclose(logs, logs_ref, rtol=1e-5) and loss_ref.abs() > 0
    # float32 sums over 4 or 3 samples: ~1e-6 apart (the normalisation by 3 would be 33 %)
    for gr, ref in zip(grads, grads_ref):
        err = (gr - ref).norm() / ref.norm().clamp_min(1e-30)
        assert err < 1e-4 or (ref.norm() == 0 and gr.norm() == 0), err
    assert sum(ref.norm() for ref in grads_ref) > 0
    monkeypatch.undo()

    # G's objective logs what it logs on the micro-batch without sample 1 (data-free: SIGN's flow
    # term then starts at G's samples)
    draws = []
    s.f_psi.eval().requires_grad_(False)
    s.G.eval()
    for name in ('draw_sigma_generator', 'draw_sigma_flow'):
        monkeypatch.setattr(sid, name, recording(getattr(sid, name), draws))
    monkeypatch.setattr(torch, 'randn_like', recording(torch.randn_like, draws))
    _, logs = m.G_loss(s, x_g, None, None)
    replay = iter([d[keep] if torch.is_tensor(d) else tuple(t[keep] for t in d) for d in draws])
    for name in ('draw_sigma_generator', 'draw_sigma_flow', 'randn_like'):
        monkeypatch.setattr(torch if name == 'randn_like' else sid, name, lambda *a: next(replay))
    monkeypatch.setattr(s, 'zero_aug', s.zero_aug[keep])
    _, logs_ref = m.G_loss(s, x_g[keep], None, None)
    assert logs.isfinite().all() and torch.allclose(logs, logs_ref, rtol=1e-5)
    assert (logs != 0).sum() == (1 if method == 'sid' else 2)
    monkeypatch.undo()

    # the loop's step: f_psi moves (finite), G's step logs finite losses (G's own gradient is NaN
    # inside G, from its NaN sample: nan_to_num zeroes it, as officially)
    randn = torch.randn

    def nan_latent(size, *args, **kwargs):  # the loop's latents z: sample 1 NaN
        out = randn(size, *args, **kwargs)
        if list(size) == [4, *s.G.img_shape]:
            out[1] = float('nan')
        return out

    monkeypatch.setattr(torch, 'randn', nan_latent)
    s = loop_state(cfg)
    s.data = iter([(x_r, torch.zeros(4, 0))] * 4)  # real images (SiDA's D, SIGN's L_rec)
    s.cur_nimg = 4  # past SiDA's warm-up
    psi0 = copy.deepcopy(s.f_psi.state_dict())
    it = next(sid.iterate(s))
    moved = [not torch.equal(v, psi0[k]) for k, v in s.f_psi.state_dict().items()
             if v.is_floating_point()]
    assert sum(moved) > len(moved) // 2
    assert all(v.isfinite().all() for v in s.f_psi.state_dict().values())
    assert it.loss_fake.isfinite() and it.loss_G.isfinite() and it.last.isfinite().all()
    assert it.loss_G != 0 and (method == 'sid' or it.loss_extra != 0)

#----------------------------------------------------------------------------
# Resume: interrupted + resumed = uninterrupted, bit for bit (the driver's training state).

@pytest.mark.parametrize('kind', ['toy', 'image', 'cond-data', 'plain'])
def test_resume_is_bitwise_identical(tmp_path, kind):
    """Only --resume and a longer --duration-mimg: the same weights, stats and data position
    (image: with augmentation and dropout); plain: and the logged losses are the independently
    computed ones, so a bug shared by both runs cannot hide."""
    extra = dict(ema_mimg=1e-4) if kind == 'toy' else {}
    if kind == 'plain':
        extra = dict(augment=0.0, dropout=0.0)
    dataset = 'toy' if kind == 'toy' else 'cifar10'
    if kind == 'cond-data':  # labels from a labelled folder: the data position is restored too
        files, _, _ = edm_files(n=6, size=32)
        meta = {'labels': [[n, c] for n, c in zip(files, [0, 9, 3, 5, 9, 1])]}
        extra['data'] = write_dataset(tmp_path / 'data', files, meta)
        dataset = 'cifar10-cond'

    def make(out, iters):
        snap_kimg = (64 if kind == 'toy' else 4) * 2 / 1e3
        return cfg_for(out, dataset, iters, snap_kimg=snap_kimg, **extra)

    nets = nets_for(make(tmp_path / 'x', 1))
    torch.manual_seed(11)  # the global RNG state before a run must not matter
    run_a, A, _ = run_quiet(make(tmp_path / 'a', 4), copy.deepcopy(nets))
    torch.manual_seed(12)
    run_quiet(make(tmp_path / 'b', 2), copy.deepcopy(nets))
    runs.append_stats(str(tmp_path / 'b'), dict(kimg=1e6, loss_fake=0.0))  # after the last state
    torch.manual_seed(13)
    cfg_b = runs.resolve_config(dict(resume=str(tmp_path / 'b'),
                                     duration_mimg=make('', 4).duration_mimg))
    assert cfg_b == dataclasses.replace(make(tmp_path / 'b', 4), resume=str(tmp_path / 'b'))
    run_b, B, out = run_quiet(cfg_b, copy.deepcopy(nets))
    assert 'resumed from' in out
    assert all(states_equal(getattr(A, k), getattr(B, k)) for k in ('G', 'G_ema', 'f_psi'))
    assert not states_equal(A.G, nets[1])
    if kind == 'toy':  # the toy's observations (its pictures) come back with the training state
        assert [t for t, _ in run_b.frames] == [t for t, _ in run_a.frames]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(run_a.frames, run_b.frames))

    def same(e):  # ticks restart, as EDM's
        return {k: v for k, v in e.items() if k not in ('tick', 'time', 'sec_per_kimg')}

    stats_a = read_stats(tmp_path / 'a')
    assert [same(e) for e in read_stats(tmp_path / 'b')] == [same(e) for e in stats_a]
    assert len(stats_a) == 4
    data_images = 2 * 4 * 4 if extra.get('data') else 0  # both steps of 4 iterations draw a batch
    assert load_state(tmp_path / 'b')['data_images'] == data_images
    if kind == 'plain':
        loss_fake, loss_G, _ = first_losses(make(tmp_path / 'c', 1), nets)
        assert stats_a[0]['loss_fake'] == pytest.approx(loss_fake, rel=1e-5)
        assert stats_a[0]['loss_G'] == pytest.approx(loss_G, rel=1e-4)

#----------------------------------------------------------------------------
# DDP (torchrun, gloo on CPU). Every micro-batch is seeded from (seed, images seen, phase, global
# micro-batch index rank*rounds + r), so 2 ranks x 1 round and 1 rank x 2 rounds draw the same
# numbers for the same micro-batches, and DDP's gradient mean equals the accumulated sum: the runs
# agree up to float summation order (unsynchronised gradients, a wrong normalisation or a
# rank-dependent stream break the tolerances below).

def run_dict(cfg, perturb=True):
    """One in-process run -> final state dicts and stats.jsonl entries."""
    _, s, _ = run_quiet(cfg, nets_for(cfg, perturb))
    return dict(G=s.G.state_dict(), G_ema=s.G_ema.state_dict(), f_psi=s.f_psi.state_dict(),
                stats=read_stats(cfg.outdir))


def mean_diff(a, b):
    """Mean |difference| per weight over G, G_ema and f_psi. Not the max: Adam moves every weight by
    ~lr whatever its gradient, so a weight with a mathematically zero gradient may step +lr in one
    run and -lr in the other from rounding alone; a real fault changes most weights' steps."""
    ks = ('G', 'G_ema', 'f_psi')
    total = sum((a[k][n] - b[k][n]).abs().sum().item() for k in ks for n in a[k])
    return total / sum(a[k][n].numel() for k in ks for n in a[k])


def _driver(jobs_path):
    """`torchrun --nproc_per_node=2 test_loop.py JOBS.json`: check_ranks_agree must catch differing
    replicas; then each job trains (the driver checks the replicas every tick), each rank saves its
    weights as rank{r}.pt, and the real images it drew and the files it wrote as rows{r}.json."""
    import torch.distributed as dist
    dist.init_process_group('gloo')  # the driver leaves a caller's group alone
    rank, net = dist.get_rank(), nn.Linear(3, 2)
    nn.init.constant_(net.weight, 0.5)
    nn.init.constant_(net.bias, 0.5)
    runs.check_ranks_agree([net])  # equal: must pass
    with torch.no_grad():
        net.bias[1] += 1e-6 * rank
    try:
        runs.check_ranks_agree([net])
    except RuntimeError:  # caught: the test looks for this file
        runs.write_json(os.path.join(os.path.dirname(jobs_path), f'check{rank}.json'), {})
    rows, next_batch = [], sid.next_batch

    def recorded(s):
        x_r, c = next_batch(s)
        if x_r is not None:
            rows.extend(round(v, 6) for v in x_r.flatten(1).sum(1).tolist())
        return x_r, c

    sid.next_batch = recorded
    writes, atomic_write = [], fileio.atomic_write

    def recorded_write(path):  # every file the driver writes goes through atomic_write
        writes.append(os.path.basename(path))
        return atomic_write(path)

    fileio.atomic_write = recorded_write
    for job in json.load(open(jobs_path)):
        cfg = sid.make_config(job['cfg'])
        rows.clear()
        writes.clear()
        _, s = runs.train(cfg, nets_for(cfg, job['perturb']))
        states = dict(G=s.G.state_dict(), G_ema=s.G_ema.state_dict(), f_psi=s.f_psi.state_dict())
        torch.save(states, os.path.join(cfg.outdir, f'rank{rank}.pt'))
        with open(os.path.join(cfg.outdir, f'rows{rank}.json'), 'w') as f:
            json.dump(dict(rows=rows, writes=writes), f)
    dist.destroy_process_group()


@pytest.fixture(scope='module')
def ddp(tmp_path_factory):
    """One torchrun launch (2 ranks) for all multi-process tests, and the single-process runs they
    compare to."""
    t = tmp_path_factory.mktemp('ddp')
    names = ('toy1', 'toy2', 'img1_half', 'img1_full', 'img2_half', 'img2_back', 'img1_resumed',
             'sida2', 'sida1_resumed', 'sign2', 'data2', 'noaug1', 'noaug2')
    d = {k: t / k for k in names}

    def img(k, n, **kw):
        return cfg_for(d[k], 'cifar10', n, batch=8, batch_gpu=4, lr=1e-4, glr=1e-4, **kw)

    files, chw, _ = edm_files(n=8, size=32)
    classes = [0, 9, 3, 5, 9, 1, 2, 4]
    data = write_dataset(t / 'data', files, {'labels': [[n, c] for n, c in zip(files, classes)]})
    data_cfg = cfg_for(d['data2'], 'cifar10-cond', 2, data=data)  # batch 4: 2 ranks x 1 round of 2
    noaug = dict(augment=0.0, dropout=0.0)
    one = dict(toy1=run_dict(cfg_for(d['toy1'], 'toy', 3, batch=128), False),
               img1_half=run_dict(img('img1_half', 2)), img1_full=run_dict(img('img1_full', 4)),
               noaug1=run_dict(img('noaug1', 2, **noaug)))
    shutil.copytree(d['img1_half'], d['img2_back'])  # a resume writes into its own folder only
    jobs = [dict(cfg=cfg_for(d['toy2'], 'toy', 3, batch=128), perturb=False),  # 2 x 2 rounds of 32
            dict(cfg=img('img2_half', 2), perturb=True),                        # 2 ranks x 1 of 4
            dict(cfg=img('img2_back', 4, resume=str(d['img2_back'])), perturb=True),  # 1 -> 2
            dict(cfg=cfg_for(d['sida2'], 'toy', 2, method='sida', batch_gpu=16), perturb=False),
            dict(cfg=cfg_for(d['sign2'], 'toy', 2, method='sign'), perturb=False),
            dict(cfg=data_cfg, perturb=True),
            dict(cfg=img('noaug2', 2, **noaug), perturb=True)]  # f_psi with zero labels too
    runs.write_json(str(t / 'jobs.json'),
                    [dict(job, cfg=dataclasses.asdict(job['cfg'])) for job in jobs])
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                        '--nproc_per_node=2', __file__, str(t / 'jobs.json')],
                       env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=HERE), cwd=t,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    shutil.copytree(d['img2_half'], d['img1_resumed'])
    one['img1_resumed'] = run_dict(img('img1_resumed', 4, resume=str(d['img1_resumed'])))
    shutil.copytree(d['sida2'], d['sida1_resumed'])
    sida = cfg_for(d['sida1_resumed'], 'toy', 4, method='sida', batch_gpu=16,
                   resume=str(d['sida1_resumed']))
    one['sida1_resumed'] = run_dict(sida, False)
    return dict(dirs=d, one=one, stdout=r.stdout, tmp=t, chw=chw)


def rank_states(outdir):
    return [torch.load(os.path.join(outdir, f'rank{r}.pt'), weights_only=True) for r in (0, 1)]


def test_ddp_replicas_identical_only_rank0_writes(ddp):
    assert all(os.path.exists(ddp['tmp'] / f'check{r}.json') for r in (0, 1))  # 1e-6 is caught
    for job in ('toy2', 'img2_half', 'img2_back', 'sida2', 'sign2', 'data2', 'noaug2'):
        a, b = rank_states(ddp['dirs'][job])
        assert all(torch.equal(a[k][n], b[k][n]) for k in ('G', 'G_ema', 'f_psi') for n in a[k]), \
            job
    assert [round(e['kimg'] * 1e3) for e in read_stats(ddp['dirs']['img2_half'])] == [8, 16]
    for job in ('toy2', 'img2_half', 'img2_back', 'sida2', 'sign2', 'data2', 'noaug2'):
        writes = [json.load(open(ddp['dirs'][job] / f'rows{r}.json'))['writes'] for r in (0, 1)]
        assert writes[1] == [] and 'training-state.pt' in writes[0], job  # rank 0 writes alone
    assert ddp['stdout'].count(' 2 process(es) on cpu, 1 round(s) of 4 per step') == 3


def test_ddp_equals_single_process_and_resumes_across_world_sizes(ddp):
    pairs = ((ddp['one']['toy1'], 'toy2', 1e-5), (ddp['one']['img1_half'], 'img2_half', 1e-6),
             (ddp['one']['noaug1'], 'noaug2', 1e-6))
    for one, two, tol in pairs:  # lr 1e-3 / 1e-4
        assert mean_diff(one, rank_states(ddp['dirs'][two])[0]) < tol
        for e1, e2 in zip(one['stats'], read_stats(ddp['dirs'][two])):  # the whole batch's losses
            assert math.isclose(e1['loss_fake'], e2['loss_fake'], rel_tol=1e-4)
            assert math.isclose(e1['loss_G'], e2['loss_G'], rel_tol=1e-3, abs_tol=1e-4)
    # the shared logged losses are the right ones (a bug on both sides cannot hide)
    cfg = cfg_for(ddp['tmp'] / 'check', 'cifar10', 1, batch=8, batch_gpu=4, lr=1e-4, glr=1e-4,
                  augment=0.0, dropout=0.0)
    loss_fake, loss_G, _ = first_losses(cfg, nets_for(cfg))
    assert read_stats(ddp['dirs']['noaug2'])[0]['loss_fake'] == pytest.approx(loss_fake, rel=1e-4)
    assert read_stats(ddp['dirs']['noaug2'])[0]['loss_G'] == pytest.approx(loss_G, rel=1e-3)
    full = ddp['one']['img1_full']  # 4 uninterrupted iterations on 1 rank
    assert mean_diff(ddp['one']['img1_half'], full) > 3e-5  # two more steps move the weights more
    for resumed, stats in ((ddp['one']['img1_resumed'], ddp['one']['img1_resumed']['stats']),
                           (rank_states(ddp['dirs']['img2_back'])[0],
                            read_stats(ddp['dirs']['img2_back']))):
        assert mean_diff(full, resumed) < 1e-6
        assert [round(e['kimg'] * 1e3) for e in stats] == [8, 16, 24, 32]  # a copy, continued
        assert all(math.isclose(e['loss_fake'], ref['loss_fake'], rel_tol=1e-5)
                   for e, ref in zip(stats[2:], full['stats'][2:]))
    st2, st1 = (load_state(ddp['dirs'][k]) for k in ('sida2', 'sida1_resumed'))
    assert (st2['cur_nimg'], st2['data_images']) == (128, 128)  # f_psi step only (frozen G)
    assert (st1['cur_nimg'], st1['data_images']) == (256, 256)


def test_ddp_each_rank_reads_its_own_shard(ddp):
    """2 ranks, 8 labelled images, 2 iterations of 2 steps: each rank draws 4 micro-batches of 2;
    in each epoch (a new permutation) the ranks' rows are disjoint and together the dataset. A toy's
    exact samples: each rank its own stream."""
    sums = torch.tensor([(torch.from_numpy(a).float() / 127.5 - 1).sum().item()
                         for a in ddp['chw']])
    idx = []
    for r in (0, 1):
        rows = torch.tensor(json.load(open(ddp['dirs']['data2'] / f'rows{r}.json'))['rows'])
        dist, i = (rows[:, None] - sums[None]).abs().min(1)
        assert len(rows) == 8 and (dist < 0.01).all()  # every row one of the dataset's images
        idx.append(i.tolist())
    for epoch in (slice(0, 4), slice(4, 8)):
        a, b = set(idx[0][epoch]), set(idx[1][epoch])
        assert len(a) == len(b) == 4 and not a & b and a | b == set(range(8))
    assert idx[0][:4] != idx[0][4:]  # a new permutation every epoch
    toy_rows = [json.load(open(ddp['dirs']['sida2'] / f'rows{r}.json'))['rows'] for r in (0, 1)]
    assert len(toy_rows[0]) == 64  # 2 iterations x 2 rounds of 16 (f_psi steps only: frozen G)
    assert not set(toy_rows[0]) & set(toy_rows[1])  # a toy stream per rank


#----------------------------------------------------------------------------
# Fast options: each reproduces the faithful path within its precision's tolerance, through the
# loop's own set-up (the run's autocast, layout and optimiser).

def test_fused_adam_and_checkpointing_same_losses(tmp_path, monkeypatch):
    """Fused Adam and checkpointing (dropout on: the recomputation must replay its masks) give the
    faithful run to fp32 rounding (an unreplayed mask or a wrong step is O(1)); another seed moves
    the losses > 10 %: the checks can fail."""
    def fast_run(name, **opt):
        return run_dict(cfg_for(tmp_path / name, batch=4, batch_gpu=4, lr=1e-4, glr=1e-4, **opt))

    def close(a, b, rel):
        return all(math.isclose(e1[k], e2[k], rel_tol=rel) for e1, e2 in zip(a['stats'], b['stats'])
                   for k in ('loss_fake', 'loss_G'))

    faithful, other = fast_run('fp32'), fast_run('s', seed=1)
    first_G = other['stats'][0]['loss_G'], faithful['stats'][0]['loss_G']
    assert not math.isclose(*first_G, rel_tol=0.1)
    assert mean_diff(other, faithful) > 3e-5
    seen, adam = [], torch.optim.Adam

    def spy(*a, **k):
        seen.append(k.get('fused'))
        return adam(*a, **k)

    monkeypatch.setattr(torch.optim, 'Adam', spy)
    out = fast_run('f', fused_adam=1)
    assert seen == [True, True] and close(faithful, out, 1e-5) and mean_diff(faithful, out) < 1e-6
    out = fast_run('c', checkpointing=1)
    assert close(faithful, out, 1e-6) and mean_diff(faithful, out) < 1e-7
    s = loop_state(cfg_for(tmp_path / 'k', checkpointing=1))  # the switch does take effect
    blocks = [m for net in (s.f_phi, s.G, s.f_psi) for m in net.modules()
              if type(m).__name__ == 'UNetBlock']
    assert blocks and all('forward' in vars(m) for m in blocks)  # patched to recompute


# The fast path on a CPU: bf16 autocast, channels_last and compiled U-Net blocks against the
# faithful fp32 path, on one SiD iteration's losses and gradients of a tiny DDPM++ with attention
# (5 U-Net blocks, 4 kinds), run by the loop's own objectives with the State sid.setup builds.

FAST_NET = json.dumps(dict(img_resolution=8, model_channels=16, channel_mult=[1], num_blocks=1,
                           attn_resolutions=[8]))


def losses_and_grads(tmp_path, block_scale=1.0, **opt):
    """One f_psi and one G objective (accumulation round 0 of iteration 0) -> (losses, f_psi's
    gradient, G's gradient). block_scale != 1: every U-Net block's output scaled (a planted bug)."""
    cfg = cfg_for(tmp_path, net_overrides=FAST_NET, augment=0.0, dropout=0.0, **opt)
    torch.manual_seed(0)
    nets = nets_for(cfg)
    nets = (nets[0], nets[1], perturb_copy(nets[2], 2, 0.02))
    if block_scale != 1:
        for net in nets:
            for m in net.modules():
                if type(m).__name__ == 'UNetBlock':
                    m.register_forward_hook(lambda m, a, out: out * block_scale)
    s = loop_state(cfg, nets)
    conv = s.G.model.enc['8x8_block0'].conv0.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == bool(opt.get('channels_last'))
    out = []
    for phase, net, objective in ((1, s.f_psi, sid.fake_sid), (2, s.G, sid.G_sid)):
        s.G.train(phase == 2)
        s.f_psi.train(phase == 1).requires_grad_(phase == 1)
        sid.reseed(s, phase, 0)
        z = cfg.sigma_init * torch.randn([s.batch_gpu, *s.G.img_shape])
        with torch.set_grad_enabled(phase == 2), sid.autocast(s):
            x_g = sid.generate(s.G, z, None, cfg.sigma_init, s.zero_aug).float()
        loss, _ = objective(s, x_g, None, None)
        grads = torch.autograd.grad(loss, [p for p in net.parameters() if p.requires_grad],
                                    allow_unused=True)
        out.append((loss.detach(), torch.cat([g.flatten() for g in grads if g is not None])))
    return torch.stack([out[0][0], out[1][0]]), out[0][1], out[1][1]


def rel_errors(a, b):
    """(largest relative loss error, largest relative gradient-vector error)."""
    loss = ((a[0] - b[0]).abs() / b[0].abs()).max().item()
    grad = max(((x - y).norm() / y.norm()).item() for x, y in zip(a[1:], b[1:]))
    return loss, grad


@pytest.fixture(scope='module')
def fp32_ref(tmp_path_factory):
    t = tmp_path_factory.mktemp('fast')
    ref = losses_and_grads(t / 'ref')
    bug = rel_errors(losses_and_grads(t / 'bug', block_scale=1.05), ref)  # 5 % per block: a bug
    return ref, bug, t


@pytest.mark.parametrize('opt', [dict(channels_last=True),
                                 dict(precision='bf16', channels_last=True),
                                 pytest.param(dict(compile=True), marks=slow),
                                 pytest.param(dict(precision='bf16', channels_last=True,
                                                   compile=True), marks=slow)])
def test_fast_path_agrees_with_fp32(fp32_ref, opt):
    """fp32 options: the same maths in another summation order, to ~100 fp32 ulps (1e-5). bf16:
    within half the error that a 5 % scaling of every block's output (a bug) makes; and not
    bitwise equal (autocast ran)."""
    ref, bug, t = fp32_ref
    dynamo = importlib.import_module('torch._dynamo')
    if opt.get('compile'):
        dynamo.reset()
        dynamo.utils.counters.clear()
    out = losses_and_grads(t / '-'.join(opt), **opt)
    loss_err, grad_err = rel_errors(out, ref)
    if opt.get('precision') == 'bf16':
        assert loss_err < bug[0] / 2 and grad_err < bug[1] / 2, (loss_err, grad_err, bug)
        assert not torch.equal(out[0], ref[0])
    else:
        assert loss_err < 1e-5 and grad_err < 1e-5, (loss_err, grad_err)
    if opt.get('compile'):  # 3 modes x 4 block kinds, not x 5 blocks x 3 nets
        assert dynamo.utils.counters['stats']['unique_graphs'] <= 12
    net = edm_nets.EDMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', dropout=0.5,
                              model_channels=16, channel_mult=[1], num_blocks=1,
                              attn_resolutions=[8])  # compiling keeps the state_dict names
    assert list(edm_nets.compile_blocks(copy.deepcopy(net)).state_dict()) == list(net.state_dict())


if __name__ == '__main__':  # the torchrun worker of the DDP section
    _driver(sys.argv[1])

#----------------------------------------------------------------------------
# EDM2 in the loop: forced weight normalisation of f_psi and G in their training calls (and only
# with --force-normalization), checkpointed EDM2 blocks, and SiDA without f_psi's clip (EDM2's).

def unit_rows(w):
    rms = w.detach().float().flatten(1).pow(2).mean(1).sqrt()
    return bool(((rms - 1).abs() < 2e-4).all())


@pytest.mark.parametrize('force', [True, False])
def test_edm2_forced_weight_normalisation_in_the_loop(tmp_path, force):
    cfg = cfg_for(tmp_path, 'imagenet512-xs', 2, net_overrides=EDM2_NET, force_normalization=force,
                  vae='random')
    nets = edm2_nets(cfg)
    seen = []
    for name, net in zip(('phi', 'G', 'psi'), nets):
        convs = [m for m in net.modules() if isinstance(m, edm_nets.MPConv)]
        net.unet.register_forward_pre_hook(  # after EDM2Precond.forward's forced write, if any
            lambda m, a, name=name, convs=convs, net=net: seen.append(
                (name, net.training, all(unit_rows(c.weight) for c in convs))))
    s = loop_state(cfg, nets)
    for _ in sid.iterate(s):
        pass
    training = {(name, unit) for name, train, unit in seen if train}
    assert {name for name, _ in training} == {'G', 'psi'}
    assert training == {('G', force), ('psi', force)}
    assert not any(train for name, train, _ in seen if name == 'phi')


def test_edm2_checkpointed_blocks_give_the_same_run(tmp_path):
    def run(name, **kw):
        cfg = cfg_for(tmp_path / name, 'imagenet512-xs', 2, net_overrides=EDM2_NET, vae='random',
                      **kw)
        s = loop_state(cfg, edm2_nets(cfg))
        logs = [(it.loss_fake.item(), it.loss_G.item()) for it in sid.iterate(s)]
        return s, logs

    s_ref, ref = run('ref')
    s, out = run('ckpt', checkpointing=1)
    blocks = [m for m in s.f_psi.modules() if isinstance(m, edm_nets.EDM2Block)]
    assert blocks and all('forward' in vars(m) for m in blocks)  # patched to recompute
    assert all(math.isclose(a, b, rel_tol=1e-6) for r, o in zip(ref, out) for a, b in zip(r, o))
    assert max((a - b).abs().max().item() for a, b in zip(s.G.parameters(),
                                                          s_ref.G.parameters())) < 1e-6


def test_clip_psi_off_is_sidas_loop_without_the_clip(tmp_path, monkeypatch):
    """--no-clip-psi (EDM2's SiDA) is the official loop with f_psi's clip_grad_value_ removed: the
    same run as a SiDA method without psi_clip, bit for bit, and another than the clipped one."""
    clips, sanitize = [], sid.sanitize_grads_

    def record(params, clip=None):
        clips.append(clip)
        sanitize(params, clip)

    monkeypatch.setattr(sid, 'sanitize_grads_', record)
    cfg = cfg_for(tmp_path / 'a', 'toy', 4, method='sida', batch_gpu=64, sida_warmup_kimg=0.064,
                  sida_mix_kimg=0.128, ls=100.0, clip_psi=False)
    _, off, _ = run_quiet(cfg)
    assert clips and set(clips) == {None}
    m = sid.METHODS['sida']
    monkeypatch.setitem(sid.METHODS, 'sida', dataclasses.replace(m, psi_clip=None))
    _, free, _ = run_quiet(dataclasses.replace(cfg, clip_psi=True, outdir=str(tmp_path / 'b')))
    assert states_equal(off.f_psi, free.f_psi) and states_equal(off.G, free.G)
    monkeypatch.setitem(sid.METHODS, 'sida', m)
    _, clipped, _ = run_quiet(dataclasses.replace(cfg, clip_psi=True, outdir=str(tmp_path / 'c')))
    assert not states_equal(off.f_psi, clipped.f_psi)
