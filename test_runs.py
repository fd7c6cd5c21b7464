"""Tests of the run driver (runs.py): presets and the command line, one table of bad inputs, run
folders and a failed start, status lines and stats, FID in the loop and across resume, snapshots,
crash safety, resume's rules, and the `generate` and `project` commands.
"""
import contextlib
import copy
import dataclasses
import http.server
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import draw
import edm_nets
import fid
import fileio
import metrics
import releases
import runs
import sid
from conftest import (HERE, SLOW, slow, Stub, NET, EDM2_NET, cfg_for, perturb_copy, nets_for,
                      run_quiet, cli, assert_one_line_error, states_equal, read_stats, load_state,
                      edm_files, latent_files, needs_diffusers, write_bytes, write_dataset,
                      write_pngs, FidStandIn, detector_file, edm2_nets, loop_state, tiny_net,
                      write_edm_pickle, write_edm2_pickle, Evil)

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
    monkeypatch.chdir(tmp_path)  # run folders: EDM's numbering, made at the start (not before)
    assert runs.resolve_config({}).outdir == '' and not os.path.exists('runs')
    assert runs.new_run_dir('runs', 'toy-sid') == os.path.join('runs', '00000-toy-sid')
    os.makedirs('runs/00007-cifar10-sid')
    os.makedirs('runs/notes')
    assert runs.new_run_dir('runs', 'cifar10-sida') == os.path.join('runs', '00008-cifar10-sida')


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

    monkeypatch.setattr(runs, 'claim_folder', stop)  # the message comes first
    with pytest.raises(KeyboardInterrupt):
        runs.start(sid.make_config(dict(batch=64, batch_gpu=64, outdir='x')))
    msg = '--batch-gpu 64 > --batch 64 / 2 GPUs: using micro-batches of 32'
    assert msg in capsys.readouterr().out

#----------------------------------------------------------------------------
# Bad input: one line `error: ...`, exit code 2, nothing written (for training, generate, project).

@pytest.fixture
def bad_env(tmp_path):
    """Files the bad-input table refers to: snapshots (32-px unconditional, 10-class, the 2-D
    toy's), run folders (SiD, SiDA and SIGN on CIFAR-10, SiDA on the toy, without state, written by
    a version that did not record alpha), small PNG datasets, a folder with a.png and a.jpg."""
    G = perturb_copy(nets_for(cfg_for(tmp_path / 'unused'), perturb=False)[1])
    runs.save_snapshot(str(tmp_path / 'g.pt'), G.eval(), 0, sid.Config())
    Gc = perturb_copy(nets_for(cfg_for(tmp_path / 'unused', 'cifar10-cond'), perturb=False)[1])
    runs.save_snapshot(str(tmp_path / 'cond.pt'), Gc.eval(), 0, sid.Config(dataset='cifar10-cond'))
    toy = sid.make_config({'outdir': str(tmp_path / 'unused')})
    runs.save_snapshot(str(tmp_path / 'toy.pt'), nets_for(toy)[1].eval(), 0, toy)

    def c10(method):
        return sid.make_config({'dataset': 'cifar10', 'method': method, 'outdir': 'x'})

    folders = (('run', sid.make_config({'outdir': str(tmp_path / 'run')})),
               ('sida', sid.make_config({'method': 'sida', 'outdir': str(tmp_path / 'sida')})),
               ('sida10', c10('sida')), ('sign10', c10('sign')), ('old', c10('sid')),
               ('nostate', cfg_for(tmp_path / 'nostate')))
    for name, cfg in folders:
        os.makedirs(tmp_path / name)
        saved = {k: v for k, v in dataclasses.asdict(cfg).items() if (name, k) != ('old', 'alpha')}
        runs.write_json(str(tmp_path / name / 'config.json'), saved)
    (tmp_path / 'run' / 'training-state.pt').write_bytes(b'')  # a run, not an empty start
    os.makedirs(tmp_path / 'full')
    (tmp_path / 'full' / 'x').write_text('x')
    write_pngs(tmp_path / 'png16', 3, size=16)
    write_pngs(tmp_path / 'png32', 3, size=32)
    clash = write_pngs(tmp_path / 'clash', 1, size=32)
    with PIL.Image.open(os.path.join(clash, 'img00000000.png')) as im:
        im.save(os.path.join(clash, 'img00000000.jpg'))
    G2 = edm2_nets(cfg_for(tmp_path / 'unused', 'imagenet512-xs', net_overrides=EDM2_NET))[1]
    runs.save_snapshot(str(tmp_path / 'g2.pt'), G2.eval(), 0, sid.Config())
    write_bytes(tmp_path / 'labels.json', json.dumps({'labels': [['a.png', 3]]}).encode())
    write_dataset(tmp_path / 'lat4.zip', latent_files(2, res=4)[0], None, 'zip')
    return tmp_path


TINY_ARGS = ['--teacher', 'random', '--net-overrides', NET, '--batch', 4, '--batch-gpu', 2,
             '--duration-mimg', 4e-6, '--device', 'cpu']


def GEN(t, *a):
    return ['generate', '--ckpt', t / 'g.pt', '--outdir', t / 'o', *a]


def EVAL(ckpt, *a):
    return ['evaluate', '--ckpt', ckpt, '--num', 20, '--device', 'cpu', *a]


def TINY(t, out, *a):
    return ['--dataset', 'cifar10', *TINY_ARGS, '--outdir', t / out, *a]


def TINY2(t, out, *a):  # EDM2
    return ['--dataset', 'imagenet512-xs', *TINY_ARGS, '--net-overrides', EDM2_NET, '--vae',
            'random', '--outdir', t / out, *a]


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
    ('resume-no-state', lambda t: ['--resume', t / 'nostate' / 'training-state.pt'],
     '--resume: no training state'),
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
    ('edm2-augment', lambda t: ['--dataset', 'imagenet512-xs', '--augment', 0.1],
     '--augment: EDM2 networks take no augmentation labels'),
    ('edm2-sign', lambda t: ['--dataset', 'imagenet512-m', '--method', 'sign'],
     '--method sign is not wired for EDM2 latents'),
    ('edm2-no-head', lambda t: TINY2(t, 'n15', '--net-overrides', '{"logvar_channels": 0, '
                                     '"img_resolution": 8, "model_channels": 16}'),
     '--logvar: this teacher has no log-variance head'),
    ('edm2-labels-sida', lambda t: TINY2(t, 'n12', '--method', 'sida', '--data', t / 'labels.json'),
     'a labels file holds no images; --method sida needs real ones'),
    ('edm2-latent-shape', lambda t: TINY2(t, 'n13', '--method', 'sida', '--data', t / 'lat4.zip'),
     'latents [8, 4, 4] (posterior mean and std), but the teacher needs [8, 8, 8]'),
    ('edm2-vae-missing', lambda t: TINY2(t, 'n14', '--vae', t / 'no-vae'), 'VAE'),
    ('edm2-project', lambda t: ['project', '--ckpt', t / 'g2.pt', '--input', t / 'png32',
                                '--outdir', t / 'o'], 'EDM2 latent generators are not supported'),
    ('init-generator-release', lambda t: TINY(t, 'n11', '--init-generator', 'sid-ffhq64-a1.2'),
     'sid-ffhq64-a1.2 was distilled from ffhq-64x64-uncond-vp'),
    ('init-generator-edm2', lambda t: TINY(t, 'n11', '--init-generator', 'sid-img512-xs-a1'),
     'sid-img512-xs-a1 was distilled from edm2-img512-xs'),
    ('eval-metric', lambda t: EVAL(t / 'g.pt', '--metrics', 'fid,kid'),
     "unknown metric(s) ['kid']"),
    ('eval-num', lambda t: EVAL(t / 'g.pt', '--num', 1), 'need at least 2 images'),
    ('eval-no-ref', lambda t: EVAL(t / 'g.pt'), 'no reference statistics'),
    ('eval-ref-size', lambda t: EVAL(t / 'g.pt', '--ref', 'imagenet-64x64'),
     'reference imagenet-64x64 is of 64x64 images, the generator makes 32x32'),
    ('eval-out-exists', lambda t: EVAL(t / 'g.pt', '--out', t / 'full'), 'exists: choose a new'),
    # released generators: refused before anything is downloaded
    ('eval-release-ref', lambda t: EVAL('sid-cifar10-uncond-a1.2', '--ref', 'ffhq-64x64'),
     'reference ffhq-64x64 is of 64x64 images, the generator makes 32x32'),
    ('eval-release-edm2-ref', lambda t: EVAL('sida-img512-xs-a1', '--ref', 'imagenet-64x64'),
     'reference imagenet-64x64 is of 64x64 images, the generator makes 512x512'),
    ('eval-release-name', lambda t: EVAL('sid-cifar10-a1.2'), 'unknown released generator'),
    # issue 22: a resume writes only into its folder; what it may change (Config's metadata)
    ('resume-outdir-elsewhere', lambda t: ['--resume', t / 'run', '--outdir', t / 'sida'],
     'continues a run in its own folder'),
    ('resume-data-sida', lambda t: ['--resume', t / 'sida10', '--data', t / 'png32'],
     'other values of --data'),
    ('resume-data-sign', lambda t: ['--resume', t / 'sign10', '--data', t / 'png32'],
     'other values of --data'),
    ('resume-precision', lambda t: ['--resume', t / 'run', '--precision', 'bf16'],
     'other values of --precision'),
    ('resume-unrecorded', lambda t: ['--resume', t / 'old', '--alpha', '0.5'],
     'does not record --alpha'),  # a field missing from config.json takes no new value
    # issue 22: the teacher must match the dataset preset; --teacher random has a size limit
    ('teacher-toy', lambda t: TINY(t, 'n6', '--teacher', t / 'toy.pt'), 'is a 2-D toy network'),
    ('teacher-resolution', lambda t: [*TINY(t, 'n7', '--teacher', t / 'g.pt'), '--dataset',
                                      'ffhq64'],
     'makes 32x32 3-channel unconditional images, --dataset ffhq64 64x64 3-channel unconditional'),
    ('teacher-labels', lambda t: TINY(t, 'n8', '--teacher', t / 'cond.pt'),
     '--dataset cifar10 32x32 3-channel unconditional ones'),
    # (--dry-run: the same checks as a start; broken, they would download or allocate 230 GB)
    ('teacher-named', lambda t: ['--dataset', 'ffhq64', '--teacher', 'cifar10-32x32-uncond-vp',
                                 '--dry-run'],
     """state its shape: --net-overrides '{"img_resolution": 32}'"""),  # before any download
    ('random-too-large', lambda t: ['--dataset', 'cifar10', '--teacher', 'random',
                                    '--net-overrides', '{"model_channels": 4096}', '--dry-run'],
     '--teacher random: a network of 5.7e+10 parameters (limit 2e+09)'),
    # issue 22: generate and project never report more than they wrote, never overwrite their own
    # outputs, and work in bounded batches (issue 20)
    ('seeds-twice', lambda t: GEN(t, '--seeds', '1,1,1'), 'seed 1 is given twice'),
    ('seeds-overlap', lambda t: GEN(t, '--seeds', '7,0-5,3'), 'seed 3 is given twice'),
    ('seeds-open', lambda t: GEN(t, '--seeds', '0-'), "bad --seeds '0-'"),
    ('gen-batch-huge', lambda t: GEN(t, '--seeds', '0-9999999', '--batch', 1000000),
     '--batch 1000000: at most 5461 images of [3, 32, 32] per forward pass'),
    ('gen-grid-huge', lambda t: GEN(t, '--seeds', '0-99999', '--grid'),
     'more than one PNG may hold'),
    ('gen-grid-toy', lambda t: ['generate', '--ckpt', t / 'toy.pt', '--grid', '--outdir', t / 'o'],
     '--grid: a 2-D toy generator writes its points'),
    ('project-repeat', lambda t: ['project', '--ckpt', t / 'g.pt', '--input', t / 'png32',
                                  '--repeat', 10 ** 9, '--outdir', t / 'o'],
     '--repeat in [1, 1000]'),
    ('project-name-clash', lambda t: ['project', '--ckpt', t / 'g.pt', '--input', t / 'clash',
                                      '--outdir', t / 'o'],
     'img00000000.jpg and img00000000.png would both be written as img00000000.png'),
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
            else:  # run.lock: the folder's lock, free once its holder is dead
                assert name.endswith(('.tmp', '.jsonl', '.png', '.gif', '.lock')), name
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
# Resume's rules and run folders: what may change, what may not (defects 2 and 3 of the redesign;
# issue 22: the one policy, one run per folder, a resume in its own folder, stuck folders, snapshot
# order, failed writes and allocations, Ctrl-C).

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


# The resume policy, as the tests pin it: what may change leaves the maths as it is; --data (SiDA's
# and SIGN's real images, conditional runs' labels), --precision (fp16 also sets Adam's eps; bf16
# and tf32 round every product to ~1e-3) and every other option are fixed.
MAY_CHANGE = {'duration_mimg', 'tick_kimg', 'snap_kimg', 'fid_every_kimg', 'device', 'compile',
              'checkpointing', 'channels_last', 'fused_adam', 'vae'}
OTHER = dict(dataset='cifar10-cond', method='sign', alpha=0.8, sigma_init=2.0, tmax=700, ls=2.0,
             lsg=10.0, lsd=2.0, lsg_gan=0.1, psi_warmup_kimg=1, sida_warmup_kimg=5,
             sida_mix_kimg=7, lambda_idem=1.0, lambda_rec=1.0, lambda_flow=1.0, teacher='t.pkl',
             data='d', init_generator='g', net_overrides='{}', seed=5, batch=512, batch_gpu=8,
             lr=1e-4, glr=1e-4, g_beta1=0.5, dropout=0.2, augment=0.3, ema_mimg=1.0,
             duration_mimg=900, fast=True, precision='bf16', channels_last=True, fused_adam=True,
             compile=True, checkpointing=True, device='cpu', tick_kimg=5, snap_kimg=50,
             fid_every_kimg=50, fid_num=1000, fid_ref='r.npz', P_mean=-0.4, P_std=1.0,
             logvar=True, clip_psi=False, force_normalization=False, vae='random')


def test_resume_policy_is_one_source_in_code_help_and_readme(tmp_path, capsys):
    """Every option, changed on resume, is refused exactly when its Config metadata says fixed
    (SiDA: --batch-gpu too); the policy is the one pinned above; --help and the README's Resume
    paragraph list the same options; an option config.json does not record takes no new value."""
    fields = {f.name: f.metadata['resume'] for f in dataclasses.fields(sid.Config)}
    assert {k for k, v in fields.items() if v == 'may change'} == MAY_CHANGE
    assert {k for k, v in fields.items() if v == 'fixed for sida'} == {'batch_gpu'}
    assert set(OTHER) == set(fields) - {'resume', 'outdir'}
    for method in ('sid', 'sida'):
        cfg = sid.make_config(dict(dataset='cifar10', method=method, outdir='x'))
        folder = tmp_path / method
        os.makedirs(folder)
        runs.write_json(str(folder / 'config.json'), dataclasses.asdict(cfg))
        for k, v in OTHER.items():
            assert v != getattr(cfg, k), k
            if k in MAY_CHANGE or (k == 'batch_gpu' and method != 'sida'):
                assert getattr(runs.resolve_config({'resume': str(folder), k: v}), k) == v
            else:
                with pytest.raises(ValueError, match=f"{runs.flag(k)}( |,|;|$)"):
                    runs.resolve_config({'resume': str(folder), k: v})
    help_text = ' '.join(cli('--help').stdout.split('\nresume:\n')[1].split())
    readme = open(os.path.join(HERE, 'README.md')).read()
    resume = ' '.join(readme.split('**Resume.**')[1].split('\n\n')[0].split())
    for text in (help_text, resume.replace('`', '')):
        may = text.split('may change ')[1].split(':')[0]
        assert set(re.findall(r'--([\w-]+)', may)) == {runs.flag(k)[2:] for k in MAY_CHANGE} | {
            'batch-gpu'}, text
        assert 'except for SiDA --batch-gpu' in text
    saved = json.load(open(tmp_path / 'sid' / 'config.json'))  # another version: no alpha, no lr
    del saved['alpha'], saved['lr']
    runs.write_json(str(tmp_path / 'sid' / 'config.json'), saved)
    with pytest.raises(ValueError, match='does not record --alpha'):
        runs.resolve_config({'resume': str(tmp_path / 'sid'), 'alpha': 1.2})
    capsys.readouterr()
    assert runs.resolve_config({'resume': str(tmp_path / 'sid')}).alpha == 1.2
    assert 'does not record --alpha, --lr (another version' in capsys.readouterr().out


class Recorder(http.server.BaseHTTPRequestHandler):
    """A local server that records every request and has no files (404)."""
    seen = []

    def do_GET(self):
        self.seen.append(self.path)
        self.send_error(404)

    def log_message(self, *args):
        pass


def test_resumed_config_json_is_checked_before_anything_is_fetched(tmp_path, monkeypatch):
    """A resumed run's config.json is checked as a command line is: unknown fields, wrong types
    (a list, a number or an object where text goes; text where a number goes), NaN and ranges give
    one line naming the file, and its teacher and fid_ref URLs are not fetched before that (a local
    server counts the requests; a good file does reach it)."""
    monkeypatch.setenv('SID_CACHE', str(tmp_path / 'cache'))
    server = http.server.HTTPServer(('127.0.0.1', 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f'http://127.0.0.1:{server.server_port}'
    good = dict(dataclasses.asdict(cfg_for(tmp_path / 'r')), teacher=f'{url}/teacher.pkl',
                fid_ref=f'{url}/ref.npz', fid_every_kimg=1.0, net_overrides='')
    bad = [(dict(dataset=['cifar10']), "--dataset must be text, got ['cifar10']"),
           (dict(device=5), '--device must be text, got 5'),
           (dict(net_overrides={'model_channels': 16}), '--net-overrides must be text'),
           (dict(alpha='1.2'), "--alpha must be a finite float in (0, 2], got '1.2'"),
           (dict(lr=float('nan')), '--lr must be a finite float > 0, got nan'),
           (dict(seed=1.5), '--seed must be a finite int in [0, 4294967295], got 1.5'),
           (dict(fast='yes'), "--fast is a switch (0 or 1), got 'yes'"),
           (dict(colour=1), 'unknown option --colour')]
    try:
        os.makedirs(tmp_path / 'r')
        for change, msg in bad:
            runs.write_json(str(tmp_path / 'r' / 'config.json'), {**good, **change})
            r = cli('--resume', tmp_path / 'r')
            assert_one_line_error(r, f"--resume: {tmp_path / 'r' / 'config.json'}: {msg}")
        assert Recorder.seen == []
        runs.write_json(str(tmp_path / 'r' / 'config.json'), good)
        assert_one_line_error(cli('--resume', tmp_path / 'r', '--alpha', 0.5),
                              'other values of --alpha')
        assert Recorder.seen == []
        assert_one_line_error(cli('--resume', tmp_path / 'r'), f'could not download {url}')
        assert Recorder.seen == ['/teacher.pkl']  # the checks passed: now it is fetched
    finally:
        server.shutdown()
        server.server_close()


def test_sida_micro_batch_is_recorded_and_kept_across_gpus(tmp_path, monkeypatch):
    """On 2 GPUs --batch 64 --batch-gpu 64 runs micro-batches of 32: config.json records 32, and a
    SiDA run resumed where its micro-batch would shrink is refused (SiD's may shrink)."""
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)  # a caller's group

    def stop(cfg, log):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, 'claim_folder', stop)  # the micro-batch is settled before it
    for method in ('sida', 'sid'):
        new = sid.make_config(dict(method=method, batch=64, batch_gpu=64, outdir='x'))
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(KeyboardInterrupt):
            runs.start(new)
        assert new.batch_gpu == 32  # what runs, as config.json will say
        resumed = sid.make_config(dict(method=method, batch=128, batch_gpu=64, resume='x'))
        monkeypatch.setenv('WORLD_SIZE', '4')
        if method == 'sida':
            with pytest.raises(ValueError, match='micro-batch of 64; on 4 GPUs --batch 128 gives '
                               'micro-batches of 32: resume on at most 2'):
                runs.start(resumed)
        else:
            with contextlib.redirect_stdout(io.StringIO()), pytest.raises(KeyboardInterrupt):
                runs.start(resumed)
        monkeypatch.setenv('WORLD_SIZE', '2')


def test_resume_writes_only_into_its_own_folder_and_a_finished_run_stays_intact(tmp_path):
    """`--resume A --outdir B` with B a finished run: refused, and neither folder changes by a
    byte; a Config made in code is held to the same rule; --outdir A (spelt otherwise) is A."""
    a, b = tmp_path / 'a', tmp_path / 'b'
    cfg_a = cfg_for(a, iters=1)
    run_quiet(cfg_a)
    run_quiet(cfg_for(b, iters=2, seed=2))

    def files():
        return {f'{d.name}/{n}': (d / n).read_bytes() for d in (a, b) for n in os.listdir(d)}

    before = files()
    r = cli('--resume', a, '--outdir', b, '--duration-mimg', 8e-6)
    assert_one_line_error(r, f'--resume continues a run in its own folder {a}, not in --outdir {b}')
    assert files() == before
    with pytest.raises(ValueError, match='its own folder'):
        runs.train(dataclasses.replace(cfg_a, resume=str(a), outdir=str(b), duration_mimg=8e-6))
    assert files() == before
    same = runs.resolve_config(dict(resume=str(a), outdir=f'{tmp_path}/./a/'))
    assert same.outdir == str(a)


def test_numbered_folders_are_taken_atomically(tmp_path, monkeypatch):
    """Runs started at one moment each get their own numbered folder (os.mkdir: no window between
    choosing the number and making the folder). The race is forced: 8 threads all list the parent
    folder before any of them makes its folder, so all choose the same number first."""
    parent = str(tmp_path / 'runs')
    assert runs.new_run_dir(parent, 'toy-sid') != runs.new_run_dir(parent, 'toy-sid')
    got, barrier, first = [], threading.Barrier(8, timeout=60), threading.local()
    listdir = os.listdir

    def listdir_then_wait(path):
        names = listdir(path)
        if not getattr(first, 'seen', False):  # each thread's first listing: wait for the others
            first.seen = True
            barrier.wait()
        return names

    def take():
        got.append(runs.new_run_dir(parent, 'toy-sid'))

    monkeypatch.setattr(os, 'listdir', listdir_then_wait)
    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    assert len(got) == 8 and len(set(got)) == 8 and all(os.path.isdir(p) for p in got)
    assert sorted(os.listdir(parent)) == [f'{i:05d}-toy-sid' for i in range(10)]


def test_snapshots_are_ordered_by_the_number_in_their_name(tmp_path):
    """Past 10^9 images a name grows a digit: the latest is the largest number, not the last
    string (generate --ckpt RUN and --init-generator RUN read it)."""
    run = tmp_path / 'run'
    os.makedirs(run)
    for name, seed in (('network-snapshot-999999744.pt', 1),
                       ('network-snapshot-1000005632.pt', 2), ('network-snapshot-99.pt', 3)):
        tiny_snapshot(run, 'cifar10', name, seed)
    latest = runs.snapshot_path(str(run))
    assert latest == str(run / 'network-snapshot-1000005632.pt')
    G = tiny_snapshot(tmp_path, 'cifar10', 'same.pt', 2)[1]
    assert states_equal(checkpoints.load_checkpoint(latest)[0], G)


def test_a_start_that_died_leaves_a_folder_that_is_reused_or_restarted(tmp_path):
    """A write that fails for lack of space (here a file-size limit: EFBIG, as ENOSPC is for
    torch's writer) says which file and how much room there is, in one line. The folder it leaves
    (config.json and ticks, no training state) is restarted by --resume from 0 kimg, bit for bit
    an uninterrupted run; a new run into it is pointed there. A folder holding only config.json
    (an empty start) is taken by a new run, with a note."""
    out, args = tmp_path / 'r', ['--duration-mimg', 12e-6, '--tick-kimg', 0.004, '--snap-kimg',
                                 0.008]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))  # a snapshot is ~350 kB
    try:
        r = cli(*TINY(tmp_path, 'r', *args))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert_one_line_error(r, f"could not write {out / 'network-snapshot-000000008.pt'}: ")
    assert ' MiB free there)' in r.stderr and 'enforce fail' not in r.stderr
    assert sorted(os.listdir(out)) == ['config.json', 'stats.jsonl']
    assert_one_line_error(cli(*TINY(tmp_path, 'r', *args, '--seed', 1)),
                          f'restart it with --resume {out} (from 0 kimg)')
    r = cli('--resume', out)
    assert r.returncode == 0 and f'note: {out} holds no training state' in r.stdout
    assert cli(*TINY(tmp_path, 'fresh', *args)).returncode == 0
    A, B = load_state(out), load_state(tmp_path / 'fresh')
    assert A['cur_nimg'] == 12 and all(torch.equal(A[k][n], B[k][n])
                                       for k in ('G', 'G_ema', 'f_psi') for n in A[k])
    assert [e['kimg'] for e in read_stats(out)] == [
        e['kimg'] for e in read_stats(tmp_path / 'fresh')]
    empty = tmp_path / 'empty'  # config.json only: a start killed before training
    os.makedirs(empty)
    runs.write_json(str(empty / 'config.json'), dataclasses.asdict(cfg_for(empty, seed=7)))
    r = cli(*TINY(tmp_path, 'empty'))
    assert r.returncode == 0 and f'note: {empty} holds only the config.json of a start' in r.stdout
    assert json.load(open(empty / 'config.json'))['seed'] == 0
    assert load_state(empty)['cur_nimg'] == 4


def test_out_of_memory_says_where(tmp_path):
    """An allocation that fails (an address-space limit stands in for a full GPU) is one line: where
    in the run and how much was asked, not '[enforce fail at alloc_cpu.cpp...]'."""
    with open('/proc/self/status') as f:
        vm = int(re.search(r'VmSize:\s+(\d+) kB', f.read()).group(1)) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + 3 * 2 ** 30  # far below the 12 GiB the first micro-batch's latents need
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip('the address space is limited already')
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        r = cli(*TINY(tmp_path, 'r', '--batch', 2 ** 20, '--batch-gpu', 2 ** 20))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert_one_line_error(r, 'out of memory at 0.0 kimg (1048576 images per micro-batch on cpu): '
                          '12 GiB asked')


def test_one_run_per_folder_then_ctrl_c_then_resume(tmp_path):
    """A run holds its folder: a second run, or a resume, into it is refused in one line naming the
    holder (pid, host, start time). Ctrl-C ends the run with one line and exit code 130, the lock
    given back; --resume then continues from its last training state."""
    out = tmp_path / 'r'
    argv = [sys.executable, os.path.join(HERE, 'sid.py'), *TINY(tmp_path, 'r'), '--duration-mimg',
            1, '--tick-kimg', 0.004, '--snap-kimg', 0.008]
    p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS='1'),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 600  # a hang guard only
        while not os.path.exists(out / 'training-state.pt'):
            assert p.poll() is None and time.time() < deadline, p.stderr.read()[-2000:]
            time.sleep(0.05)
        holder = (out / 'run.lock').read_text()
        assert re.fullmatch(rf'pid {p.pid} on \S+ since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\n', holder)
        for args in (TINY(tmp_path, 'r'), ['--resume', out]):
            assert_one_line_error(cli(*args), f'{out} is in use by another run ({holder.strip()})')
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=600)[1]
    finally:
        p.kill()
    lines = err.strip().splitlines()
    assert p.returncode == 130 and len(lines) == 1, err[-2000:]
    assert re.fullmatch(rf'interrupted at [\d.]+ kimg: --resume {out} continues from its training '
                        r'state at [\d.]+ kimg', lines[0])
    assert not os.path.exists(out / 'run.lock')
    nimg = load_state(out)['cur_nimg']
    r = cli('--resume', out, '--duration-mimg', (nimg + 8) / 1e6)
    assert r.returncode == 0 and 'resumed from' in r.stdout
    assert load_state(out)['cur_nimg'] == nimg + 8

#----------------------------------------------------------------------------
# FID in the loop: each value against an independent computation, the best snapshot, the plot, and
# across resume the best snapshot is never replaced by a worse one.

def fid_setup(tmp_path, monkeypatch):
    monkeypatch.setenv('SID_DETECTOR', detector_file(tmp_path / 'det.pt', dim=8))
    monkeypatch.setenv('SID_TRUST_DETECTOR', '1')  # the stand-in is not NVIDIA's detector
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


def test_generate_toy_in_batches_and_a_bounded_picture(tmp_path, monkeypatch, capsys):
    """A toy generator's points are drawn --batch seeds at a time (each seed its own stream, so the
    split changes nothing); samples.png shows the first MAX_PICTURE_POINTS (a dot each)."""
    toy = sid.make_config(dict(outdir=str(tmp_path / 't')))
    G = nets_for(toy)[1].eval()
    runs.save_snapshot(str(tmp_path / 't.pt'), G, 0, dataclasses.replace(toy, sigma_init=0.7))
    shown = []

    def picture(x, teacher):
        shown.append(len(x))
        return b'a picture'

    monkeypatch.setattr(runs, 'MAX_PICTURE_POINTS', 10)
    monkeypatch.setattr(draw, 'samples_picture', picture)
    n = 25
    runs.main(['generate', '--ckpt', str(tmp_path / 't.pt'), '--seeds', f'0-{n - 1}', '--batch',
               '7', '--outdir', str(tmp_path / 'g')])
    out = capsys.readouterr().out
    assert shown == [10] and f'wrote {n} points' in out and '(the first 10)' in out
    with torch.no_grad():
        want = runs.sample_images(G, range(n), 0.7, torch.device('cpu'))
    assert np.allclose(np.load(tmp_path / 'g' / 'samples.npy'), want.numpy(), atol=1e-6)


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

#----------------------------------------------------------------------------
# EDM2 (ImageNet-512 in SD-VAE latents): the presets against the official scripts, tiny runs that
# train, resume bitwise and write decoded grids, generate's decoded PNGs, the VAE's one-line errors,
# data-free runs with a labels file.

IN512 = 'https://huggingface.co/UT-Austin-PML/SiDA/resolve/main/EDM2_distillation/'
EDM2_DROPOUT = dict(xs=0.0, s=0.0, m=0.1, l=0.1, xl=0.1, xxl=0.1)  # EDM2's train_edm2.py
EDM2_OFFICIAL = {  # sida branch: run_sid_edm2.sh, run_sida_edm2.sh, run_sid_sida_edm2.sh
    # (method, size): use_gan, force_normalization, return_logvar, batch-gpu, lsg, lsd, Mimg, init
    ('sid', 'xs'): (0, 1, 1, 64, 100, None, 200, None),
    ('sid', 's'): (0, 1, 1, 64, 100, None, 200, None),
    ('sid', 'm'): (0, 1, 1, 32, 100, None, 200, None),
    ('sid', 'l'): (0, 1, 1, 32, 100, None, 200, None),
    ('sid', 'xl'): (0, 1, 1, 16, 100, None, 200, None),
    ('sid', 'xxl'): (0, 1, 1, 2, 100, None, 100, None),
    ('sida', 'xs'): (1, 1, 1, 64, 100, 100, 200, None),  # the script's 3 GPUs cannot split 2048
    ('sida', 's'): (1, 0, 0, 64, 100, 100, 200, None),
    ('sida', 'm'): (1, 1, 1, 32, 100, 100, 200, None),
    ('sida', 'l'): (1, 1, 1, 32, 100, 100, 200, None),
    ('sida', 'xl'): (1, 1, 1, 16, 100, 100, 200, None),
    ('sida', 'xxl'): (1, 1, 1, 2, 100, 100, 100, None),
    ('sid2a', 'xs'): (1, 1, 1, 64, 100, 100, 30, 'edm2_img512_xs_sid_alpha1-249360.pkl'),
    ('sid2a', 's'): (1, 0, 0, 64, 100, 100, 80, 'edm2_img512_s_sid_alpha1-192010.pkl'),
    ('sid2a', 'm'): (1, 1, 1, 32, 50, 100, 200, 'edm2_img512_m_sid_alpha1-226830.pkl'),
    ('sid2a', 'l'): (1, 1, 1, 32, 100, 100, 55, 'edm2_img512_l_sid_alpha1-203788.pkl'),
    ('sid2a', 'xl'): (1, 1, 1, 16, 100, 100, 50, 'edm2_img512_xl_sid_alpha1-234004.pkl'),
    ('sid2a', 'xxl'): (1, 1, 1, 2, 100, 100, 30, 'edm2_img512_xxl_sida_alpha1-077932.pkl'),
}


@pytest.mark.parametrize('method,size', list(EDM2_OFFICIAL))
def test_presets_match_official_edm2_scripts(method, size):
    use_gan, fn, lv, bgpu, lsg, lsd, mimg, init = EDM2_OFFICIAL[(method, size)]
    over = dict(dataset=f'imagenet512-{size}', method='sida' if use_gan else 'sid', outdir='x')
    if init:
        over['init_generator'] = IN512 + init
    c = sid.make_config(over)
    assert (c.force_normalization, c.logvar, c.batch_gpu, c.lsg, c.duration_mimg) == (
        fn, lv, bgpu, lsg, mimg)
    if use_gan:  # lsg_gan and the 100/200 kimg schedule: the scripts' defaults
        assert (c.lsd, c.lsg_gan, c.sida_warmup_kimg, c.sida_mix_kimg) == (lsd, 0.01, 100, 200)
    # common to every entry: --alpha 1 --tmax 800 --init_sigma 2.5 --batch 2048 --lr 5e-5 --glr 5e-5
    # --fp16 1 --ls 1 --augment 0 --ema 2 --tick 10 --snap 50 (ticks), g_beta1 0, the size's -fid
    # teacher and dropout, img512.pkl; EDM2's loss: P_mean -0.4, P_std 1.0, no clip of f_psi
    assert (c.alpha, c.tmax, c.sigma_init, c.batch, c.lr, c.glr, c.precision, c.ls, c.augment,
            c.ema_mimg, c.tick_kimg, c.snap_kimg, c.g_beta1) == (
        1.0, 800, 2.5, 2048, 5e-5, 5e-5, 'fp16', 1.0, 0.0, 2, 10, 500, 0.0)
    assert (c.teacher, c.dropout, c.fid_ref) == (f'edm2-img512-{size}', EDM2_DROPOUT[size],
                                                 'img512')
    assert (c.P_mean, c.P_std, c.clip_psi) == (-0.4, 1.0, False)
    assert 2048 % (bgpu * 4) == 0  # 4 GPUs, as every script but SiDA-XS's 3


def edm2_cfg(out, method, iters, **kw):
    """A tiny EDM2 run: 4x8x8 latents, batch 4 in 2 rounds of 2, the random VAE (64x64 pixels)."""
    extra = dict(sida_warmup_kimg=0, sida_mix_kimg=0.004) if method == 'sida' else {}
    return cfg_for(out, 'imagenet512-xs', iters, method=method, net_overrides=EDM2_NET,
                   vae='random', **{**extra, **kw})


def latent_zip(path, n=6):
    files, arrs = latent_files(n=n, res=8)
    meta = {'labels': [[name, c] for name, c in zip(sorted(files), [3, 999, 0, 3, 7, 512])]}
    return write_dataset(path, files, meta, 'zip')


@needs_diffusers
@pytest.mark.parametrize('method', ['sid', 'sida'])
def test_edm2_tiny_run_trains_resumes_bitwise_and_writes_decoded_grids(tmp_path, method):
    import latents
    extra = dict(data=latent_zip(tmp_path / 'sd.zip')) if method == 'sida' else {}

    def make(out, iters):
        return edm2_cfg(out, method, iters, snap_kimg=0.008, **extra)

    nets = edm2_nets(make(tmp_path / 'x', 1))
    run_a, A, out = run_quiet(make(tmp_path / 'a', 4), copy.deepcopy(nets))
    run_quiet(make(tmp_path / 'b', 2), copy.deepcopy(nets))
    cfg_b = runs.resolve_config(dict(resume=str(tmp_path / 'b'),
                                     duration_mimg=make('', 4).duration_mimg))
    _, B, out_b = run_quiet(cfg_b, copy.deepcopy(nets))
    assert 'resumed from' in out_b
    assert all(states_equal(getattr(A, k), getattr(B, k)) for k in ('G', 'G_ema', 'f_psi'))
    assert not states_equal(A.G, nets[1]) and not states_equal(A.f_psi, nets[2])

    def same(e):
        return {k: v for k, v in e.items() if k not in ('tick', 'time', 'sec_per_kimg')}

    assert [same(e) for e in read_stats(tmp_path / 'b')] == [
        same(e) for e in read_stats(tmp_path / 'a')]
    if method == 'sida':  # the adversarial term ran, and the data position came back
        assert read_stats(tmp_path / 'a')[-1]['loss_gan'] > 0
        # f_psi's 4 steps and G's 3 (G waits at 0 kimg), 2 micro-batches of 2 each
        assert load_state(tmp_path / 'b')['data_images'] == (4 + 3) * 2 * 2
    vae = latents.open_vae('random')
    for name in ('samples-000000008.png', 'samples-000000016.png'):  # 4x4 decoded at 64x64
        grid = read_png(tmp_path / 'a' / name)
        assert grid.shape == (256, 256, 3) and grid.std() > 1
    G_ema = A.G_ema
    want = latents.decode(vae, runs.sample_images(G_ema, range(16), 2.5, torch.device('cpu')))
    grid = read_png(tmp_path / 'a' / 'samples-000000016.png')
    assert np.abs(grid[64:128, 192:256] - want[7].permute(1, 2, 0).numpy()).max() <= 1
    r = cli('generate', '--ckpt', tmp_path / 'a', '--seeds', '5,7', '--vae', 'random', '--device',
            'cpu', '--outdir', tmp_path / 'gen', '--class-idx', 999)
    assert r.returncode == 0, r.stderr
    c = F.one_hot(torch.tensor([999]), 1000).float()
    for seed in (5, 7):
        z = torch.randn([4, 8, 8], generator=torch.Generator().manual_seed(seed))[None] * 2.5
        with torch.no_grad():
            x = latents.decode(vae, G_ema(z, torch.full([1, 1, 1, 1], 2.5), c))[0]
        png = read_png(tmp_path / 'gen' / f'{seed:06d}.png')
        assert png.shape == (64, 64, 3) and np.abs(png - x.permute(1, 2, 0).numpy()).max() <= 1


@needs_diffusers
def test_edm2_data_free_labels_file_and_real_latent_labels(tmp_path):
    """--data dataset.json: every class drawn comes from the file; a latent zip: G and the teacher
    get the real batch's labels, one-hot at 1000 classes."""
    labels = {'labels': [['a.png', 7], ['b.png', 7], ['c.png', 412]]}
    path = write_bytes(tmp_path / 'dataset.json', json.dumps(labels).encode())
    for method, data in (('sid', path), ('sida', latent_zip(tmp_path / 'sd.zip'))):
        cfg = edm2_cfg(tmp_path / method, method, 2, data=data)
        nets = edm2_nets(cfg, perturb=False)
        seen = []
        nets[0].register_forward_pre_hook(lambda m, a: seen.append(a[2].argmax(1).tolist()))
        run_quiet(cfg, nets)
        classes = {c for row in seen for c in row}
        assert classes <= ({7, 412} if method == 'sid' else {0, 3, 7, 512, 999}) and classes
        assert all(len(row) == 2 for row in seen)


@needs_diffusers
def test_edm2_vae_errors_are_one_line(tmp_path, monkeypatch):
    """No diffusers: one line naming the package; no weights: one line naming where to put them;
    nothing written."""
    monkeypatch.chdir(tmp_path)
    args = ['--dataset', 'imagenet512-xs', '--teacher', 'random', '--net-overrides', EDM2_NET,
            '--batch', 4, '--batch-gpu', 2, '--duration-mimg', 4e-6, '--device', 'cpu']
    r = cli(*args, '--vae', tmp_path / 'nowhere', '--outdir', tmp_path / 'a')
    assert_one_line_error(r, 'diffusion_pytorch_model.safetensors from https://huggingface.co/'
                             'stabilityai/sd-vae-ft-mse in a folder')
    monkeypatch.setitem(sys.modules, 'diffusers', None)
    r = cli(*args, '--outdir', tmp_path / 'b')
    assert_one_line_error(r, 'pip install diffusers')
    G = edm2_nets(edm2_cfg(tmp_path / 'c', 'sid', 1), perturb=False)[1]
    runs.save_snapshot(str(tmp_path / 'g.pt'), G.eval(), 0, sid.Config())
    r = cli('generate', '--ckpt', tmp_path / 'g.pt', '--outdir', tmp_path / 'o', '--device', 'cpu')
    assert_one_line_error(r, 'pip install diffusers')
    assert sorted(os.listdir(tmp_path)) == ['g.pt']


def test_edm2_real_latents_are_fresh_posterior_samples_of_the_shard(tmp_path):
    """SiDA's real batches: the zip's members of this rank's shard, each a posterior sample
    mean + std * eps scaled and shifted by EDM2's statistics, eps from the batch's own generator
    (seed, rank, batch index), so the stream restarts exactly at a saved position."""
    path = latent_zip(tmp_path / 'sd.zip')
    cfg = edm2_cfg(tmp_path / 'r', 'sida', 1, data=path, seed=5)
    s = loop_state(cfg, edm2_nets(cfg, perturb=False))
    run = runs.Run(cfg=cfg, log=print)
    stream = runs.open_data(run, s)
    got = [next(stream) for _ in range(3)]
    _, arrs = latent_files(n=6, res=8)
    order = [b for b, _ in zip(runs.data.shard_indices(6, 2, 5), range(3))]  # the images' order
    scale = torch.tensor([0.5 / v for v in (4.17, 4.62, 3.71, 3.28)]).reshape(1, 4, 1, 1)
    bias = -torch.tensor([5.81, 3.25, 0.12, -2.15]).reshape(1, 4, 1, 1) * scale
    for i, ((x, c), idx) in enumerate(zip(got, order)):
        raw = torch.from_numpy(arrs[idx.numpy()])
        key = np.random.SeedSequence(5, spawn_key=(0, i)).generate_state(1, np.uint64)[0]
        eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(int(key)))
        torch.testing.assert_close(x, (raw[:, :4] + eps * raw[:, 4:]) * scale + bias)
        assert c.shape == (2, 1000) and c.sum() == 2
    s.data_batches = 2  # a resumed run: the third batch again
    x, _ = next(runs.open_data(run, s))
    assert torch.equal(x, got[2][0])

#----------------------------------------------------------------------------
# Released generators by name (a primed download cache: no network) and `evaluate`.

def prime_release(cache, name, net):
    """The file a release's URL would download, in the official pickle format, in the cache."""
    path = fileio.cache_path(releases.resolve(name).url, str(cache))
    os.makedirs(cache, exist_ok=True)
    write_edm_pickle(path, net)
    return path


def test_released_generators_listed_and_generated_by_name(tmp_path, monkeypatch):
    listing = cli('--list').stdout
    assert all(f'\n{name} ' in listing for name in releases.RELEASES)
    assert 'python sid.py --list' in cli('generate', '--help').stdout
    assert 'python sid.py --list' in cli('evaluate', '--help').stdout
    monkeypatch.setenv('SID_CACHE', str(tmp_path / 'cache'))
    G = tiny_net('cifar10-32x32-cond-vp')
    prime_release(tmp_path / 'cache', 'sid-cifar10-cond-a1.2', G)
    r = cli('generate', '--ckpt', 'sid-cifar10-cond-a1.2', '--seeds', '0-3', '--outdir',
            tmp_path / 'o')
    assert r.returncode == 0, r.stderr
    x = fid.to_uint8(runs.sample_images(G, range(4), releases.SIGMA_INIT, 'cpu')).numpy()
    for s in range(4):  # SiD's sigma_init 2.5, a class per seed
        png = read_png(tmp_path / 'o' / f'{s:06d}.png')
        assert np.abs(png - x[s].transpose(1, 2, 0)).max() <= 1


def test_init_generator_by_name(tmp_path, monkeypatch):
    """SiD²A from a released SiD generator: G starts from the file the name downloads."""
    monkeypatch.setenv('SID_CACHE', str(tmp_path / 'cache'))
    cfg = cfg_for(tmp_path / 'a')
    sid_G = perturb_copy(nets_for(cfg, perturb=False)[1], 4, 0.1).eval()
    prime_release(tmp_path / 'cache', 'sid-cifar10-uncond-a1.2', sid_G)
    cfg2 = dataclasses.replace(cfg, method='sida', init_generator='sid-cifar10-uncond-a1.2')
    f_phi, G, f_psi = runs.load_networks(cfg2, None, torch.device('cpu'))
    assert states_equal(G, sid_G) and not states_equal(f_psi, sid_G)


def test_evaluate_command_end_to_end(tmp_path, monkeypatch):
    """`evaluate` on a released name: the scores of metrics.evaluate on the same generator, the
    progress line, the authors' number beside ours, a JSON report; SIGN's steps; refusals of
    files and references with one line, a wrong reference before anything is downloaded."""
    cache = tmp_path / 'cache'
    monkeypatch.setenv('SID_CACHE', str(cache))
    G = tiny_net('cifar10-32x32-cond-vp')
    cached = prime_release(cache, 'sid-cifar10-cond-a1.2', G)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 16))
    fid.save_ref(str(tmp_path / 'ref.npz'), rng.standard_normal(16) * 0.1, a @ a.T / 16)
    np.savez(tmp_path / 'real.npz', arr_0=rng.integers(0, 256, (15, 32, 32, 3), dtype=np.uint8))
    det = detector_file(tmp_path / 'det.pt')
    common = ['--metrics', 'fid,is,pr', '--num', 12, '--trials', 2, '--ref', tmp_path / 'ref.npz',
              '--pr-ref', tmp_path / 'real.npz', '--detector', det, '--trust-detector',
              '--batch', 5, '--device', 'cpu']
    for sigmas, out in (((), 'one.json'), ((0.5,), 'two.json')):
        steps = ['--steps', 2, '--sigmas', '0.5'] if sigmas else []
        r = cli('evaluate', '--ckpt', 'sid-cifar10-cond-a1.2', *common, *steps, '--out',
                tmp_path / out)
        assert r.returncode == 0, r.stderr
        report = json.load(open(tmp_path / out))

        def sample(seeds):
            return runs.sample_images(G, seeds, 2.5, 'cpu', None, sigmas)

        expected = metrics.evaluate(sample, G.img_shape, 12, ('fid', 'is', 'pr'), 2,
                                    str(tmp_path / 'ref.npz'), detector=det,
                                    pr_ref=str(tmp_path / 'real.npz'), batch=5, trusted=True)
        assert report['trials'] == expected['trials'] and report['sigmas'] == list(sigmas)
        assert report['authors_fid'] == 1.710 and report['mean'] == expected['mean']
        assert 'trial 2/2: 12/12 images' in r.stderr.splitlines()[-1]
        lines = r.stdout.splitlines()
        assert lines[0].startswith('sid-cifar10-cond-a1.2: 2 trial(s) of 12 images (seeds 0-23)')
        assert [line.split()[0] for line in lines[1:6]] == ['fid', 'is', 'is_std', 'precision',
                                                           'recall']
        assert lines[-1] == "the authors' FID of this file: 1.710 (SiD README)"
    assert_one_line_error(cli('evaluate', '--ckpt', 'sid-cifar10-cond-a1.2', *common, '--out',
                              tmp_path / 'one.json'), 'one.json exists')
    # the reference by default: the release's preset (here primed in the cache), a run's dataset's
    preset = fileio.cache_path(fid.REF_PRESETS['cifar10-32x32'])
    shutil.copy(tmp_path / 'ref.npz', preset)
    default_ref = ['evaluate', '--ckpt', 'sid-cifar10-cond-a1.2', '--num', 12, '--detector', det,
                   '--device', 'cpu']
    assert_one_line_error(cli(*default_ref), "not NVIDIA's Inception detector")  # code: refused
    r = cli(*default_ref, '--trust-detector')
    assert r.returncode == 0 and 'reference cifar10-32x32' in r.stdout.splitlines()[0]
    one_step = json.load(open(tmp_path / 'one.json'))['trials'][0]['fid']
    assert float(r.stdout.splitlines()[1].split()[1]) == pytest.approx(one_step, abs=1e-4)
    run64, _ = tiny_snapshot(tmp_path, 'ffhq64', 'f.pt')
    assert_one_line_error(cli('evaluate', '--ckpt', run64, '--ref', 'afhqv2-64x64'),
                          "afhqv2-64x64 is of another dataset than the generator's (ffhq-64x64)")
    before = sorted(os.listdir(cache))
    r = cli('evaluate', '--ckpt', 'sid2a-cifar10-cond-a1', '--ref', 'afhqv2-64x64')
    assert_one_line_error(r, 'reference afhqv2-64x64 is of 64x64 images, the generator makes 32')
    assert sorted(os.listdir(cache)) == before  # nothing was downloaded
    raw = open(cached, 'rb').read()
    write_bytes(cached, raw[:len(raw) // 3])
    assert_one_line_error(cli('evaluate', '--ckpt', 'sid-cifar10-cond-a1.2', *common),
                          'not the known')  # its hash was recorded at first use
    write_bytes(cached + '.sha256', fileio.sha256_of(cached).encode())  # as if first seen so
    assert_one_line_error(cli('evaluate', '--ckpt', 'sid-cifar10-cond-a1.2', *common),
                          'unsafe or unreadable pickle')
    write_edm_pickle(cached, G, extra=dict(evil=Evil(os.system, 'true')))
    write_bytes(cached + '.sha256', fileio.sha256_of(cached).encode())
    assert_one_line_error(cli('evaluate', '--ckpt', 'sid-cifar10-cond-a1.2', *common),
                          'refusing to load global')


@needs_diffusers
def test_edm2_release_by_name_generates_evaluates_and_starts_sid2a(tmp_path, monkeypatch):
    """An EDM2 release in the official generator format, primed in the cache (no network):
    `generate` writes its decoded PNGs, `evaluate` scores the decoded images as metrics.evaluate
    does and names the authors' best FID of the size, and SiD²A starts G from it by name."""
    import latents
    name = 'sida-img512-xs-a1'
    cache = tmp_path / 'cache'
    monkeypatch.setenv('SID_CACHE', str(cache))
    cfg = edm2_cfg(tmp_path / 'x', 'sida', 1)
    G = perturb_copy(edm2_nets(cfg, perturb=False)[1], 3, 0.1).eval()
    os.makedirs(cache)
    write_edm2_pickle(fileio.cache_path(releases.resolve(name).url), G, 'generator', hooks=True)
    vae = latents.open_vae('random')

    def sample(seeds):
        return latents.decode(vae, runs.sample_images(G, seeds, 2.5, 'cpu'))

    r = cli('generate', '--ckpt', name, '--seeds', '0-2', '--vae', 'random', '--device', 'cpu',
            '--outdir', tmp_path / 'gen')
    assert r.returncode == 0, r.stderr
    want = sample(range(3))
    for s in range(3):  # SiD's sigma_init 2.5, a random class per seed, 64x64 decoded
        png = read_png(tmp_path / 'gen' / f'{s:06d}.png')
        assert np.abs(png - want[s].permute(1, 2, 0).numpy()).max() <= 1
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 16))
    fid.save_ref(str(tmp_path / 'ref.npz'), rng.standard_normal(16) * 0.1, a @ a.T / 16)
    det = detector_file(tmp_path / 'det.pt')
    r = cli('evaluate', '--ckpt', name, '--metrics', 'fid,is', '--num', 10, '--ref',
            tmp_path / 'ref.npz', '--detector', det, '--trust-detector', '--vae', 'random',
            '--batch', 5, '--device', 'cpu', '--out', tmp_path / 'e.json')
    assert r.returncode == 0, r.stderr
    expected = metrics.evaluate(sample, [3, 64, 64], 10, ('fid', 'is'), 1,
                                str(tmp_path / 'ref.npz'), detector=det, batch=5, trusted=True)
    report = json.load(open(tmp_path / 'e.json'))
    assert report['trials'] == expected['trials']
    assert r.stdout.splitlines()[-1] == ("the authors' best FID on img512-xs (SiDA README, "
                                         "whichever file): 2.156")
    f_phi, G2, f_psi = runs.load_networks(dataclasses.replace(cfg, init_generator=name), None,
                                          torch.device('cpu'))
    assert states_equal(G2, G)  # the release's weights (G is perturbed: not the teacher's)

def test_generate_and_project_help_say_what_they_do_and_loss_scales_what_they_scale():
    for cmd, says in (('generate', ('one PNG per seed', 'multi-step', 'first 2000 points')),
                      ('project', ('f(y + sigma * eps)', 'idempotent', 'one PNG per input'))):
        r = cli(cmd, '--help')
        text = ' '.join(r.stdout.split())
        assert r.returncode == 0 and all(s in text for s in says), (cmd, text)
    text = ' '.join(cli('--help').stdout.split())
    for option, scaled in (('--ls', "f_psi's denoising loss"), ('--lsg', "G's SiD loss"),
                           ('--lsd', "the discriminator's BCE term"),
                           ('--lsg-gan', "the adversarial term in G's loss")):
        assert re.search(f'{option} FLOAT (SiDA: )?multiplies {re.escape(scaled)}', text), option
