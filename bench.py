# Benchmarks for sid (not tests): time and peak memory of the EDM teacher networks, per preset, of
# one training iteration, and the faithful path against the fast path.
#   python bench.py --what nets --device cpu --batch 2 --presets cifar10-32x32-uncond-vp
#   python bench.py --what sid --dataset imagenet512-xs --methods sid --settings fp16 --batch-gpu 64
# Peak memory: CUDA -> torch.cuda.max_memory_allocated above the weights; CPU -> peak resident set
# size (Linux VmHWM, reset before each measurement) above the resident size before it.

import argparse
import collections
import contextlib
import ctypes
import io
import json
import math
import os
import re
import statistics
import tempfile
import time
import traceback

import torch

import edm_nets

#----------------------------------------------------------------------------
# Measurement helpers: median wall time over repeats, and peak memory of one call.

def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _proc_status_kib(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise OSError(f'{field} not in /proc/self/status')


@contextlib.contextmanager
def peak_memory_mib(device, result):
    """Stores the peak memory (MiB) used inside the block, above what was in use before it, in
    result[0]."""
    if device.type == 'cuda':
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        _sync(device)
        result[0] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)  # freed pages back: the baseline is what is used
    except (OSError, AttributeError):
        pass
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # Linux: reset the peak RSS (VmHWM) to the current RSS
        base = _proc_status_kib('VmRSS')
    except OSError:
        base = None
    yield
    result[0] = (_proc_status_kib('VmHWM') - base) / 1024 if base is not None else float('nan')


def time_call(fn, device, repeat):
    fn()  # warm-up (allocator, cuDNN autotuning)
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(rows, columns):
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print('  '.join(c.ljust(w) for c, w in zip(columns, widths)))
    print('  '.join('-' * w for w in widths))
    for r in rows:
        print('  '.join(v.ljust(w) for v, w in zip(r, widths)))


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU ({torch.get_num_threads()} threads)'

#----------------------------------------------------------------------------
# Networks: one forward (eval, no grad; teacher / sampling cost) and one forward+backward (train
# mode with dropout, as in the fake-score / generator updates) per preset at the given batch size.

def bench_nets(args):
    device = torch.device(args.device)
    amp = contextlib.nullcontext()
    if args.amp == 'bf16':
        amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    rows = []
    for name in args.presets:
        torch.manual_seed(0)
        net = edm_nets.build_preset(name).to(device)
        B, R = args.batch, net.img_resolution
        x = torch.randn(B, net.img_channels, R, R, device=device)
        sigma = torch.full([B, 1, 1, 1], 2.5, device=device)
        labels = None
        if net.label_dim:
            labels = torch.eye(net.label_dim, device=device)[torch.arange(B) % net.label_dim]
        aug = torch.zeros(B, 9, device=device) if net.init_kwargs.get('augment_dim') else None

        def forward():
            with torch.no_grad(), amp:
                net(x, sigma, labels, aug)

        def forward_backward():
            with amp:
                loss = (net(x, sigma, labels, aug) - x).square().mean()
            loss.backward()
            net.zero_grad(set_to_none=True)

        net.eval()
        t_fwd = time_call(forward, device, args.repeat)
        m_fwd = [0.0]
        with peak_memory_mib(device, m_fwd):
            forward()
        net.train()
        t_bwd = time_call(forward_backward, device, args.repeat)
        m_bwd = [0.0]
        with peak_memory_mib(device, m_bwd):
            forward_backward()
        n_params = sum(p.numel() for p in net.parameters())
        rows.append([name, f'{n_params / 1e6:.1f}', str(B), f'{t_fwd * 1e3:.0f}', f'{m_fwd[0]:.0f}',
                     f'{t_bwd * 1e3:.0f}', f'{m_bwd[0]:.0f}'])
        del net
    print(f'device={device} ({torch.get_num_threads()} threads), amp={args.amp}, '
          f'batch={args.batch}, median of {args.repeat}; memory = peak above the weights already '
          'resident')
    print_table(rows, ['preset', 'Mparams', 'batch', 'fwd ms', 'fwd MiB', 'fwd+bwd ms',
                       'fwd+bwd MiB'])

#----------------------------------------------------------------------------
# One SiD (or SiDA) iteration of sid.iterate(), the training loop itself (one accumulation round):
# fake-score step, generator step, EMA, on the CIFAR-10 DDPM++ teacher architecture with random
# weights (--teacher random). Reports images/s (generator images, the unit of kimg), peak memory
# and model FLOP utilisation per precision and fast-path setting, and SiDA's cost relative to SiD.

# Dense (no sparsity) datasheet peaks in TFLOP/s, matched on the CUDA device name; fp32: TF32 off.
PEAK_TFLOPS = [('H100 PCIe', dict(fp32=51.2, tf32=378, bf16=756, fp16=756)),
               ('H100', dict(fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4)),  # SXM5
               ('H200', dict(fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4)),
               ('A100', dict(fp32=19.5, tf32=156, bf16=312, fp16=312))]
QUICK_NET = '{"model_channels":16,"channel_mult":[1,1],"num_blocks":1,"attn_resolutions":[16]}'
FAST_OPTIONS = ('channels_last', 'fused_adam', 'compile', 'checkpointing')  # sid.Config, 0/1
CPU_SETTINGS = ['fp32', 'bf16']  # fp16 (EDM's casting) and TF32 are CUDA-only: no-ops on a CPU
GPU_SETTINGS = ['fp32', 'tf32', 'bf16', 'fp16', 'bf16+channels_last+fused_adam',
                'bf16+channels_last+fused_adam+compile', 'fp32+checkpointing',
                'bf16+channels_last+fused_adam+checkpointing']


def setting_fields(setting):
    """'bf16+channels_last+fused_adam' -> dict(precision='bf16', channels_last=1, fused_adam=1)."""
    precision, *opts = setting.split('+')
    bad = [o for o in opts if o not in FAST_OPTIONS]
    if bad:
        raise ValueError(f'unknown option(s) {bad} in setting "{setting}" (known: '
                         f'{", ".join(FAST_OPTIONS)})')
    return dict(precision=precision, **{o: 1 for o in opts})


def sid_iterations(method, setting, batch, device, workdir, net_overrides='', dataset='cifar10'):
    """sid.iterate() for one setting ('bf16+channels_last+...' or a dict of sid.Config fields): the
    training loop itself, one accumulation round, never reaching a tick or snapshot, SiDA straight
    in its 0.5/0.5 phase on random stand-in real images. net_overrides: JSON network kwargs as
    sid's --net-overrides (tests use a tiny net). dataset: a preset of sid.py; the EDM2 ones
    (imagenet512-*) data-free SiD only, their VAE the random stand-in (it decodes no image here)."""
    import PIL.Image
    import runs
    import sid
    fields = dict(setting) if isinstance(setting, dict) else setting_fields(setting)
    tag = setting if isinstance(setting, str) else '+'.join(f'{k}={v}' for k, v in fields.items())
    data, extra = '', {}
    if dataset.startswith('imagenet512'):
        if method != 'sid':
            raise ValueError(f'{dataset}: only --methods sid is benchmarked (SiDA needs latents)')
        extra = dict(vae='random')
    elif dataset != 'cifar10':
        raise ValueError(f'--dataset {dataset}: cifar10 or imagenet512-xs|s|m|l|xl|xxl')
    if method == 'sida':  # a folder of random 32x32 PNGs stands in for CIFAR-10 (same cost)
        data = os.path.join(workdir, 'real')
        os.makedirs(data, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        for i in range(2 * batch):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
            PIL.Image.fromarray(pixels).save(os.path.join(data, f'{i:04d}.png'))
    cfg = sid.make_config(dict(dataset=dataset, method=method, teacher='random', batch=batch,
                               batch_gpu=batch, device=device.type, net_overrides=net_overrides,
                               data=data, outdir=os.path.join(workdir, f'{method}-{tag}-{batch}'),
                               duration_mimg=1e6, tick_kimg=1e9, snap_kimg=1e9, sida_warmup_kimg=0,
                               sida_mix_kimg=0, **extra, **fields))
    with contextlib.redirect_stdout(io.StringIO()):  # the driver's start-up lines
        _, state = runs.start(cfg)
    return cfg, sid.iterate(state)


def run_iteration(it):
    """One training iteration (the loop prints nothing)."""
    return next(it)


def _resident_mib(device):
    if device.type == 'cuda':
        return torch.cuda.memory_allocated(device) / 2**20
    return _proc_status_kib('VmRSS') / 1024


def bench_sid(args):
    """Each (micro-batch, method, setting) timed by measure(), the loop the compare mode uses."""
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    batches = args.batch_gpu or ([64, 16] if cuda else [4])
    settings = args.settings or (GPU_SETTINGS if cuda else CPU_SETTINGS)
    name = device_name(device)
    peaks = next((p for key, p in PEAK_TFLOPS if key in name), None) if cuda else None
    ctx = dict(device=device, workdir=tempfile.mkdtemp(prefix='sid-bench-'),
               net_overrides=args.net_overrides or '', dataset=args.dataset)
    runs = [measure(s, setting_fields(s), method, B, args, ctx)
            for B in batches for method in args.methods for s in settings]
    # model FLOPs (eager runs only: compiled kernels bypass the counter, checkpointing's recompute
    # is not model work)
    flops = {(r['method'], r['B']): r['flops'] for r in runs if 'flops' in r}
    rows, by_key = [], {}
    for r in runs:
        method, setting, B, t, t_cpu = r['method'], r['label'], r['B'], r['t'], r['t_cpu']
        f = flops.get((method, B), float('nan'))
        pk = (args.peak_tflops or (peaks or {}).get(setting.split('+')[0], float('nan'))) * 1e12
        mfu = f / t / pk if cuda or args.peak_tflops else float('nan')
        by_key[method, setting, B] = t if cuda else t_cpu  # CPU: other processes inflate wall time
        rows.append([method, setting, str(B), f'{t * 1e3:.0f}', f'{t_cpu:.1f}', f'{B / t:.3g}',
                     f"{r['resident']:.0f}", f"{r['peak']:.0f}", f'{f / 1e9:.0f}',
                     f'{f / t / 1e12:.3f}', f'{100 * mfu:.1f}' if mfu == mfu else '-'])
    net = 'CIFAR-10 DDPM++' if args.dataset == 'cifar10' else f'{args.dataset} EDM2 U-Net'
    print(f'device={name}, torch {torch.__version__}, {net} (random weights), one '
          f'accumulation round, median of {args.repeat} after warm-up')
    print('img/s counts generator images (kimg); each iteration also generates batch images for '
          'f_psi (SiDA: plus batch real images). Peak = above resident (weights, Adam states). '
          'GFLOP = model FLOPs per iteration (FlopCounterMode, eager, no recompute).')
    if cuda and (args.peak_tflops or peaks):
        print(f'MFU peak: {args.peak_tflops or peaks} TFLOP/s (dense datasheet, by precision)')
    elif cuda:
        print(f'MFU: unknown peak for {name}; pass --peak-tflops')
    elif args.peak_tflops:
        print(f'MFU: assumed peak {args.peak_tflops} TFLOP/s')
    else:
        print('MFU: no CPU peak assumed (pass --peak-tflops); achieved TFLOP/s shown')
    print_table(rows, ['method', 'setting', 'batch', 'ms/iter', 'CPU s/iter', 'img/s',
                       'resident MiB', 'peak MiB', 'GFLOP', 'TFLOP/s', 'MFU %'])
    for (method, setting, B), t in by_key.items():
        if method == 'sida' and ('sid', setting, B) in by_key:
            ratio = flops.get(('sida', B), float('nan')) / flops.get(('sid', B), float('nan'))
            print(f'SiDA / SiD {"time" if cuda else "CPU time"} per iteration: '
                  f'{t / by_key["sid", setting, B]:.2f} ({setting}, batch {B}); FLOPs {ratio:.3f}')

#----------------------------------------------------------------------------
# The faithful fp32 path against the fast path in one run (--what compare): speed, memory, MFU,
# SiDA's cost, compile warm-up, a side-by-side loss series and a profile of one fast iteration.
# Every section is guarded: a failing variant (or an OOM) prints its error and the next one runs.
# Sections that would overrun the time budget (--budget-s) are skipped, most important first.

# The fast path as sid.Config fields: the one place to change, or --fast-fields '{...}'.
FAST_FIELDS = dict(fast=1)  # sid's --fast: bf16, channels_last, fused Adam
FAITHFUL_FIELDS = dict(precision='fp32')  # the official setting: fp32 with TF32 off
# Official code, H100, fp32, from the issue (not measured here): ms/iter, img/s, peak MiB above
# the weights.
OFFICIAL_H100_FP32 = {16: (317, 50.4, 5279), 64: (820, 78.1, 22319)}
# Extra fast-path candidates at micro-batch 64, run only if the budget allows (label -> fields).
EXTRA_FIELDS = {'fp16 (EDM casting)+channels_last+fused_adam': dict(precision='fp16',
                                                                    channels_last=1, fused_adam=1),
                'bf16+fused_adam (NCHW)': dict(precision='bf16', fused_adam=1),
                'fast+compile (regional)': dict(fast=1, compile=1)}


def _cuda_oom(e):
    return isinstance(e, torch.OutOfMemoryError) or 'out of memory' in str(e)


def measure(label, fields, method, B, args, ctx, track=0, profile=False):
    """Builds sid.iterate() for the fields, warms up, times args.repeat iterations, counts FLOPs
    (eager only), runs on to `track` iterations in all (loss series) and optionally profiles one
    iteration. -> result dict."""
    from torch.utils.flop_counter import FlopCounterMode
    device, t0 = ctx['device'], time.perf_counter()
    cfg, it = sid_iterations(method, fields, B, device, ctx['workdir'],
                             net_overrides=ctx['net_overrides'],
                             dataset=ctx.get('dataset', 'cifar10'))
    r = dict(label=label, method=method, B=B, precision=cfg.precision, compiled=bool(cfg.compile),
             losses=[])
    try:
        def step():
            o = run_iteration(it)
            r['losses'].append((o.loss_fake, o.loss_G))  # device tensors: read only when printed

        step()  # set-up, allocator, cuDNN autotuning, compilation
        _sync(device)
        r['first_s'] = time.perf_counter() - t0
        for _ in range(2 * cfg.compile):  # compiled code: the first iterations may still compile
            step()
        _sync(device)
        r['warmup_s'] = time.perf_counter() - t0
        resident, m, times, cpu_times = _resident_mib(device), [0.0], [], []
        with peak_memory_mib(device, m):
            for _ in range(args.repeat):
                _sync(device)
                t1, c1 = time.perf_counter(), time.process_time()
                step()
                _sync(device)
                times.append(time.perf_counter() - t1)
                cpu_times.append(time.process_time() - c1)  # all threads; robust to other loads
        r.update(t=statistics.median(times), t_cpu=statistics.median(cpu_times), peak=m[0],
                 resident=resident)
        if not cfg.compile and not cfg.checkpointing:  # compiled kernels bypass the counter
            with FlopCounterMode(display=False) as fc:
                step()
            r['flops'] = fc.get_total_flops()
        if profile:
            r['profile'] = profile_iteration(step, device)
        while len(r['losses']) < track:
            step()
        r['losses'] = [(float(a), float(b)) for a, b in r['losses']]
    finally:
        it.close()
        del it
        # compiled blocks are kept: a later section with the same shapes and modes (SiDA's G at the
        # same micro-batch) reuses them; edm_nets.compile_blocks raised the recompile limit
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    r['total_s'] = time.perf_counter() - t0
    return r


def profile_iteration(step, device):
    """torch.profiler summary of one iteration: top 15 kernels (CPU ops on a CPU) by time, kernel
    launches, cudaMalloc/cudaFree calls, device-busy vs wall time. -> text."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == 'cuda'
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    wall = time.perf_counter() - t0
    want = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    per_name, api = collections.Counter(), collections.Counter()
    count = collections.Counter()
    for ev in prof.events():
        if ev.device_type == want and (cuda or ev.cpu_parent is None):
            us = ev.time_range.elapsed_us()
            per_name[ev.name] += us
            count[ev.name] += 1
        elif ev.device_type == torch.autograd.DeviceType.CPU:
            api[ev.name] += 1
    busy = sum(per_name.values()) / 1e3
    launches = sum(n for k, n in api.items() if 'LaunchKernel' in k or 'cuLaunch' in k)
    what = 'GPU kernels and copies' if cuda else 'top-level ops'
    lines = [f'one iteration, profiled: wall {wall * 1e3:.0f} ms, {what}: {sum(count.values())} '
             f'({busy:.0f} ms busy); kernel-launch API calls {launches}; cudaMalloc '
             f'{api["cudaMalloc"]}, cudaFree {api["cudaFree"]}, cudaStreamSynchronize '
             f'{api["cudaStreamSynchronize"]}, cudaMemcpyAsync {api["cudaMemcpyAsync"]}']
    lines.append(f'{"ms":>8} {"%":>6} {"calls":>6}  kernel')
    for name, us in per_name.most_common(15):
        share = 100 * us / 1e3 / max(busy, 1e-9)
        lines.append(f'{us / 1e3:8.2f} {share:6.1f} {count[name]:6d}  {name[:110]}')
    return '\n'.join(lines)


def _section(title, ctx, est_s=0.0):
    """Prints a section header; False (and a note) when not selected (--sections, by number; extras
    are 'x') or when its estimated duration would overrun the budget."""
    elapsed = time.perf_counter() - ctx['t0']
    number = title.split('.')[0] if title[0].isdigit() else 'x'
    if ctx['sections'] and number not in ctx['sections']:
        return False
    if elapsed + est_s > ctx['budget']:
        print(f'\n=== {title}: SKIPPED (elapsed {elapsed:.0f} s + estimated {est_s:.0f} s > '
              f'budget {ctx["budget"]:.0f} s)', flush=True)
        return False
    print(f'\n=== {title} (start at {elapsed:.0f} s)', flush=True)
    return True


def _guarded(fn, ctx):
    """Runs fn(); an exception (OOM included) is printed, not raised. -> fn's result or None."""
    t0 = time.perf_counter()
    try:
        return fn()
    except Exception as e:  # one failing variant must not stop the others
        kind = 'OUT OF MEMORY' if _cuda_oom(e) else 'FAILED'
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
        print(f'  {kind}: {type(e).__name__}: {first}')
        tb = ''.join(traceback.format_exception(type(e), e, e.__traceback__)[-3:]).strip()
        print('  ' + tb.replace('\n', '\n  ')[-1500:])
        return None
    finally:
        if ctx['device'].type == 'cuda':
            torch.cuda.empty_cache()
        print(f'  section time {time.perf_counter() - t0:.1f} s, elapsed '
              f'{time.perf_counter() - ctx["t0"]:.0f} s', flush=True)


def _print_result(r):
    compiled = ' (includes compilation)' if r['compiled'] else ''
    print(f'  {r["label"]} {r["method"]} mb {r["B"]}: {r["t"] * 1e3:.0f} ms/iter, '
          f'{r["B"] / r["t"]:.1f} img/s, peak {r["peak"]:.0f} MiB above resident '
          f'{r["resident"]:.0f} MiB; first iteration {r["first_s"]:.1f} s, warm-up '
          f'{r["warmup_s"]:.1f} s{compiled}', flush=True)


def _summary(results, ctx, bmap):
    """The table: each result against our fp32 at the same micro-batch and against the official
    figures."""
    by = {(r['label'], r['method'], r['B']): r for r in results}
    flops = {(r['method'], r['B']): r['flops'] for r in results if 'flops' in r}
    rows = []
    for r in results:
        f = flops.get((r['method'], r['B']))
        if f is None:  # FLOPs grow linearly with the micro-batch: scale another count of the method
            f = next((v * r['B'] / b for (m, b), v in flops.items() if m == r['method']),
                     float('nan'))
        pk = (ctx['peaks'] or {}).get(r['precision'], float('nan')) * 1e12
        ref = by.get(('fp32', r['method'], r['B']))
        off = None
        if r['method'] == 'sid' and ctx['device'].type == 'cuda':
            off = OFFICIAL_H100_FP32.get(r['B'])
        t = r['t']
        rows.append([r['label'], r['method'], str(r['B']), f'{t * 1e3:.0f}', f'{r["B"] / t:.1f}',
                     f'{r["peak"]:.0f}', f'{f / 1e9:.0f}', f'{f / t / 1e12:.2f}',
                     f'{100 * f / t / pk:.1f}' if pk == pk and f == f else '-',
                     f'{ref["t"] / t:.2f}' if ref else '-',
                     f'{r["B"] / t / off[1]:.2f}' if off else '-',
                     f'{r["peak"] / off[2]:.2f}' if off else '-', f'{r["warmup_s"]:.0f}'])
    print_table(rows, ['path', 'method', 'mb', 'ms/iter', 'img/s', 'peak MiB', 'GFLOP/iter',
                       'TFLOP/s', 'MFU %', 'x our fp32', 'x official img/s', 'peak/official',
                       'warm-up s'])
    official = '; '.join(f'mb {b}: {t} ms/iter, {s} img/s, peak {p} MiB'
                         for b, (t, s, p) in OFFICIAL_H100_FP32.items())
    print(f'official code, H100, fp32, from the issue (not measured here): {official}')
    print('goals: mb 64 >= 5x official img/s (>= 390), mb 16 >= 3x (>= 150); peak <= official; '
          'SiDA/SiD <= 1.15; compile warm-up <= 120 s')
    sida, sid_ = by.get(('fast', 'sida', bmap[16])), by.get(('fast', 'sid', bmap[16]))
    if sida and sid_:
        print(f'SiDA / SiD time per iteration, fast path, mb {bmap[16]}: '
              f'{sida["t"] / sid_["t"]:.2f}')


def _loss_table(results, bmap, every):
    def find(label):
        key = (label, 'sid', bmap[16])
        return next((r for r in results if (r['label'], r['method'], r['B']) == key), None)

    def rel(x, y):
        return abs(x - y) / max(abs(x), 1e-12)

    a, b = find('fp32'), find('fast')
    if not (a and b):
        print('  needs both the fp32 and the fast run at the small micro-batch')
        return
    print("  same seed, same random weights; fast-path dropout masks differ when compiled (same "
          "law). EDM's init makes the last conv ~1e-5, so on random weights the losses hardly "
          "depend on the nets: a coarse check")
    print(f'  {"iter":>4}  {"loss_fake fp32":>14} {"fast":>12} {"rel":>7}   '
          f'{"loss_G fp32":>12} {"fast":>12} {"rel":>7}')
    for i in range(min(len(a['losses']), len(b['losses']))):
        if i == 0 or (i + 1) % every == 0:
            (f0, g0), (f1, g1) = a['losses'][i], b['losses'][i]
            print(f'  {i + 1:4d}  {f0:14.6g} {f1:12.6g} {rel(f0, f1):7.1e}   {g0:12.6g} '
                  f'{g1:12.6g} {rel(g0, g1):7.1e}')


def bench_compare(args):
    """Sections in order of importance: fp32 16, fast 16 (compiles), fast 64, fp32 64, fast 128,
    SiDA fast 16, loss tracking, profile, then extra fast candidates while the budget lasts.
    --quick: a tiny net on the CPU."""
    device = torch.device(args.device)
    if args.quick:  # CPU smoke test: tiny net, micro-batches 2/4/8 for 16/64/128, eager fast path
        torch.set_num_threads(args.threads or 1)  # a shared CPU: oversubscribed threads crawl
        bmap, track, every, net_overrides = {16: 2, 64: 4, 128: 8}, 4, 2, QUICK_NET
    else:
        bmap, track, every = {16: 16, 64: 64, 128: 128}, 30, 5
        net_overrides = args.net_overrides or ''
    fast = json.loads(args.fast_fields) if args.fast_fields else dict(FAST_FIELDS)
    if args.quick and not args.fast_fields:
        fast['compile'] = 0  # CPU compilation of even the tiny net takes minutes (C++ kernels)
    name = device_name(device)
    peaks = None
    if device.type == 'cuda':
        peaks = next((p for key, p in PEAK_TFLOPS if key in name), None)
    ctx = dict(device=device, t0=time.perf_counter(), budget=args.budget_s,
               net_overrides=net_overrides, workdir=tempfile.mkdtemp(prefix='sid-compare-'),
               sections=set(args.sections.split(',')) if args.sections else None, peaks=peaks)
    net = net_overrides or 'CIFAR-10 DDPM++ (random weights)'
    print(f'device={name}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, '
          f'net={net}')
    print(f'faithful path: {FAITHFUL_FIELDS}; fast path: {fast}; median of {args.repeat} timed '
          f'iterations after warm-up; peak = above resident (weights, Adam states, EMA); budget '
          f'{args.budget_s:.0f} s', flush=True)
    print('expected on an H100: ~20 s per fp32 section; each compiled section ~ its compile '
          'warm-up (new shapes recompile), so fast 128 / SiDA run only if the budget allows',
          flush=True)
    results = []

    def run(title, label, fields, method, B, est, **kw):
        if not _section(title, ctx, est):
            return None
        r = _guarded(lambda: measure(label, fields, method, B, args, ctx, **kw), ctx)
        if r:
            results.append(r)
            _print_result(r)
        return r

    b16, b64, b128 = bmap[16], bmap[64], bmap[128]
    run(f'1. fp32 (faithful), mb {b16}', 'fp32', FAITHFUL_FIELDS, 'sid', b16, 0, track=track)
    title = f'2. fast, mb {b16}' + (' (compiles)' if fast.get('compile') else '')
    r = run(title, 'fast', fast, 'sid', b16, 0, track=track, profile=True)
    warm = r['warmup_s'] if r else 120.0  # what another compiled section may cost
    run(f'3. fast, mb {b64}', 'fast', fast, 'sid', b64, warm + 10)
    run(f'4. fp32 (faithful), mb {b64}', 'fp32', FAITHFUL_FIELDS, 'sid', b64, 20)
    run(f'5. fast, mb {b128} (must not OOM)', 'fast', fast, 'sid', b128, warm + 15)
    run(f'6. SiDA fast, mb {b16}', 'fast', fast, 'sida', b16, warm + 10)
    if _section('7. loss tracking: first iterations of sections 1 and 2', ctx):
        _loss_table(results, bmap, every)
    if _section(f'8. profile of one fast iteration, mb {b16} (taken in section 2)', ctx):
        if r and 'profile' in r:
            print(r['profile'])
        else:
            print('  no profile (section 2 failed or was skipped)')
    for label, fields in EXTRA_FIELDS.items():
        if args.quick and fields.get('compile'):
            continue  # minutes of C++ compilation on a CPU
        compiled = bool(fields.get('compile'))
        for B in ((b64,) if compiled else (b16, b64)):  # compiling: ~3.5 min on an H200
            run(f'extra: {label}, mb {B}', label, fields, 'sid', B, 230 if compiled else 20)
    print('\n=== summary')
    _summary(results, ctx, bmap)
    print(f'total wall time {time.perf_counter() - ctx["t0"]:.0f} s')

#----------------------------------------------------------------------------

BENCHES = dict(nets=bench_nets, sid=bench_sid, compare=bench_compare)
PRECISIONS = ('fp32', 'tf32', 'bf16', 'fp16')
SECTIONS = {'1', '2', '3', '4', '5', '6', '7', '8', 'x'}


def check_options(args):
    """bench's option values checked before anything is built, as sid.py's: one ValueError line
    (main makes it `error: ...` and exit code 2)."""
    import checkpoints
    import sid
    counts = dict(batch=args.batch, repeat=args.repeat, threads=args.threads)
    counts.update({'batch-gpu': min(args.batch_gpu) if args.batch_gpu else None})
    for name, v in counts.items():
        if v is not None and v < 1:
            raise ValueError(f'--{name} must be >= 1, got {v}')
    edm2 = [name for name in sid.PRESETS if name.startswith('imagenet512-')]
    if args.dataset not in ['cifar10', *edm2]:
        raise ValueError(f'--dataset {args.dataset}: cifar10 or an EDM2 preset '
                         f'({", ".join(edm2)})')
    if not re.fullmatch(r'cpu|cuda(:\d+)?', args.device):
        raise ValueError(f'--device {args.device}: use cpu, cuda or cuda:N')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'--device {args.device}: CUDA is not available here')
    for setting in args.settings or []:
        if setting.split('+')[0] not in PRECISIONS:
            raise ValueError(f'--settings {setting}: the precision must be one of '
                             f'{", ".join(PRECISIONS)}')
        setting_fields(setting)
    bad = sorted(set(args.sections.split(',')) - SECTIONS) if args.sections else []
    if bad:
        raise ValueError(f'--sections: unknown section(s) {", ".join(bad)} (1-8 or x)')
    for name, v in (('peak-tflops', args.peak_tflops), ('budget-s', args.budget_s)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f'--{name} must be a finite number > 0, got {v}')
    if args.fast_fields is not None:
        try:
            fields = json.loads(args.fast_fields)
        except ValueError:
            fields = None
        known = sid.Config.__dataclass_fields__
        if not isinstance(fields, dict) or not all(k in known for k in fields):
            raise ValueError('--fast-fields must be a JSON object of sid.py options, e.g. '
                             '\'{"fast": 1}\'')
    if args.net_overrides:
        checkpoints.parse_net_overrides(args.net_overrides, 'cifar10-32x32-uncond-vp')


def main(argv=None):
    parser = argparse.ArgumentParser(description='sid benchmarks: time and peak memory')
    add = parser.add_argument
    add('--what', choices=sorted(BENCHES), default='nets', help='what to benchmark (default: nets)')
    add('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
        help='cpu or cuda (default: cuda if available)')
    add('--batch', type=int, default=2, help='images per call (default: 2)')
    add('--repeat', type=int, default=3,
        help='timed repeats after one warm-up; median reported (default: 3)')
    edm = [n for n in edm_nets.PRESETS if not n.startswith('edm2-')]
    add('--presets', nargs='+', default=edm, choices=list(edm_nets.PRESETS),
        metavar='NAME', help="teacher presets (default: EDM's five; EDM2's: edm2-img512-xs ...)")
    add('--amp', choices=['none', 'bf16'], default='none', help='bf16 autocast (default: none)')
    add('--threads', type=int, default=None, help='CPU threads (default: torch default)')
    add('--batch-gpu', type=int, nargs='+', default=None,
        help='sid: micro-batch sizes (default: 64 16 on CUDA, 4 on CPU)')
    add('--settings', nargs='+', default=None, metavar='PREC[+OPTION...]',
        help='sid: e.g. fp32 bf16+channels_last+fused_adam (options: ' + ', '.join(FAST_OPTIONS)
        + '; default: a CPU or GPU list)')
    add('--methods', nargs='+', default=['sid', 'sida'], choices=['sid', 'sida'],
        help='sid: methods (default: sid sida)')
    add('--peak-tflops', type=float, default=None,
        help='sid: device peak for MFU (default: datasheet table on CUDA, none on CPU)')
    add('--quick', action='store_true',
        help='compare: CPU smoke test on a tiny net (micro-batches 2/4/8, eager fast path unless '
        '--fast-fields)')
    add('--fast-fields', default=None, metavar='JSON',
        help='compare: the fast path as sid.Config fields (default: bench.FAST_FIELDS)')
    add('--budget-s', type=float, default=330,
        help='compare: skip sections that would end after this many seconds (default: 330)')
    add('--sections', default=None, metavar='LIST',
        help='compare: only these sections, e.g. 5,6,x (x = extras; 7/8 need 1 and 2; default: '
        'all)')
    add('--net-overrides', default=None, metavar='JSON',
        help='sid, compare: network kwargs (as sid.py)')
    add('--dataset', default='cifar10',
        help='sid: cifar10 (default) or an EDM2 preset, e.g. imagenet512-xs (SiD only)')
    args = parser.parse_args(argv)
    import runs
    runs.one_line_errors(lambda: check_options(args))
    if args.quick:
        args.device, args.repeat = 'cpu', min(args.repeat, 2)
        args.budget_s = max(args.budget_s, 900)  # a loaded CPU is slow; run every section
    if args.threads:
        torch.set_num_threads(args.threads)
    BENCHES[args.what](args)


if __name__ == '__main__':
    main()
