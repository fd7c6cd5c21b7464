# The bounded allow-list unpickler of sid, with the safe stand-ins that the allowed pickles need.
#
# Reads the pickles of EDM (Karras et al. 2022, github.com/NVlabs/edm: the .pkl files of its
# torch_utils.persistence, which EDM2's and SiD's checkpoints share), the data.pkl of torch.save
# files and the CIFAR-10 python batches, without running anything from the file. EDM's persistent
# objects become inert records: their embedded `module_src` is hashed, never executed.

import _compat_pickle
import collections
import hashlib
import io
import math
import pickle
import re
import struct
import sys

import numpy as np
import torch

#----------------------------------------------------------------------------
# One bounded unpickler for every pickle we read (EDM/SiD .pkl, the storages inside them, the
# data.pkl of torch.save files, the CIFAR-10 batches). Besides an exact allow-list of globals per
# use, it bounds the work a hostile file can cause: reads never exceed the file, dict keys and set
# elements are plain scalars (so no attacker-built object is ever hashed), numpy arrays are never
# object arrays and must match their bytes, tensor views must fit their storage, and the result's
# depth and tree size are capped.

MAX_DEPTH, MAX_CONTAINER, MAX_NODES = 64, 10 ** 6, 2 * 10 ** 6
_KEY_TYPES = (str, bytes, int, float, bool, type(None))
Refused = pickle.UnpicklingError  # every refusal; bounded_unpickle makes it one ValueError line


class _BoundedReader:
    """File wrapper for the unpickler: a read larger than what is left is refused before any
    allocation."""
    def __init__(self, f):
        pos = f.tell()
        self.f, self.left = f, f.seek(0, 2) - pos
        f.seek(pos)

    def read(self, n=-1):
        if n is None or n < 0 or n > self.left:
            raise Refused(f'the pickle claims {n} bytes but only {self.left} remain')
        b = self.f.read(n)
        self.left -= len(b)
        return b

    def readline(self):
        b = self.f.readline()
        self.left -= len(b)
        return b


def _check_keys(keys):
    for k in keys:
        if type(k) not in _KEY_TYPES:
            raise Refused(f'refusing a {type(k).__name__} as a dict key or set element '
                          f'(only plain scalars)')


def _check_size(n):
    if n > MAX_CONTAINER:
        raise Refused(f'a container of {n} items exceeds the limit of {MAX_CONTAINER}')


class _BoundedUnpickler(pickle._Unpickler):  # the pure-Python one, whose opcodes can be overridden
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, f, allow, persistent=None, encoding='ASCII'):
        super().__init__(_BoundedReader(f), encoding=encoding)
        self.allow, self.persistent = allow, persistent

    def find_class(self, module, name):
        if self.proto < 3 and self.fix_imports:  # Python 2 names (__builtin__.set, ...) as pickle
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in self.allow:
            raise Refused(f'refusing to load global {module}.{name} '
                          f'(not on the allow-list for this file)')
        return self.allow[(module, name)]

    def persistent_load(self, pid):
        if self.persistent is None:
            raise Refused('refusing a persistent id in this pickle')
        return self.persistent(pid)

    def _dict_items(self, d, items):
        if not isinstance(d, dict):
            raise Refused(f'refusing to set items on a {type(d).__name__}')
        _check_keys(items[::2])
        _check_size(len(d) + len(items) // 2)
        for i in range(0, len(items) - 1, 2):
            d[items[i]] = items[i + 1]

    def load_dict(self):
        items = self.pop_mark()
        d = {}
        self._dict_items(d, items)
        self.append(d)

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._dict_items(self.stack[-1], [key, value])

    def load_setitems(self):
        items = self.pop_mark()
        self._dict_items(self.stack[-1], items)

    def load_additems(self):
        items = self.pop_mark()
        s = self.stack[-1]
        if not isinstance(s, set):
            raise Refused(f'refusing to add items to a {type(s).__name__}')
        _check_keys(items)
        _check_size(len(s) + len(items))
        s.update(items)

    def load_frozenset(self):
        items = self.pop_mark()
        _check_keys(items)
        _check_size(len(items))
        self.append(frozenset(items))

    def load_appends(self):
        items = self.pop_mark()
        lst = self.stack[-1]
        if not isinstance(lst, list):
            raise Refused(f'refusing to append to a {type(lst).__name__}')
        _check_size(len(lst) + len(items))
        lst.extend(items)

    def load_appends_one(self):
        value = self.stack.pop()
        lst = self.stack[-1]
        if not isinstance(lst, list):
            raise Refused(f'refusing to append to a {type(lst).__name__}')
        _check_size(len(lst) + 1)
        lst.append(value)

    def load_build(self):
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.ndarray):
            _check_array_state(state)
        elif isinstance(inst, np.dtype):
            plain = isinstance(state, tuple) and len(state) == 8 and state[2:5] == (None,) * 3
            if not plain:
                raise Refused('refusing a structured or sub-array numpy dtype')
        elif isinstance(inst, dict):  # OrderedDict state dicts carry `_metadata` as instance state
            no_slots = isinstance(state, tuple) and len(state) == 2 and state[1] is None
            if not isinstance(state, dict) and not no_slots:
                raise Refused('refusing slot state on a dict')
        elif not isinstance(inst, _InertModule):
            raise Refused(f'refusing to set the state of a {type(inst).__name__}')
        super().load_build()

    for _op, _fn in ((pickle.DICT, load_dict), (pickle.SETITEM, load_setitem),
                     (pickle.SETITEMS, load_setitems), (pickle.ADDITEMS, load_additems),
                     (pickle.FROZENSET, load_frozenset), (pickle.APPENDS, load_appends),
                     (pickle.APPEND, load_appends_one), (pickle.BUILD, load_build)):
        dispatch[_op[0]] = _fn
    del _op, _fn


def _check_tree(obj):
    """Depth <= MAX_DEPTH and at most MAX_NODES nodes counted as a tree (shared sub-objects count
    each time), so that no later walk (repr, json, state-dict flattening) can blow up; cycles
    exceed the depth."""
    todo, count = [(obj, 0)], 0
    while todo:
        x, depth = todo.pop()
        count += 1
        if depth > MAX_DEPTH or count > MAX_NODES:
            raise Refused(f'nesting deeper than {MAX_DEPTH} or more than {MAX_NODES} objects')
        if isinstance(x, dict):
            todo += [(v, depth + 1) for v in x.values()]
            if type(x) is not dict and getattr(x, '__dict__', None):
                todo.append((x.__dict__, depth + 1))
        elif isinstance(x, (list, tuple, set, frozenset)):
            todo += [(v, depth + 1) for v in x]
        elif isinstance(x, _InertModule):
            todo.append((x.state, depth + 1))


def bounded_unpickle(f, allow, source, persistent=None, encoding='ASCII'):
    """Unpickle one object from the binary file `f` with the allow-list `allow`
    {(module, name): callable}; every refusal or malformation becomes one ValueError line naming
    `source`."""
    try:
        obj = _BoundedUnpickler(f, allow, persistent, encoding).load()
        _check_tree(obj)
        return obj
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, MemoryError, RecursionError, OverflowError, RuntimeError,
            UnicodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f'{source}: unsafe or unreadable pickle ({msg})') from None

#----------------------------------------------------------------------------
# Safe stand-ins for the globals that the allowed pickles use (numpy arrays and dtypes, bytes,
# sets, ordered dicts, torch tensors and storages, EDM's persistence records).

try:
    from numpy._core import multiarray as _np_multiarray  # numpy >= 2
except ImportError:  # pragma: no cover
    from numpy.core import multiarray as _np_multiarray

_NDARRAY = object()  # numpy.ndarray only marks _reconstruct's type: calling it allocates any shape


def _check_array_state(state):
    ok = (isinstance(state, tuple) and len(state) == 5 and isinstance(state[1], tuple)
          and len(state[1]) <= 32)
    if ok:
        _, shape, dtype, _, raw = state
        ok = (isinstance(dtype, np.dtype) and not dtype.hasobject and dtype.names is None
              and dtype.subdtype is None and all(type(s) is int and s >= 0 for s in shape)
              and isinstance(raw, (bytes, str)) and math.prod(shape) * dtype.itemsize == len(raw))
    if not ok:
        raise Refused('refusing a numpy array whose dtype is object/structured or whose data '
                      'does not match its shape')


def _np_reconstruct(subtype, shape, code):
    if subtype is not _NDARRAY or shape != (0,):
        raise Refused('refusing numpy _reconstruct other than the empty placeholder array')
    return _np_multiarray._reconstruct(np.ndarray, (0,), b'b')


def _np_dtype(spec, align=False, copy=True):
    if not (isinstance(spec, str) and re.fullmatch(r'[biufc]\d{1,2}', spec)):
        raise Refused(f'refusing numpy dtype {spec!r} (only plain numeric dtypes)')
    return np.dtype(spec, align=bool(align), copy=bool(copy))


def _np_scalar(dtype, data=None):
    plain = (isinstance(dtype, np.dtype) and not dtype.hasobject
             and isinstance(data, (bytes, str)) and len(data) == dtype.itemsize)
    if not plain:
        raise Refused('refusing a numpy scalar that is not a plain number')
    return _np_multiarray.scalar(dtype, data)


def _codecs_encode(s, encoding='utf-8'):  # bytes in protocol-2 pickles written by Python 3
    if not isinstance(s, str) or encoding not in ('latin1', 'latin-1', 'utf-8', 'utf8'):
        raise Refused('refusing _codecs.encode other than text to bytes')
    return s.encode(encoding)


def ordered_dict(*args):
    """collections.OrderedDict for the allow-lists: empty, its items come as plain dict items."""
    if args:
        raise Refused('refusing OrderedDict built from arguments '
                      '(items must come as plain dict items)')
    return collections.OrderedDict()


def _safe_set(items=()):
    items = list(items) if isinstance(items, (list, tuple)) else None
    if items is None:
        raise Refused('refusing a set built from a non-list')
    _check_keys(items)
    _check_size(len(items))
    return set(items)


_NUMPY_GLOBALS = {('numpy', 'ndarray'): _NDARRAY, ('numpy', 'dtype'): _np_dtype,
                  ('_codecs', 'encode'): _codecs_encode}
for _mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):  # numpy 1.x and 2.x spellings
    _NUMPY_GLOBALS[(_mod, 'scalar')] = _np_scalar
    _NUMPY_GLOBALS[(_mod, '_reconstruct')] = _np_reconstruct
CIFAR_GLOBALS = dict(_NUMPY_GLOBALS)

_STORAGE_DTYPES = dict(FloatStorage=torch.float32, DoubleStorage=torch.float64,
                       HalfStorage=torch.float16, BFloat16Storage=torch.bfloat16,
                       LongStorage=torch.int64, IntStorage=torch.int32, ShortStorage=torch.int16,
                       CharStorage=torch.int8, ByteStorage=torch.uint8, BoolStorage=torch.bool)


class StorageType:
    """Stand-in for torch's legacy storage classes (torch.FloatStorage, ...): dtype, item size."""
    def __init__(self, dtype):
        self.dtype, self.itemsize = dtype, torch.empty(0, dtype=dtype).element_size()


STORAGE_GLOBALS = {('torch', k): StorageType(v) for k, v in _STORAGE_DTYPES.items()}


def check_view(numel, offset, size, stride):
    """A tensor view (offset, size, stride) must lie inside a storage of `numel` elements."""
    ok = (type(offset) is int and offset >= 0 and isinstance(size, tuple)
          and isinstance(stride, tuple) and len(size) == len(stride) <= 16
          and all(type(s) is int and s >= 0 for s in size + stride))
    if not ok:
        raise Refused('refusing a tensor with a malformed offset/size/stride')
    if 0 not in size and offset + sum((s - 1) * st for s, st in zip(size, stride)) >= numel:
        raise Refused(f'refusing a tensor view {list(size)} at offset {offset} that exceeds its '
                      f'storage of {numel} elements')


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, torch.storage.TypedStorage) or hooks or metadata:
        raise Refused('refusing a tensor without plain storage or with hooks/metadata')
    check_view(storage._size(), offset, size, stride)  # _size: without the deprecation warning
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, bool(requires_grad),
                                           collections.OrderedDict())


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, torch.Tensor) or hooks or state:
        raise Refused('refusing a parameter with hooks or extra state')
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def _legacy_storage(b):
    """torch.storage._load_from_bytes, re-done within bounds: the legacy torch.save stream of one
    storage (magic, protocol, sys info, the storage record, its keys, then per key int64 numel +
    raw bytes)."""
    if not isinstance(b, bytes):
        raise Refused('refusing a storage that is not bytes')
    f, src = io.BytesIO(b), 'embedded storage'
    head = [bounded_unpickle(f, {}, src) for _ in range(3)]
    legacy = (head[0] == 0x1950a86a20f9469cfc6c and head[1] == 1001
              and isinstance(head[2], dict) and head[2].get('little_endian') is True)
    if not legacy:
        raise Refused('refusing an embedded storage that is not a little-endian legacy '
                      'torch.save stream')
    pids = []

    def persistent(pid):
        ok = (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == 'storage'
              and isinstance(pid[1], StorageType) and type(pid[4]) is int and pid[5] is None)
        if not ok:
            raise Refused('refusing a malformed storage record')
        pids.append(pid)
        return len(pids) - 1

    if bounded_unpickle(f, STORAGE_GLOBALS, src, persistent) != 0 or len(pids) != 1:
        raise Refused('refusing an embedded stream that is not exactly one storage')
    keys = bounded_unpickle(f, {}, src)
    _, stype, key, _, numel, _ = pids[0]
    n = struct.unpack('<q', f.read(8))[0] if keys == [key] else -1
    if n != numel or n < 0 or n * stype.itemsize != len(b) - f.tell():
        raise Refused(f'refusing a storage that declares {numel} elements but holds '
                      f'{len(b) - f.tell()} bytes')
    if n:
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        untyped = data.view(stype.dtype).untyped_storage()
    else:
        untyped = torch.empty(0, dtype=stype.dtype).untyped_storage()
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=stype.dtype, _internal=True)

#----------------------------------------------------------------------------
# EDM/SiD `.pkl` records (pickled torch_utils.persistence objects): persistent objects become inert
# records, their embedded `module_src` is hashed, never executed.

class _InertModule:
    """Stand-in for torch container modules (ModuleDict etc.) in the pickle: keeps their state,
    runs nothing."""
    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise Refused('refusing a module state that is not a dict')
        self.state = state


class _EasyDict(dict):
    def __init__(self, *args, **kwargs):  # only NEWOBJ + dict items: arguments hash arbitrary keys
        if args or kwargs:
            raise Refused('refusing EasyDict built from arguments')


def _inert_persistent_obj(meta):
    # Replaces torch_utils.persistence._reconstruct_persistent_obj, which would exec
    # meta['module_src'].
    plain = (isinstance(meta, dict) and meta.get('type') == 'class'
             and isinstance(meta.get('state') or {}, dict))
    if not plain:
        raise Refused('unexpected persistent object record in the pickle')
    if meta.get('version') != 6:
        print(f'warning: persistence format version {meta.get("version")} (expected 6)',
              file=sys.stderr)
    # the state dict itself, even while empty: a module pickled inside its own state (an EDM2
    # generator's hooks) is rebuilt before its state's items are set, and fills in later
    state = meta['state'] if isinstance(meta.get('state'), dict) else {}
    src = meta.get('module_src') or ''
    return dict(class_name=meta.get('class_name'), init_kwargs=state.get('_init_kwargs', {}),
                state=state, module_src_sha1=hashlib.sha1(str(src).encode()).hexdigest())


INERT_HOOK = '<forced weight normalisation hook>'


def _inert_hook(record, name):
    """builtins.getattr as the official SiD EDM2 generators use it (sida branch,
    networks_edm2_modified.py): MPConv's forward pre-hook, pickled as the bound method
    getattr(mpconv, '_apply_forced_weight_normalization'). Never a real getattr: the hook becomes
    the inert marker INERT_HOOK, which the state-dict reader ignores."""
    hook = (isinstance(record, dict) and record.get('class_name') == 'MPConv'
            and name == '_apply_forced_weight_normalization')
    if not hook:
        raise Refused('refusing to load global builtins.getattr (allowed only as the inert '
                      "stand-in of an EDM2 MPConv's pickled weight-normalisation hook)")
    return INERT_HOOK


EDM_GLOBALS = {
    **_NUMPY_GLOBALS,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _legacy_storage,
    ('collections', 'OrderedDict'): ordered_dict,
    ('torch.nn.modules.container', 'ModuleDict'): _InertModule,
    ('torch.nn.modules.container', 'ModuleList'): _InertModule,
    ('torch.nn.modules.container', 'Sequential'): _InertModule,
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _inert_persistent_obj,
    ('dnnlib.util', 'EasyDict'): _EasyDict,
    ('builtins', 'set'): _safe_set,  # sets in protocol < 4 pickles
    ('builtins', 'getattr'): _inert_hook,  # the official SiD EDM2 generators' hooks
}
