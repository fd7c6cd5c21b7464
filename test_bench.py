"""Tests of bench: its options get sid.py's one-line errors (exit code 2) before anything is
built; good options reach the benchmark."""
import pytest
import torch

import bench

BAD = [(['--batch', '0'], '--batch must be >= 1, got 0'),
       (['--repeat', '0'], '--repeat must be >= 1'),
       (['--threads', '-1'], '--threads must be >= 1'),
       (['--threads', '0'], '--threads must be >= 1'),
       (['--batch-gpu', '4', '0'], '--batch-gpu must be >= 1'),
       (['--device', 'tpu'], '--device tpu: use cpu, cuda or cuda:N'),
       (['--settings', 'fp8'], 'the precision must be one of'),
       (['--settings', 'bf16+turbo'], "unknown option(s) ['turbo']"),
       (['--sections', '1,9'], 'unknown section(s) 9'),
       (['--fast-fields', '{bad json'], '--fast-fields must be a JSON object'),
       (['--fast-fields', '{"no_such_option": 1}'], '--fast-fields must be a JSON object'),
       (['--net-overrides', '{"model_channels": -1}'], 'model_channels=-1 is unknown'),
       (['--net-overrides', '[1]'], '--net-overrides must be a JSON object'),
       (['--budget-s', 'nan'], '--budget-s must be a finite number > 0'),
       (['--peak-tflops', '0'], '--peak-tflops must be a finite number > 0')]
if not torch.cuda.is_available():
    BAD.append((['--device', 'cuda'], 'CUDA is not available here'))


@pytest.mark.parametrize('argv,msg', BAD, ids=[' '.join(a) for a, _ in BAD])
def test_bad_options_are_one_line_errors(argv, msg, monkeypatch, capsys):
    ran = []
    monkeypatch.setitem(bench.BENCHES, 'nets', lambda args: ran.append(args))
    with pytest.raises(SystemExit) as e:
        bench.main(['--what', 'nets', *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith('error: ')
    assert msg in err[0] and not ran


def test_good_options_reach_the_benchmark(monkeypatch):
    ran = []
    monkeypatch.setitem(bench.BENCHES, 'compare', lambda args: ran.append(args))
    bench.main(['--what', 'compare', '--device', 'cpu', '--batch-gpu', '2', '4', '--settings',
                'fp32', 'bf16+channels_last+fused_adam', '--sections', '1,2,x', '--fast-fields',
                '{"fast": 1}', '--net-overrides', bench.QUICK_NET, '--peak-tflops', '10'])
    assert len(ran) == 1 and ran[0].batch_gpu == [2, 4] and ran[0].sections == '1,2,x'
