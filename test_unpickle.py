"""Tests of unpickle: the bounded unpickler in-process (depth / shared-DAG / cycle caps, refused
keys and objects, exact on honest data). Hostile files through every reader: test_checkpoints.py."""
import collections
import contextlib
import io
import pickle
import signal

import numpy as np
import pytest

import unpickle


@contextlib.contextmanager
def hang_guard(seconds=60):
    """A hang becomes a failure; not a speed test (each refusal takes milliseconds)."""
    def expire(*_):
        raise TimeoutError(f'still running after {seconds} s')

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_unpickler_bounds_structure_and_is_exact_on_honest_data():
    # t_{k+1} = [t_k, t_k] memoised: 2^40 nodes as a tree; 100 nested lists; a list holding itself
    memo = b''.join(bytes([0x68, k, 0x68, k, 0x86, 0x94]) + (b'0' if k < 39 else b'')
                    for k in range(40))
    dag = b'\x80\x04]\x940' + memo + b'.'
    deep = b'\x80\x04' + b'](' * 100 + b'e' * 100 + b'.'
    cycle = b'\x80\x04]\x94h\x00a.'
    for blob in (dag, deep, cycle):
        with hang_guard(), pytest.raises(ValueError, match='x.pkl: .*nesting deeper than 64 '
                                                           'or more than'):
            unpickle.bounded_unpickle(io.BytesIO(blob), {}, 'x.pkl')
    shallower = b'\x80\x04' + b'](' * 60 + b'e' * 60 + b'.'
    assert unpickle.bounded_unpickle(io.BytesIO(shallower), {}, 'x.pkl')
    obj = {'a': [1, 2.5, None, True, b'x', 'y'],
           3: (np.arange(6, dtype=np.float32).reshape(2, 3), {1, 'q'}),
           'od': collections.OrderedDict(z=1), 's': np.float64(0.25)}
    for protocol in (2, 4):
        if protocol == 4:  # the FROZENSET opcode only from protocol 4
            obj = dict(obj, f=frozenset({1, 2}))
        blob = pickle.dumps(obj, protocol)
        got = unpickle.bounded_unpickle(io.BytesIO(blob), unpickle.EDM_GLOBALS, 'x.pkl')
        assert got.keys() == obj.keys() and got['a'] == obj['a'] and got['od'] == obj['od']
        assert got['s'] == 0.25 and np.array_equal(got[3][0], obj[3][0])
        assert got[3][1] == obj[3][1] and got.get('f') == obj.get('f')
    for bad in ({(1,): 2}, {frozenset({1}): 1}, np.array([None], dtype=object)):  # refused
        with pytest.raises(ValueError, match='x.pkl: unsafe or unreadable pickle'):
            unpickle.bounded_unpickle(io.BytesIO(pickle.dumps(bad, 4)), unpickle.EDM_GLOBALS,
                                      'x.pkl')


@pytest.mark.parametrize('make,protocols', [
    (lambda n: list(range(n)), (2, 4)),  # APPENDS
    (lambda n: {i: i for i in range(n)}, (2, 4)),  # SETITEMS
    (lambda n: set(range(n)), (2, 4)),  # builtins.set of a list (protocol 2), ADDITEMS (4)
    (lambda n: frozenset(range(n)), (4,)),  # FROZENSET (protocol 2 would need builtins.frozenset)
    (lambda n: collections.OrderedDict((i, i) for i in range(n)), (2, 4))])  # plain dict items
def test_every_container_opcode_is_bounded(monkeypatch, make, protocols):
    monkeypatch.setattr(unpickle, 'MAX_CONTAINER', 40)
    for protocol in protocols:
        ok = pickle.dumps(make(40), protocol)
        assert unpickle.bounded_unpickle(io.BytesIO(ok), unpickle.EDM_GLOBALS, 'x.pkl') == make(40)
        too_big = pickle.dumps(make(41), protocol)
        with pytest.raises(ValueError, match='x.pkl: .*a container of 41 items exceeds the limit'):
            unpickle.bounded_unpickle(io.BytesIO(too_big), unpickle.EDM_GLOBALS, 'x.pkl')
