# Benchmarks for sid (not tests): time and peak memory of the EDM teacher networks, per preset.
#   python bench.py --what nets --device cpu --batch 2 --presets cifar10-32x32-uncond-vp
# Peak memory: CUDA -> torch.cuda.max_memory_allocated above the weights; CPU -> peak resident set size
# (Linux VmHWM, reset before each measurement) above the resident size before it.

import argparse
import contextlib
import ctypes
import io
import statistics
import tempfile
import time

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
    """Stores the peak memory (MiB) used inside the block, above what was in use before it, in result[0]."""
    if device.type == 'cuda':
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        _sync(device)
        result[0] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)  # hand freed heap pages back, so the baseline is what is in use
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

#----------------------------------------------------------------------------
# Networks: one forward (eval, no grad; teacher / sampling cost) and one forward+backward (train mode with
# dropout, as in the fake-score / generator updates) per preset at the given batch size.

def bench_nets(args):
    device = torch.device(args.device)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if args.amp == 'bf16' else contextlib.nullcontext()
    rows = []
    for name in args.presets:
        torch.manual_seed(0)
        net = edm_nets.build_preset(name).to(device)
        B, R = args.batch, net.img_resolution
        x = torch.randn(B, net.img_channels, R, R, device=device)
        sigma = torch.full([B, 1, 1, 1], 2.5, device=device)
        labels = torch.eye(net.label_dim, device=device)[torch.arange(B, device=device) % net.label_dim] if net.label_dim else None
        aug = torch.zeros(B, 9, device=device) if net.model.map_augment is not None else None

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
    print(f'device={device} ({torch.get_num_threads()} threads), amp={args.amp}, batch={args.batch}, '
          f'median of {args.repeat}; memory = peak above the weights already resident')
    print_table(rows, ['preset', 'Mparams', 'batch', 'fwd ms', 'fwd MiB', 'fwd+bwd ms', 'fwd+bwd MiB'])

#----------------------------------------------------------------------------
# One SiD (or SiDA) iteration of sid.iterate(), the training loop itself (one accumulation round): fake-score step, generator
# step, EMA, on the CIFAR-10 DDPM++ teacher architecture with random weights (sid.build_networks with
# teacher='random'). Reports images/s (generator images, the unit of kimg), peak memory and model FLOP
# utilisation per precision and fast-path setting, and SiDA's cost relative to SiD.

# Dense (no sparsity) datasheet peaks in TFLOP/s, matched on the CUDA device name; fp32 means TF32 off.
PEAK_TFLOPS = [('H100 PCIe', dict(fp32=51.2, tf32=378, bf16=756, fp16=756)),
               ('H100', dict(fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4)),  # SXM5
               ('H200', dict(fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4)),
               ('A100', dict(fp32=19.5, tf32=156, bf16=312, fp16=312))]
FAST_OPTIONS = ('channels_last', 'fused_adam', 'compile', 'checkpointing')  # sid.Config fields, 0/1
CPU_SETTINGS = ['fp32', 'bf16']  # fp16 is EDM's CUDA-only casting, TF32 a CUDA switch: both no-ops on a CPU
GPU_SETTINGS = ['fp32', 'tf32', 'bf16', 'fp16', 'bf16+channels_last+fused_adam',
                'bf16+channels_last+fused_adam+compile', 'fp32+checkpointing', 'bf16+channels_last+fused_adam+checkpointing']


def sid_iterations(method, setting, batch, device, workdir, net_overrides=''):
    """sid.iterate() for one setting ('bf16+channels_last+...'): the training loop itself, one accumulation round,
    never reaching a tick or snapshot, SiDA straight in its 0.5/0.5 phase on random stand-in real images.
    net_overrides: JSON network kwargs as sid's --net-overrides (tests use a tiny net)."""
    import os, PIL.Image, sid
    precision, *opts = setting.split('+')
    bad = [o for o in opts if o not in FAST_OPTIONS]
    if bad:
        raise ValueError(f'unknown option(s) {bad} in setting "{setting}" (known: {", ".join(FAST_OPTIONS)})')
    data = ''
    if method == 'sida':  # a folder of random 32x32 PNGs stands in for CIFAR-10 (same cost)
        data = os.path.join(workdir, 'real')
        os.makedirs(data, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        for i in range(2 * batch):
            PIL.Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()).save(
                os.path.join(data, f'{i:04d}.png'))
    cfg = sid.make_config(dict(dataset='cifar10', method=method, teacher='random', precision=precision, batch=batch,
                               batch_gpu=batch, device=device.type, net_overrides=net_overrides, data=data,
                               outdir=os.path.join(workdir, f'{method}-{setting}-{batch}'), duration_mimg=1e6,
                               tick_kimg=1e9, snap_kimg=1e9, sida_warmup_kimg=0, sida_mix_kimg=0,
                               **{o: 1 for o in opts}))
    return cfg, sid.iterate(cfg)


def run_iteration(it):
    """One training iteration, its console output (the config at start-up) swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        return next(it)


def _resident_mib(device):
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == 'cuda' else _proc_status_kib('VmRSS') / 1024


def bench_sid(args):
    from torch.utils.flop_counter import FlopCounterMode
    device = torch.device(args.device)
    batches = args.batch_gpu or ([64, 16] if device.type == 'cuda' else [4])
    settings = args.settings or (GPU_SETTINGS if device.type == 'cuda' else CPU_SETTINGS)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    peaks = next((p for key, p in PEAK_TFLOPS if key in name), None) if device.type == 'cuda' else None
    results, flops = [], {}
    workdir = tempfile.mkdtemp(prefix='sid-bench-')
    for B in batches:
        for method in args.methods:
            for setting in settings:
                cfg, it = sid_iterations(method, setting, B, device, workdir)
                for _ in range(1 + 2 * cfg.compile):  # warm-up: set-up, allocator, cuDNN autotuning, compilation
                    run_iteration(it)
                times, cpu_times, peak = [], [], 0.0
                for _ in range(args.repeat):
                    m = [0.0]
                    resident = _resident_mib(device)
                    with peak_memory_mib(device, m):
                        _sync(device)
                        t0, c0 = time.perf_counter(), time.process_time()
                        run_iteration(it)
                        _sync(device)
                        times.append(time.perf_counter() - t0)
                        cpu_times.append(time.process_time() - c0)  # all threads; robust to other loads
                    peak = max(peak, m[0])
                # Model FLOPs of one iteration, counted once per (method, batch) on an eager run without
                # recomputation: compiled kernels bypass the counter, checkpointing's recompute is not model work.
                if (method, B) not in flops and not (cfg.compile or cfg.checkpointing):
                    with FlopCounterMode(display=False) as fc:
                        run_iteration(it)
                    flops[method, B] = fc.get_total_flops()
                results.append((method, setting, B, statistics.median(times), statistics.median(cpu_times),
                                resident, peak))
                it.close()
                del it
                if device.type == 'cuda':
                    torch.cuda.empty_cache()
    rows, by_key = [], {}
    for method, setting, B, t, t_cpu, resident, peak in results:
        f = flops.get((method, B), float('nan'))
        pk = (args.peak_tflops or (peaks or {}).get(setting.split('+')[0], float('nan'))) * 1e12
        mfu = f / t / pk if device.type == 'cuda' or args.peak_tflops else float('nan')
        by_key[method, setting, B] = t if device.type == 'cuda' else t_cpu  # CPU: other processes inflate wall time
        rows.append([method, setting, str(B), f'{t * 1e3:.0f}', f'{t_cpu:.1f}', f'{B / t:.3g}', f'{resident:.0f}', f'{peak:.0f}',
                     f'{f / 1e9:.0f}', f'{f / t / 1e12:.3f}', f'{100 * mfu:.1f}' if mfu == mfu else '-'])
    print(f'device={name}, torch {torch.__version__}, CIFAR-10 DDPM++ (random weights), one accumulation round, '
          f'median of {args.repeat} after warm-up')
    print('img/s counts generator images (kimg); each iteration also generates batch images for f_psi '
          '(SiDA: plus batch real images). Peak = above resident (weights, Adam states). '
          'GFLOP = model FLOPs per iteration (FlopCounterMode, eager, no recompute).')
    if device.type == 'cuda':
        print(f'MFU peak: {args.peak_tflops or peaks} TFLOP/s (dense datasheet, by precision)'
              if (args.peak_tflops or peaks) else f'MFU: unknown peak for {name}; pass --peak-tflops')
    else:
        print(f'MFU: assumed peak {args.peak_tflops} TFLOP/s' if args.peak_tflops else
              'MFU: no CPU peak assumed (pass --peak-tflops); achieved TFLOP/s shown')
    print_table(rows, ['method', 'setting', 'batch', 'ms/iter', 'CPU s/iter', 'img/s', 'resident MiB', 'peak MiB', 'GFLOP',
                       'TFLOP/s', 'MFU %'])
    for (method, setting, B), t in by_key.items():
        if method == 'sida' and ('sid', setting, B) in by_key:
            ratio = flops.get(('sida', B), float('nan')) / flops.get(('sid', B), float('nan'))
            print(f'SiDA / SiD {"time" if device.type == "cuda" else "CPU time"} per iteration: '
                  f'{t / by_key["sid", setting, B]:.2f} ({setting}, batch {B}); '
                  f'FLOPs {ratio:.3f}')

#----------------------------------------------------------------------------

BENCHES = dict(nets=bench_nets, sid=bench_sid)


def main():
    parser = argparse.ArgumentParser(description='sid benchmarks: time and peak memory')
    parser.add_argument('--what', choices=sorted(BENCHES), default='nets', help='what to benchmark (default: nets)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda (default: cuda if available)')
    parser.add_argument('--batch', type=int, default=2, help='images per call (default: 2)')
    parser.add_argument('--repeat', type=int, default=3, help='timed repeats after one warm-up; median reported (default: 3)')
    parser.add_argument('--presets', nargs='+', default=list(edm_nets.PRESETS), choices=list(edm_nets.PRESETS),
                        metavar='NAME', help='teacher presets (default: all five)')
    parser.add_argument('--amp', choices=['none', 'bf16'], default='none', help='bf16 autocast (default: none)')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch default)')
    parser.add_argument('--batch-gpu', type=int, nargs='+', default=None,
                        help='sid: micro-batch sizes (default: 64 16 on CUDA, 4 on CPU)')
    parser.add_argument('--settings', nargs='+', default=None, metavar='PREC[+OPTION...]',
                        help='sid: e.g. fp32 bf16+channels_last+fused_adam (options: ' + ', '.join(FAST_OPTIONS) +
                             '; default: a CPU or GPU list)')
    parser.add_argument('--methods', nargs='+', default=['sid', 'sida'], choices=['sid', 'sida'],
                        help='sid: methods (default: sid sida)')
    parser.add_argument('--peak-tflops', type=float, default=None,
                        help='sid: device peak for MFU (default: datasheet table on CUDA, none on CPU)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    BENCHES[args.what](args)


if __name__ == '__main__':
    main()
