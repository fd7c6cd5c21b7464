"""Tests of the run driver (runs.py): presets and the command line, one table of bad inputs, run
folders and a failed start, status lines and stats, FID in the loop and across resume, snapshots,
crash safety, resume's rules, and the `generate` and `project` commands.
"""
import contextlib
import copy
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import edm_nets
import fid
import runs
import sid
from conftest import (HERE, SLOW, slow, Stub, NET, cfg_for, perturb_copy, nets_for, run_quiet, cli,
                      assert_one_line_error, states_equal, read_stats, load_state, edm_files,
                      write_dataset, write_pngs, FidStandIn, detector_file)

#----------------------------------------------------------------------------
# Presets and the command line: the official scripts' values, every field an option, --help,
# --dry-run, switches, run folders.

OFFICIAL = {  # official run_sid.sh: alpha, batch, batch_gpu, lr, glr, g_beta1, precision, dropout,
    # augment, EMA Mimg, Mimg, teacher
    'cifar10': (1.2, 256, 16, 1e-5, 1e-5, 0.0, 'fp32', 0.13, 0.12, 0.5, 500,
                'cifar10-32x32-uncond-vp'),
    'cifar10-cond': (1.2, 256, 16, 1e-5, 1e-5, 0.0, 'fp32', 0.13, 0.12, 0.5, 800,
                     'cifar10-32x32-cond-vp'),
    'imagenet64': (1.2, 8192, 16, 4e-6, 4e-6, 0.0, 'fp16', 0.10, 0.0, 2.0, 1000,
                   'imagenet-64x64-cond-adm'),
    'ffhq64': (1.2, 512, 32, 1e-5, 1e-5, 0.9, 'fp16', 0.05, 0.15, 0.5, 500, 'ffhq-64x64-uncond-vp'),
    'afhqv2-64': (1.0, 512, 32, 5e-6, 5e-6, 0.0, 'fp16', 0.05, 0.15, 0.5, 500,
                  'afhqv2-64x64-uncond-vp')}


@pytest.mark.parametrize('dataset', list(OFFICIAL))
def test_presets_match_official_sid(dataset):
    c = sid.make_config({'dataset': dataset, 'outdir': 'x'})
    assert (c.alpha, c.batch, c.batch_gpu, c.lr, c.glr, c.g_beta1, c.precision, c.dropout,
            c.augment, c.ema_mimg, c.duration_mimg, c.teacher) == OFFICIAL[dataset]
    tick = 20 if dataset == 'imagenet64' else 10  # official: tick 10 kimg (ImageNet 20), snap 50
    assert (c.sigma_init, c.tmax, c.ls, c.lsg, c.method, c.tick_kimg, c.snap_kimg) == (
        2.5, 800, 1.0, 100.0, 'sid', tick, 50 * tick)
    sida2 = sid.make_config({'dataset': dataset, 'method': 'sida', 'init_generator': 'g',
                             'outdir': 'x'})
    assert sida2.duration_mimg == 100  # SiD²A


def test_cli_options_help_dry_run_and_run_folders(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(runs, 'train', lambda cfg: seen.setdefault('cfg', cfg))
    cli('--dataset', 'cifar10-cond', '--alpha', '1.0', '--g-beta1', '0.5', '--lsg', '10',
        '--teacher', 'my.pkl', '--batch-gpu', '8', '--net-overrides', '{}', '--outdir',
        tmp_path / 'o')
    c = seen['cfg']
    assert (c.alpha, c.g_beta1, c.lsg, c.teacher, c.batch_gpu, c.duration_mimg) == (
        1.0, 0.5, 10.0, 'my.pkl', 8, 800)
    r = cli('--dataset', 'cifar10', '--help')
    assert r.returncode == 0 and all(f'\n{g}:' in r.stdout
                                     for g in ('method', 'data', 'training', 'speed', 'output'))
    assert all('--' + f.name.replace('_', '-') in r.stdout for f in dataclasses.fields(sid.Config))

    def lr_help(out):
        return out.split('\n  --lr FLOAT')[1].split('--glr')[0]

    assert '(default: 1e-05)' in lr_help(r.stdout)
    assert '(default: 0.001)' in lr_help(cli('--dataset', 'toy', '--help').stdout)
    r = cli('--dataset', 'toy', '--method', 'sign', '--lsg', '5', '--dry-run', '--outdir',
            tmp_path / 'd')
    want = sid.make_config(dict(dataset='toy', method='sign', lsg=5.0, outdir=str(tmp_path / 'd')))
    assert r.returncode == 0 and json.loads(r.stdout) == dataclasses.asdict(want)
    assert not os.path.exists(tmp_path / 'd')

    def dry(*a):
        return json.loads(cli('--dataset', 'cifar10', '--dry-run', '--outdir', 'x', *a).stdout)

    assert (dry()['fast'], dry()['channels_last']) == (False, False)  # switches: --flag / --no-flag
    fast = dry('--fast')
    assert [fast[k] for k in ('fast', 'precision', 'channels_last', 'fused_adam', 'compile',
                              'batch_gpu')] == [True, 'bf16', True, True, False, 64]
    assert dry('--method', 'sida', '--fast')['batch_gpu'] == 32  # SiDA keeps its micro-batch
    assert dry('--fast', '--no-channels-last')['channels_last'] is False
    assert dry('--checkpointing')['checkpointing'] is True
    for k in ('channels_last', 'fused_adam', 'compile', 'checkpointing', 'fast'):
        with pytest.raises(ValueError, match='is a switch'):
            sid.make_config({'dataset': 'cifar10', k: 2, 'outdir': 'x'})
    monkeypatch.chdir(tmp_path)  # run folders: EDM's numbering, never into another run's folder
    assert runs.resolve_config({}).outdir == os.path.join('runs', '00000-toy-sid')
    os.makedirs('runs/00007-cifar10-sid')
    os.makedirs('runs/notes')
    cfg = runs.resolve_config({'dataset': 'cifar10', 'method': 'sida'})
    assert cfg.outdir == os.path.join('runs', '00008-cifar10-sida')


def test_batch_gpu_clamped_to_batch_per_rank(monkeypatch, capsys):
    """torchrun: WORLD_SIZE ranks share `batch`; a larger --batch-gpu shrinks to batch / world_size,
    and the driver says so."""
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)  # a caller's group
    procs = sid.init_processes(sid.make_config(dict(batch=64, batch_gpu=64, outdir='x')))
    assert [procs[k] for k in ('batch_gpu', 'n', 'rounds', 'world_size', 'own_group')] == [
        32, 32, 1, 2, False]
    procs = sid.init_processes(sid.make_config(dict(batch=64, batch_gpu=16, outdir='x')))
    assert [procs[k] for k in ('batch_gpu', 'n', 'rounds')] == [16, 32, 2]
    with pytest.raises(ValueError, match='must be a multiple of --batch-gpu 24 x 2'):
        sid.init_processes(sid.make_config(dict(batch=64, batch_gpu=24, outdir='x')))

    def stop(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, 'check_outdir', stop)  # the message comes first
    with pytest.raises(KeyboardInterrupt):
        runs.start(sid.make_config(dict(batch=64, batch_gpu=64, outdir='x')))
    msg = '--batch-gpu 64 > --batch 64 / 2 GPUs: using micro-batches of 32'
    assert msg in capsys.readouterr().out

#----------------------------------------------------------------------------
# Bad input: one line `error: ...`, exit code 2, nothing written (for training, generate, project).

@pytest.fixture
def bad_env(tmp_path):
    """Files the bad-input table refers to: an unconditional snapshot, run folders (SiD, SiDA,
    without state), small PNG datasets."""
    G = perturb_copy(nets_for(cfg_for(tmp_path / 'unused'), perturb=False)[1])
    runs.save_snapshot(str(tmp_path / 'g.pt'), G.eval(), 0, sid.Config())
    folders = (('run', sid.make_config({'outdir': str(tmp_path / 'run')})),
               ('sida', sid.make_config({'method': 'sida', 'outdir': str(tmp_path / 'sida')})),
               ('nostate', cfg_for(tmp_path / 'nostate')))
    for name, cfg in folders:
        os.makedirs(tmp_path / name)
        runs.write_json(str(tmp_path / name / 'config.json'), dataclasses.asdict(cfg))
    os.makedirs(tmp_path / 'full')
    (tmp_path / 'full' / 'x').write_text('x')
    write_pngs(tmp_path / 'png16', 3, size=16)
    write_pngs(tmp_path / 'png32', 3, size=32)
    return tmp_path


TINY_ARGS = ['--teacher', 'random', '--net-overrides', NET, '--batch', 4, '--batch-gpu', 2,
             '--duration-mimg', 4e-6, '--device', 'cpu']


def GEN(t, *a):
    return ['generate', '--ckpt', t / 'g.pt', '--outdir', t / 'o', *a]


def TINY(t, out, *a):
    return ['--dataset', 'cifar10', *TINY_ARGS, '--outdir', t / out, *a]


BAD = [  # (name, args(t), message)
    ('seeds-order', lambda t: GEN(t, '--seeds', '5-3'), "bad --seeds '5-3'"),
    ('sigmas-count', lambda t: GEN(t, '--steps', 3, '--sigmas', '0.1'), '--steps 3 needs 2 noise'),
    ('class-idx-uncond', lambda t: GEN(t, '--class-idx', 3), 'this generator is unconditional'),
    ('gen-cuda', lambda t: GEN(t, '--device', 'cuda'), 'CUDA is not available'),
    ('gen-outdir-full', lambda t: ['generate', '--ckpt', t / 'g.pt', '--outdir', t / 'full'],
     'is not empty'),
    ('ckpt-missing', lambda t: ['generate', '--ckpt', t / 'nope.pt', '--outdir', t / 'o'],
     'nope.pt'),
    ('ckpt-no-snapshots', lambda t: ['generate', '--ckpt', t / 'nostate', '--outdir', t / 'o'],
     'no network-snapshot-*.pt'),
    ('project-sigma', lambda t: ['project', '--ckpt', t / 'g.pt', '--input', t / 'png32', '--sigma',
                                 'nan', '--outdir', t / 'o'], 'need a finite --sigma'),
    ('project-input', lambda t: ['project', '--ckpt', t / 'g.pt', '--input', t / 'none', '--outdir',
                                 t / 'o'], '--input not found'),
    ('project-shape', lambda t: ['project', '--ckpt', t / 'g.pt', '--input', t / 'png16',
                                 '--outdir', t / 'o'], 'the generator makes [3, 32, 32]'),
    ('dataset', lambda t: ['--dataset', 'mnist'], "unknown --dataset 'mnist'"),
    ('method', lambda t: ['--method', 'dmd'], "--method 'dmd'"),
    ('lsg-nan', lambda t: ['--lsg', 'nan'], '--lsg must be a finite float >= 0'),
    ('alpha-range', lambda t: ['--alpha', '3'], '--alpha must be a finite float in (0, 2]'),
    ('alpha-zero', lambda t: ['--alpha', '0'], '--alpha must be a finite float in (0, 2]'),
    ('batch-zero', lambda t: ['--batch', '0'], '--batch must be a finite int >= 1'),
    ('lr-zero', lambda t: ['--lr', '0'], '--lr must be a finite float > 0'),
    ('precision', lambda t: ['--precision', 'fp8'], "unknown --precision 'fp8'"),
    ('device', lambda t: ['--device', 'tpu'], '--device must be cpu or cuda'),
    ('device-cuda', lambda t: ['--dataset', 'cifar10', '--device', 'cuda'], 'no CUDA here'),
    ('net-overrides', lambda t: ['--dataset', 'cifar10', '--net-overrides', '[1, 2]'],
     '--net-overrides must be a JSON object'),
    ('toy-fid', lambda t: ['--fid-every-kimg', 10], 'do not apply to the toy'),
    ('batch-multiple', lambda t: ['--batch', 100, '--batch-gpu', 64, '--outdir', t / 'new'],
     'must be a multiple of --batch-gpu'),
    ('outdir-holds-run', lambda t: ['--outdir', t / 'run'],
     'holds a run: continue it with --resume'),
    ('resume-alpha', lambda t: ['--resume', t / 'run', '--alpha', '1.0'],
     '--resume: the run used other values of --alpha'),
    ('resume-fast', lambda t: ['--resume', t / 'run', '--fast'],  # defect 2: --fast is maths
     '--resume: the run used other values of --fast'),
    ('resume-sida-batch-gpu', lambda t: ['--resume', t / 'sida', '--batch-gpu', 256],  # defect 3
     "SiDA's losses are means over each micro-batch, so --batch-gpu must stay 512"),
    ('resume-no-config', lambda t: ['--resume', t / 'png16'], '--resume: no readable config.json'),
    ('resume-no-state', lambda t: ['--resume', t / 'nostate'], '--resume: no training state'),
    ('data-resolution', lambda t: TINY(t, 'n1', '--data', t / 'png16'),
     'dataset resolution 16x16 does not match the teacher resolution 32'),
    ('data-labels', lambda t: [*TINY(t, 'n2', '--data', t / 'png32'), '--dataset', 'cifar10-cond'],
     'dataset label_dim 0 does not match the teacher label_dim 10'),
    ('sida-no-data', lambda t: TINY(t, 'n3', '--method', 'sida', '--data', ''),
     'needs real images'),
    ('teacher-missing', lambda t: TINY(t, 'n4', '--teacher', t / 'missing.pkl'), 'missing.pkl'),
    ('fid-ref-missing', lambda t: TINY(t, 'n5', '--fid-every-kimg', 1, '--fid-ref', t / 'ref.npz'),
     'ref.npz'),
    ('teacher-missing-numbered', lambda t: ['--dataset', 'cifar10', '--teacher', t / 'gone.pkl'],
     'gone.pkl'),  # defect 4: a failed start leaves no numbered folder either
]


@pytest.mark.parametrize('sub', [False, True], ids=['in-process', 'subprocess'])
@pytest.mark.parametrize('name,args,msg', BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2(bad_env, name, args, msg, sub, monkeypatch):
    if 'cuda' in name and torch.cuda.is_available():
        pytest.skip('CUDA is available here')
    if sub and not SLOW and name != 'lsg-nan':
        pytest.skip('set SID_SLOW=1')  # the real command line once by default
    monkeypatch.chdir(bad_env)  # numbered run folders would go to ./runs
    before = sorted(os.listdir(bad_env))
    r = cli(*args(bad_env), sub=sub)
    assert_one_line_error(r, msg)
    assert sorted(os.listdir(bad_env)) == before  # nothing half-written, no new (empty) folder
    assert not os.path.exists(bad_env / 'run' / 'stats.jsonl')

def test_real_data_streams(tmp_path):
    """SiDA and SIGN on a toy draw the world's exact samples (a stream per rank and seed); SiD on a
    toy and data-free image runs draw none; --data gives the dataset's images."""
    for method in ('sida', 'sign', 'sid'):
        cfg = cfg_for(tmp_path / method, 'toy', 1, method=method, seed=3)
        with contextlib.redirect_stdout(io.StringIO()):
            run, s = runs.start(cfg, nets_for(cfg))
        if method == 'sid':
            assert s.data is None
            continue
        want = run.world.batches(s.batch_gpu, 3 * s.world_size + s.rank)
        assert all(torch.equal(next(s.data)[0], next(want)[0]) for _ in range(2))
    cfg = cfg_for(tmp_path / 'img', 'cifar10', 1)
    with contextlib.redirect_stdout(io.StringIO()):
        assert runs.start(cfg, nets_for(cfg))[1].data is None
    data = write_pngs(tmp_path / 'png', 4, size=32)
    cfg = cfg_for(tmp_path / 'data', 'cifar10', 1, data=data)
    with contextlib.redirect_stdout(io.StringIO()):
        x, _ = next(runs.start(cfg, nets_for(cfg))[1].data)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


#----------------------------------------------------------------------------
# A run's files: folder, status lines, stats, snapshots named by images seen, sample grids.

def test_end_to_end_image_run_files(tmp_path):
    cfg = cfg_for(tmp_path, iters=3, snap_kimg=0.008, sigma_init=1.5)  # grids at the run's level
    f_phi, G, f_psi = nets = nets_for(cfg)
    phi0, G0, psi0 = (copy_of(n) for n in nets)
    _, s, out = run_quiet(cfg, nets)
    assert states_equal(f_phi, phi0) and not any(p.requires_grad for p in f_phi.parameters())
    assert not states_equal(s.G, G0) and not states_equal(s.f_psi, psi0)
    with open(tmp_path / 'config.json') as f:
        assert json.load(f) == dataclasses.asdict(cfg)
    ticks = [line.split()[:4] for line in out.splitlines() if line.startswith('tick ')]
    assert ticks == [['tick', str(i), 'kimg', f'{0.004 * (i + 1):.1f}'] for i in range(3)]
    stats = read_stats(tmp_path)
    assert [e['kimg'] for e in stats] == pytest.approx([0.004, 0.008, 0.012])
    assert [e['tick'] for e in stats] == [0, 1, 2] and all(e['sec_per_kimg'] > 0 for e in stats)
    names = sorted(f for f in os.listdir(tmp_path) if f.startswith(('network', 'samples')))
    assert names == ['network-snapshot-000000008.pt', 'network-snapshot-000000012.pt',
                     'samples-000000008.png', 'samples-000000012.png']  # named by images seen
    assert load_state(tmp_path)['cur_nimg'] == 12
    net, info = checkpoints.load_checkpoint(runs.snapshot_path(str(tmp_path)))  # the latest
    assert states_equal(net, s.G_ema) and info['kimg'] == pytest.approx(0.012)
    assert info['config']['dataset'] == 'cifar10'
    with PIL.Image.open(tmp_path / 'samples-000000012.png') as im:
        assert im.size == (8 * 32, 8 * 32)
    grid = np.asarray(PIL.Image.open(tmp_path / 'samples-000000012.png'))
    for sigma_init, close in ((1.5, True), (2.5, False)):  # seed 9's image, at the run's level
        ref = fid.to_uint8(runs.sample_images(s.G_ema, [9], sigma_init, s.device))[0]
        err = np.abs(grid[32:64, 32:64].astype(int) - ref.permute(1, 2, 0).numpy()).max()
        assert (err <= 1) == close, (sigma_init, err)
    last = out.strip().splitlines()[-1]
    written = 'config.json, stats.jsonl, network-snapshot-000000008.pt'
    assert last.startswith(f'wrote {tmp_path}: {written}')


def copy_of(net):
    return copy.deepcopy(net)


def test_status_lines_are_the_means_of_their_iterations(tmp_path):
    """A tick of 2 iterations logs the mean of their losses, the extra term under its name."""
    cfg = cfg_for(tmp_path, 'toy', 4, method='sida', sida_warmup_kimg=0, tick_kimg=0.128)
    with contextlib.redirect_stdout(io.StringIO()):
        run, s = runs.start(cfg, nets_for(cfg))
        seen = []
        for it in sid.iterate(s):
            seen.append([float(it.loss_fake), float(it.loss_G), float(it.loss_extra)])
            runs.maintain(run, s, it)
        runs.finish(run, s)
    stats = read_stats(tmp_path)
    assert len(stats) == 2 and [round(e['kimg'] * 1e3) for e in stats] == [128, 256]
    for e, pair in zip(stats, (seen[:2], seen[2:])):
        mean = np.mean(pair, axis=0)
        assert [e['loss_fake'], e['loss_G'], e['loss_gan']] == pytest.approx(mean, rel=1e-12)
    assert seen[1][1] != 0 and seen[0] != seen[1]


@pytest.mark.parametrize('fail_on', ['snapshot', 'state'])
def test_crash_during_checkpoint_keeps_previous(tmp_path, monkeypatch, fail_on):
    cfg, real, seen = cfg_for(tmp_path, snap_kimg=0.004), torch.save, []  # 2 snapshots and states

    def save(obj, f, *a, **k):  # the 2nd iteration's write dies half-way, as if killed
        seen.append([n for n in os.listdir(tmp_path) if n.endswith('.tmp')])
        if len(seen) > 2 and ('opt_G' in obj) == (fail_on == 'state'):
            f.write(b'PK\x03\x04 half a file')
            raise KeyboardInterrupt
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, 'save', save)
    with pytest.raises(KeyboardInterrupt):
        run_quiet(cfg)
    tmp = r'\.(training-state\.pt|network-snapshot-00000000[48]\.pt)\.[0-9a-f]{6}\.tmp'
    assert len(seen) == 3 + (fail_on == 'state')
    assert all(len(t) == 1 and re.fullmatch(tmp, t[0]) for t in seen)  # via temporaries
    assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]  # the dying write cleaned up
    monkeypatch.setattr(torch, 'save', real)
    assert load_state(tmp_path)['cur_nimg'] == 4
    info = checkpoints.load_checkpoint(str(tmp_path / 'network-snapshot-000000004.pt'))[1]
    assert info['kimg'] == pytest.approx(0.004)
    assert os.path.exists(tmp_path / 'network-snapshot-000000008.pt') == (fail_on == 'state')
    _, _, out = run_quiet(runs.resolve_config(dict(resume=str(tmp_path))))  # continues
    assert 'resumed from' in out and load_state(tmp_path)['cur_nimg'] == 8


@slow
def test_sigkill_at_random_moments_then_resume_is_bitwise_and_leaves_no_half_file(tmp_path):
    """`python sid.py` killed 3 times and resumed = uninterrupted, bit for bit; every file left is
    whole (a temporary may remain: the next start removes it); a half line ending stats.jsonl (a
    kill mid-append) is dropped."""
    args = ['--dataset', 'toy', '--duration-mimg', 0.1, '--batch', 256, '--tick-kimg', 5,
            '--snap-kimg', 5]

    def start(*a):
        return subprocess.Popen([sys.executable, os.path.join(HERE, 'sid.py'), *map(str, a)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS='1'))

    a, b, rng = tmp_path / 'a', tmp_path / 'b', np.random.default_rng(int(time.time()))

    def state_time():
        path = b / 'training-state.pt'
        return os.path.getmtime(path) if os.path.exists(path) else 0

    p = start(*args, '--outdir', b)
    for _ in range(3):
        since = state_time()
        while p.poll() is None and state_time() == since:
            time.sleep(0.01)  # until this process has written a state: the kill lands in training
        time.sleep(rng.uniform(0, 0.5))
        assert p.poll() is None, ('the run ended before 3 kills', p.stderr.read()[-2000:])
        p.kill()
        p.wait()
        for name in os.listdir(b):  # whole files only
            if name.endswith('.pt'):
                torch.load(b / name, weights_only=True)
            elif name.endswith('.json'):
                json.load(open(b / name))
            else:
                assert name.endswith(('.tmp', '.jsonl', '.png', '.gif')), name
        with open(b / 'stats.jsonl', 'a') as f:
            f.write('{"kimg": 1')
        p = start('--resume', b)
    assert p.wait() == 0, p.stderr.read()[-2000:]
    assert cli(*args, '--outdir', a, sub=True).returncode == 0
    A, B = load_state(a), load_state(b)
    assert A['cur_nimg'] == B['cur_nimg'] > 1e5
    assert all(torch.equal(A[k][n], B[k][n]) for k in ('G', 'G_ema', 'f_psi') for n in A[k])
    assert [e['kimg'] for e in read_stats(b)] == [e['kimg'] for e in read_stats(a)]
    assert not [n for n in os.listdir(b) if n.endswith('.tmp')]

#----------------------------------------------------------------------------
# Resume's rules: what may change, what may not (defects 2 and 3 of the redesign).

def test_resume_keeps_the_maths(tmp_path):
    """--fast changes the precision: refused on resume unless the run was fast (config.json says
    what runs); SiDA's losses depend on the micro-batch: its --batch-gpu stays; SiD's may change
    (its maths does not depend on it); the allowed changes reach the resumed config."""
    for name, over in (('sid', {}), ('sida', dict(method='sida')), ('fast', dict(fast=True))):
        cfg = sid.make_config(dict(over, dataset='cifar10', outdir=str(tmp_path / name)))
        os.makedirs(cfg.outdir)
        runs.write_json(os.path.join(cfg.outdir, 'config.json'), dataclasses.asdict(cfg))
    sid_ = runs.resolve_config(dict(resume=str(tmp_path / 'sid'), batch_gpu=8, duration_mimg=600))
    assert (sid_.batch_gpu, sid_.duration_mimg, sid_.alpha) == (8, 600, 1.2)
    with pytest.raises(ValueError, match='--fast'):
        runs.resolve_config(dict(resume=str(tmp_path / 'sid'), fast=True))
    fast = runs.resolve_config(dict(resume=str(tmp_path / 'fast'), fast=True))
    assert (fast.fast, fast.precision, fast.channels_last, fast.batch_gpu) == (
        True, 'bf16', True, 64)
    with pytest.raises(ValueError, match='--fast'):
        runs.resolve_config(dict(resume=str(tmp_path / 'fast'), fast=False))
    with pytest.raises(ValueError, match='--batch-gpu must stay 32'):
        runs.resolve_config(dict(resume=str(tmp_path / 'sida'), batch_gpu=16))
    assert runs.resolve_config(dict(resume=str(tmp_path / 'sida'), batch_gpu=32)).batch_gpu == 32
    maths = dict(method='sign', alpha=1.0, sigma_init=2.0, tmax=600, ls=2.0, lsg=10.0, lsd=2.0,
                 lsg_gan=0.1, psi_warmup_kimg=1, sida_warmup_kimg=50, sida_mix_kimg=100,
                 lambda_idem=1.0, lambda_rec=1.0, lambda_flow=1.0, teacher='t.pkl',
                 init_generator='g', net_overrides='{}', seed=1, batch=512, lr=2e-5, glr=2e-5,
                 g_beta1=0.5, dropout=0.1, augment=0.1, ema_mimg=1.0, precision='fp16')
    for k, v in maths.items():  # every option that enters the losses, the draws or the update
        with pytest.raises(ValueError, match='--' + k.replace('_', '-')):
            runs.resolve_config(dict(resume=str(tmp_path / 'sid'), **{k: v}))


def test_resume_data_position_across_world_sizes(tmp_path):
    """The training state counts the real images drawn by all ranks; a resume on another number of
    GPUs or micro-batch size continues each stream at that count (in its own micro-batches)."""
    def state(world_size, batch_gpu, data_batches=0):
        nets = {k: nn.Linear(2, 2) for k in ('G', 'G_ema', 'f_psi')}
        opts = {k: torch.optim.Adam(nets[n].parameters()) for k, n in (('opt_G', 'G'),
                                                                         ('opt_psi', 'f_psi'))}
        cfg = sid.Config(resume=str(tmp_path / 'training-state.pt'))
        return types.SimpleNamespace(**nets, **opts, cur_nimg=64, end_nimg=128, cfg=cfg,
                                     world_size=world_size, batch_gpu=batch_gpu,
                                     data_batches=data_batches, device=torch.device('cpu'))

    run = runs.Run(cfg=sid.Config(), log=runs.silent)
    runs.write_training_state(str(tmp_path / 'training-state.pt'), run, state(2, 4, 6))
    assert load_state(tmp_path)['data_images'] == 48  # 6 micro-batches of 4 on each of 2 ranks
    for world_size, batch_gpu, data_batches in ((2, 4, 6), (1, 8, 6), (1, 4, 12), (4, 2, 6)):
        s = state(world_size, batch_gpu)
        runs.resume(run, s)
        assert (s.cur_nimg, s.data_batches) == (64, data_batches), (world_size, batch_gpu)

#----------------------------------------------------------------------------
# FID in the loop: each value against an independent computation, the best snapshot, the plot, and
# across resume the best snapshot is never replaced by a worse one.

def fid_setup(tmp_path, monkeypatch):
    monkeypatch.setenv('SID_DETECTOR', detector_file(tmp_path / 'det.pt', dim=8))
    mu_ref, sig_ref = np.full(8, 0.1), np.eye(8) * 0.5
    fid.save_ref(str(tmp_path / 'ref.npz'), mu_ref, sig_ref)
    return mu_ref, sig_ref


def independent_fid(G, mu_ref, sig_ref, sigma_init=2.5, num=16):
    """FID of G on seeds 0..num-1 from numpy statistics of the stand-in detector's features."""
    gens = [torch.Generator().manual_seed(s) for s in range(num)]
    z = sigma_init * torch.stack([torch.randn([3, 32, 32], generator=g) for g in gens])
    with torch.no_grad():
        x = G(z, torch.full([num, 1, 1, 1], sigma_init))
    feats = FidStandIn(dim=8)((x * 127.5 + 128).clip(0, 255).to(torch.uint8), True).double().numpy()
    return fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu_ref, sig_ref)


def test_fid_in_loop_best_snapshot_and_plot(tmp_path, monkeypatch):
    mu_ref, sig_ref = fid_setup(tmp_path, monkeypatch)
    cfg = cfg_for(tmp_path / 'run', iters=3, fid_every_kimg=0.004, fid_num=16,
                  fid_ref=str(tmp_path / 'ref.npz'), lr=1e-2, glr=1e-2, sigma_init=1.5)
    nets = nets_for(cfg)
    _, s, out = run_quiet(cfg, (nets[0], perturb_copy(nets[1]), nets[2]))
    fids = load_state(tmp_path / 'run')['fid']
    assert [m for m, _ in fids] == pytest.approx([4e-6, 8e-6, 12e-6])
    assert len({v for _, v in fids}) == 3
    assert sum(line.startswith('FID ') for line in out.splitlines()) == 3
    assert [e['fid'] for e in read_stats(tmp_path / 'run') if 'fid' in e] == [v for _, v in fids]
    # the run's sigma_init (1.5), not the default
    assert fids[-1][1] == pytest.approx(independent_fid(s.G_ema, mu_ref, sig_ref, 1.5), rel=1e-6)
    assert fids[-1][1] != pytest.approx(independent_fid(s.G_ema, mu_ref, sig_ref), rel=1e-3)
    G, info = checkpoints.load_checkpoint(str(tmp_path / 'run' / 'network-snapshot-best.pt'))
    m_best, v_best = min(fids, key=lambda p: p[1])
    assert info['kimg'] == pytest.approx(m_best * 1e3)
    best = torch.load(tmp_path / 'run' / 'network-snapshot-best.pt', weights_only=True)
    assert best['fid'] == v_best
    assert os.path.getsize(tmp_path / 'run' / 'fid.png') > 1000
    assert v_best == pytest.approx(independent_fid(G, mu_ref, sig_ref, 1.5), rel=1e-6)
    assert runs.snapshot_path(str(tmp_path / 'run')).endswith('network-snapshot-best.pt')


def test_fid_history_survives_resume_and_best_is_never_replaced_by_worse(tmp_path, monkeypatch):
    """A run with FID, resumed: the FID history is restored (the values are the uninterrupted
    run's), and the best snapshot is the best FID over the WHOLE history: a copy of the run whose
    history holds a better earlier value keeps its best snapshot through the resume."""
    mu_ref, sig_ref = fid_setup(tmp_path, monkeypatch)

    def make(out, iters, **kw):
        return cfg_for(tmp_path / out, iters=iters, fid_every_kimg=0.004, fid_num=16,
                       fid_ref=str(tmp_path / 'ref.npz'), lr=1e-2, glr=1e-2, **kw)

    def resume(out):
        cfg = runs.resolve_config(dict(resume=str(tmp_path / out),
                                       duration_mimg=make('', 4).duration_mimg))
        run_quiet(cfg, [copy_of(n) for n in nets])

    nets = nets_for(make('x', 1))
    nets = (nets[0], perturb_copy(nets[1]), nets[2])
    run_quiet(make('a', 4), [copy_of(n) for n in nets])
    run_quiet(make('b', 2), [copy_of(n) for n in nets])
    shutil.copytree(tmp_path / 'b', tmp_path / 'c')
    resume('b')
    fa, fb = load_state(tmp_path / 'a')['fid'], load_state(tmp_path / 'b')['fid']
    assert fa == fb and len(fb) == 4
    best = min(fb, key=lambda p: p[1])
    G, info = checkpoints.load_checkpoint(str(tmp_path / 'b' / 'network-snapshot-best.pt'))
    assert info['kimg'] == pytest.approx(best[0] * 1e3)
    assert independent_fid(G, mu_ref, sig_ref) == pytest.approx(best[1], rel=1e-6)
    assert [e['fid'] for e in read_stats(tmp_path / 'b') if 'fid' in e] == [v for _, v in fb]
    state = load_state(tmp_path / 'c')  # c's history: its first FID far better than any later one
    state['fid'][0] = (state['fid'][0][0], 0.0)
    torch.save(state, tmp_path / 'c' / 'training-state.pt')
    best_before = (tmp_path / 'c' / 'network-snapshot-best.pt').read_bytes()
    resume('c')
    assert (tmp_path / 'c' / 'network-snapshot-best.pt').read_bytes() == best_before
    assert [v for _, v in load_state(tmp_path / 'c')['fid']][1:] == [v for _, v in fb][1:]


#----------------------------------------------------------------------------
# `generate` and `project`: per-seed images (a batch split moves a pixel by at most one grey
# level), grids, classes, the run's sigma_init, the best snapshot, SIGN's steps.

def read_png(path):
    with PIL.Image.open(path) as im:
        return np.asarray(im).astype(int)


def tiny_snapshot(tmp_path, dataset, name, seed=1, **cfg_kw):
    """A perturbed tiny generator saved as a snapshot with its run's Config."""
    G = perturb_copy(nets_for(cfg_for(tmp_path / 'u', dataset), perturb=False)[1], seed).eval()
    path = str(tmp_path / name)
    runs.save_snapshot(path, G, 0, sid.Config(dataset=dataset, **cfg_kw))
    return path, G


def expected_png(G, seed, sigma_init=2.5, c=None, steps=()):
    """A seed's image computed here: z = sigma_init eps from the seed, G(z; sigma_init), uint8 by
    EDM's rule."""
    g = torch.Generator().manual_seed(seed)
    z = sigma_init * torch.randn([1, 3, 32, 32], generator=g)
    labels = None if c is None else F.one_hot(torch.tensor([c]), 10).float()
    with torch.no_grad():
        x = G(z, torch.full([1, 1, 1, 1], sigma_init), labels)
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy().astype(int)


def test_generate_per_seed_grid_classes_and_sigma_init(tmp_path):
    snap, G = tiny_snapshot(tmp_path, 'cifar10', 'u.pt', sigma_init=1.5)

    def gen(ckpt, out, *a):
        return cli('generate', '--device', 'cpu', '--ckpt', ckpt, '--outdir', tmp_path / out, *a)

    assert gen(snap, 'a', '--seeds', '0-3', '--batch', 4).returncode == 0
    assert gen(snap, 'b', '--seeds', '2,3,0-1', '--batch', 3).returncode == 0
    names = [f'{s:06d}.png' for s in range(4)]
    imgs = [read_png(tmp_path / 'a' / n) for n in names]
    assert sorted(os.listdir(tmp_path / 'b')) == names and imgs[0].shape == (32, 32, 3)
    assert imgs[0].std() > 10 and not np.array_equal(imgs[0], imgs[1])
    for n, im in zip(names, imgs):  # any batch split: at most one grey level apart
        assert np.abs(read_png(tmp_path / 'b' / n) - im).max() <= 1
    for s in range(4):  # the run's sigma_init (1.5), not 2.5
        assert np.abs(imgs[s] - expected_png(G, s, 1.5)).max() <= 1
        assert np.abs(imgs[s] - expected_png(G, s, 2.5)).max() > 1
    assert gen(snap, 'g', '--seeds', '0-3', '--grid').returncode == 0
    grid = read_png(tmp_path / 'g' / 'grid.png')
    assert os.listdir(tmp_path / 'g') == ['grid.png']
    assert np.abs(grid[:32, 32:] - imgs[1]).max() <= 1
    assert np.abs(grid[32:, 32:] - imgs[3]).max() <= 1
    cond, Gc = tiny_snapshot(tmp_path, 'cifar10-cond', 'c.pt')
    for c in (0, 3, 7):  # the class asked for, class 0 included
        assert gen(cond, str(c), '--seeds', '0-1', '--class-idx', c).returncode == 0
        for s in range(2):
            png = read_png(tmp_path / str(c) / f'{s:06d}.png')
            assert np.abs(png - expected_png(Gc, s, 2.5, c)).max() <= 1
            other = expected_png(Gc, s, 2.5, (c + 1) % 10)
            assert np.abs(png - other).max() > 1
    assert_one_line_error(gen(cond, 'x', '--class-idx', 10), 'this generator has classes 0..9')
    assert gen(cond, 'r', '--seeds', '0-1').returncode == 0  # no --class-idx: a class per seed
    for s in (0, 1):
        g = torch.Generator().manual_seed(s)
        torch.randn([3, 32, 32], generator=g)  # the seed's latent first, then its label (EDM's)
        k = int(torch.randint(10, (), generator=g))
        png = read_png(tmp_path / 'r' / f'{s:06d}.png')
        assert np.abs(png - expected_png(Gc, s, 2.5, k)).max() <= 1


def test_generate_picks_the_best_snapshot_of_a_run(tmp_path):
    """--ckpt RUN: network-snapshot-best.pt where one exists, else the latest snapshot."""
    run = tmp_path / 'run'
    os.makedirs(run)
    for name, seed in (('network-snapshot-000000004.pt', 1), ('network-snapshot-000000008.pt', 2)):
        tiny_snapshot(run, 'cifar10', name, seed)
    assert runs.snapshot_path(str(run)) == str(run / 'network-snapshot-000000008.pt')
    _, best = tiny_snapshot(run, 'cifar10', 'network-snapshot-best.pt', 3)
    r = cli('generate', '--ckpt', run, '--seeds', '0', '--outdir', tmp_path / 'o')
    assert r.returncode == 0
    assert np.abs(read_png(tmp_path / 'o' / '000000.png') - expected_png(best, 0)).max() <= 1


def test_sign_noise_per_seed_fresh_per_step():
    """Identity generator: x_K = z + sum_k sigma_k eps_k, eps_k from the seed's own generator,
    fresh every step."""
    G, dev = Stub(lambda m, x, s: x, img_shape=(3, 2, 2)), torch.device('cpu')
    x0, x1, x2 = (runs.sample_images(G, range(6), 2.5, dev, sigmas=s)
                  for s in ((), (1.0,), (1.0, 1.0)))
    assert torch.equal(runs.sample_images(G, [3, 4, 5], 2.5, dev, sigmas=(1.0, 1.0)), x2[3:])
    assert torch.equal(runs.sample_images(G, [4], 2.5, dev, sigmas=(1.0,)), x1[4:5])
    eps1, eps2 = x1 - x0, x2 - x1
    assert eps1.std().item() == pytest.approx(1, abs=0.3)
    assert eps2.std().item() == pytest.approx(1, abs=0.3)
    assert not torch.allclose(eps1, eps2, atol=0.1)  # fresh noise every step
    assert not torch.allclose(eps1, x0 / 2.5, atol=0.1)  # not the latent


def test_project_images_and_points_use_the_run_and_the_images_range(tmp_path):
    """project: each image read into G's range [-1, 1], f(y + sigma eps) at the run's sigma_init,
    written with EDM's uint8 rule; toy points [N, 2] likewise, into projected.npy; and generate's
    toy points (samples.npy) at the run's sigma_init."""
    snap, G = tiny_snapshot(tmp_path, 'cifar10', 'u.pt', sigma_init=1.5)
    files = write_pngs(tmp_path / 'in', 2, size=32)
    r = cli('project', '--ckpt', snap, '--input', files, '--outdir', tmp_path / 'p')
    assert r.returncode == 0 and sorted(os.listdir(tmp_path / 'p')) == sorted(os.listdir(files))
    for name in os.listdir(files):
        y = torch.from_numpy(read_png(os.path.join(files, name))).permute(2, 0, 1).float()
        y = y[None] / 127.5 - 1
        with torch.no_grad():
            x = G(y, torch.full([1, 1, 1, 1], 1.5))
        ref = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
        assert np.abs(read_png(tmp_path / 'p' / name) - ref).max() <= 1
    cond, Gc = tiny_snapshot(tmp_path, 'cifar10-cond', 'c.pt')  # conditional: the class asked for
    for c in (0, 6):
        out = tmp_path / f'pc{c}'
        r = cli('project', '--ckpt', cond, '--input', files, '--class-idx', c, '--outdir', out)
        assert r.returncode == 0
        name = sorted(os.listdir(files))[0]
        y = torch.from_numpy(read_png(os.path.join(files, name))).permute(2, 0, 1).float()
        with torch.no_grad():
            x = Gc(y[None] / 127.5 - 1, torch.full([1, 1, 1, 1], 2.5),
                   F.one_hot(torch.tensor([c]), 10).float())
        ref = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
        assert np.abs(read_png(out / name) - ref).max() <= 1
    toy = sid.make_config(dict(outdir=str(tmp_path / 't')))
    Gt = nets_for(toy)[1].eval()
    runs.save_snapshot(str(tmp_path / 't.pt'), Gt, 0, dataclasses.replace(toy, sigma_init=0.7))
    pts = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    np.save(tmp_path / 'pts.npy', pts)
    r = cli('project', '--ckpt', tmp_path / 't.pt', '--input', tmp_path / 'pts.npy', '--sigma', 0.1,
            '--seed', 3, '--outdir', tmp_path / 'q')
    assert r.returncode == 0
    eps = torch.randn([5, 2], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = Gt(torch.from_numpy(pts) + 0.1 * eps, torch.full([5, 1], 0.7))
    assert np.allclose(np.load(tmp_path / 'q' / 'projected.npy'), want.numpy(), atol=1e-6)
    r = cli('generate', '--ckpt', tmp_path / 't.pt', '--seeds', '0-4', '--outdir', tmp_path / 'g')
    assert r.returncode == 0 and os.path.getsize(tmp_path / 'g' / 'samples.png') > 1000
    z = 0.7 * torch.stack([torch.randn(2, generator=torch.Generator().manual_seed(s))
                           for s in range(5)])  # toy points: the run's sigma_init too
    with torch.no_grad():
        want = Gt(z, torch.full([5, 1], 0.7))
    assert np.allclose(np.load(tmp_path / 'g' / 'samples.npy'), want.numpy(), atol=1e-6)
