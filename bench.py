# Benchmarks for sid (not tests): time and peak memory of the EDM teacher networks, per preset.
#   python bench.py --what nets --device cpu --batch 2 --presets cifar10-32x32-uncond-vp
# Peak memory: CUDA -> torch.cuda.max_memory_allocated above the weights; CPU -> peak resident set size
# (Linux VmHWM, reset before each measurement) above the resident size before it.

import argparse
import contextlib
import ctypes
import statistics
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

BENCHES = dict(nets=bench_nets)


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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    BENCHES[args.what](args)


if __name__ == '__main__':
    main()
