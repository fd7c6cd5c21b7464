# Checkpoints of sid: network-kwargs checks, the EDM/EDM2/SiD .pkl and torch.save readers, names.
#
# Reads the official checkpoints of EDM (Karras et al. 2022, github.com/NVlabs/edm: the `ema`
# network of its training snapshots, pickled by torch_utils.persistence), of EDM2 (Karras et al.
# 2024, github.com/NVlabs/edm2: the post-hoc EMA reconstructions, same format, float16) and of SiD
# (Zhou et al. 2024, same format; its EDM2 generators too), and sid's own torch.save snapshots,
# into an EDMPrecond or EDM2Precond with strict state-dict loading.
# Nothing from a file is executed: pickles go through unpickle.bounded_unpickle, and every shape
# and size is checked before the network is built for real. Names: the EDM teachers of
# edm_nets.PRESETS and the released SiD/SiDA/SiD²A generators of releases.RELEASES.

import io
import json
import math
import os
import re
import zipfile

import numpy as np
import torch

import latents
import releases
from edm_nets import PRESETS, build_net
from fileio import MAX_RESOLUTION, check_zip, download, open_regular
from unpickle import (EDM_GLOBALS, STORAGE_GLOBALS, Refused, StorageType, bounded_unpickle,
                      check_view, ordered_dict)

#----------------------------------------------------------------------------
# Network kwargs: checked per model_type (types and ranges) before anything is built; then the net
# is built on the meta device to compare every shape with the stored tensors and to count its
# parameters.

MAX_PARAMS = 2e9
MAX_FILE_BYTES = 1 << 36  # a checkpoint or training state (ImageNet's SiD state is ~8 GB)


def _int_in(lo, hi):  # a plain int (not a bool) in [lo, hi]
    return lambda v: type(v) is int and lo <= v <= hi


def _num_in(lo, hi):  # a plain int or float in [lo, hi]
    return lambda v: type(v) in (int, float) and lo <= v <= hi


def _ints_in(lo, hi, n):  # a list or tuple of at most n ints in [lo, hi]
    each = _int_in(lo, hi)
    return lambda v: isinstance(v, (list, tuple)) and len(v) <= n and all(each(x) for x in v)


def _one_of(*choices):
    return lambda v: isinstance(v, str) and v in choices


def _or_none(check):  # None or what `check` accepts
    return lambda v: v is None or check(v)


_UNET_KWARGS = dict(augment_dim=_int_in(0, 64), model_channels=_int_in(1, 4096),
                    channel_mult=_ints_in(1, 64, 8), channel_mult_emb=_int_in(1, 64),
                    num_blocks=_int_in(1, 64), attn_resolutions=_ints_in(1, 4096, 16),
                    dropout=_num_in(0, 1), label_dropout=_num_in(0, 1))
NET_KWARGS = {  # None: EDMPrecond's own arguments; then one table per model_type (extend here)
    None: dict(img_resolution=_int_in(0, MAX_RESOLUTION), img_channels=_int_in(1, 16),
               label_dim=_int_in(0, 100000), use_fp16=lambda v: type(v) is bool,
               sigma_min=_num_in(0, math.inf), sigma_max=_num_in(0, math.inf),
               sigma_data=_num_in(1e-9, 1e9),
               model_type=lambda v: v in NET_KWARGS and v is not None),
    'SongUNet': dict(_UNET_KWARGS, embedding_type=_one_of('positional', 'fourier'),
                     channel_mult_noise=_int_in(1, 64),
                     encoder_type=_one_of('standard', 'skip', 'residual'),
                     decoder_type=_one_of('standard', 'skip'),
                     resample_filter=_ints_in(1, 1 << 16, 8)),
    'DhariwalUNet': dict(_UNET_KWARGS),
    'ToyMLP': dict(hidden=_int_in(1, 1 << 16), depth=_int_in(1, 64), dropout=_num_in(0, 1)),
    'EDM2UNet': dict(  # EDM2Precond's own, then its U-Net's, then its blocks' arguments
        logvar_channels=_int_in(0, 4096), model_channels=_int_in(1, 4096),
        channel_mult=_ints_in(1, 64, 8), channel_mult_noise=_or_none(_int_in(1, 64)),
        channel_mult_emb=_or_none(_int_in(1, 64)), num_blocks=_int_in(1, 64),
        attn_resolutions=_ints_in(1, 4096, 16), label_balance=_num_in(0, 1),
        concat_balance=_num_in(0, 1), resample_filter=lambda v: v == [1, 1],
        channels_per_head=_int_in(1, 4096), dropout=_num_in(0, 1), res_balance=_num_in(0, 1),
        attn_balance=_num_in(0, 1), clip_act=_or_none(_num_in(0, math.inf)),
        force_normalization=lambda v: type(v) is bool),
}


def check_net_kwargs(kwargs, source):
    """EDMPrecond kwargs from a file -> a plain dict, or one ValueError line naming the offending
    key."""
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f'{source}: network kwargs are not a dict of names')
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    table = dict(NET_KWARGS[None], **NET_KWARGS.get(kwargs.get('model_type', 'DhariwalUNet'), {}))
    for k, v in kwargs.items():
        if k not in table or not table[k](v):
            raise ValueError(f'{source}: network kwarg {k}={str(v)[:60]} '
                             f'is unknown or out of range')
    levels = len(kwargs.get('channel_mult', [1, 2, 2, 2]))  # both U-Nets' default has 4
    res = kwargs.get('img_resolution', 0)
    if kwargs.get('model_type', 'DhariwalUNet') != 'ToyMLP' and res % (1 << (levels - 1)):
        raise ValueError(f'{source}: img_resolution={res} cannot be halved {levels - 1} times '
                         f'(channel_mult has {levels} levels)')
    return kwargs


def parse_net_overrides(text, preset=None):
    """A JSON object of network kwargs (sid's --net-overrides), checked on top of the preset's
    network kwargs."""
    try:
        over = json.loads(text or '{}')
    except json.JSONDecodeError:
        over = None
    if not isinstance(over, dict):
        raise ValueError('--net-overrides must be a JSON object of network arguments, '
                         'e.g. \'{"model_channels": 16}\'')
    full = dict(PRESETS[preset]['kwargs'], **over) if preset in PRESETS else over
    check_net_kwargs(full, '--net-overrides')
    return over


def meta_net(kwargs, source):
    """(checked kwargs, the network they describe on the meta device: nothing allocated), its
    parameters within MAX_PARAMS; one ValueError line naming `source` otherwise."""
    kwargs = check_net_kwargs(kwargs, source)
    try:
        with torch.device('meta'):
            meta = build_net(**kwargs)
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as e:
        raise ValueError(f'{source}: cannot build the network from its kwargs '
                         f'({str(e).splitlines()[0]})') from None
    count = sum(p.numel() for p in meta.parameters())
    if count > MAX_PARAMS:
        raise ValueError(f'{source}: a network of {count:.3g} parameters (limit '
                         f'{MAX_PARAMS:.3g})')
    return kwargs, meta


def _build_checked(kwargs, state_dict, source):
    """An eval-mode frozen EDMPrecond or EDM2Precond (by model_type) with `state_dict`, built for
    real only after the meta-device check."""
    tensors = isinstance(state_dict, dict) and all(isinstance(v, torch.Tensor)
                                                   for v in state_dict.values())
    if not tensors:
        raise ValueError(f'{source}: the weights are not a dict of tensors')
    kwargs, meta = meta_net(kwargs, source)
    ours = meta.state_dict()
    missing, unexpected = sorted(set(ours) - set(state_dict)), sorted(set(state_dict) - set(ours))
    if missing or unexpected:
        raise ValueError(f'{source}: weights do not match the network built from its kwargs: '
                         f'missing keys {missing[:5]}, unexpected keys {unexpected[:5]}')
    for k, t in ours.items():
        if state_dict[k].shape != t.shape:
            raise ValueError(f'{source}: {k} has shape {list(state_dict[k].shape)}, '
                             f'the network needs {list(t.shape)}')
    net = build_net(**kwargs)
    net.load_state_dict(state_dict, strict=True)
    return net.eval().requires_grad_(False)

#----------------------------------------------------------------------------
# sid's own snapshots: torch.save zips, scanned within bounds before torch.load(weights_only=True).

def scan_torch_zip(f, path):
    """Bounded pre-scan of the torch.save zip open as f: member sizes and CRCs (fileio.check_zip;
    torch.load checks neither), then data.pkl through the bounded unpickler with every storage
    checked against its member and every tensor view against its storage."""
    with check_zip(f, path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        pkl = [n for n in infos if n.endswith('/data.pkl') and n.count('/') == 1]
        if len(pkl) != 1:
            raise ValueError(f'{path}: not a torch.save archive (no single */data.pkl)')
        prefix = pkl[0][:-len('data.pkl')]

        def persistent(pid):
            ok = (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
                  and isinstance(pid[1], StorageType) and isinstance(pid[2], str)
                  and type(pid[4]) is int and f'{prefix}data/{pid[2]}' in infos)
            if not ok or infos[f'{prefix}data/{pid[2]}'].file_size != pid[4] * pid[1].itemsize:
                raise Refused(f'refusing a storage record that does not match its data member: '
                              f'{str(pid)[:80]}')
            return pid[4]

        def tensor(numel, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
            check_view(numel, offset, size, stride)
            return ()

        allow = {**STORAGE_GLOBALS, ('collections', 'OrderedDict'): ordered_dict,
                 ('torch._utils', '_rebuild_tensor_v2'): tensor}
        with zf.open(pkl[0]) as member:
            bounded_unpickle(io.BytesIO(member.read()), allow, path, persistent)
    f.seek(0)


def _load_torch_file(path):
    with open_regular(path, MAX_FILE_BYTES) as f:
        scan_torch_zip(f, path)
        try:
            data = torch.load(f, map_location='cpu', weights_only=True)
        except Exception as e:  # torch raises many types for a bad archive
            raise ValueError(f'{path}: cannot read checkpoint safely '
                             f'({str(e).splitlines()[0]})') from None
    key = next((k for k in ('G_ema', 'ema') if isinstance(data, dict) and k in data), None)
    if key is None or 'net_kwargs' not in data:
        found = list(data)[:10] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f'{path}: expected keys "ema" or "G_ema" and "net_kwargs", found {found}')
    config = data.get('config')
    info = dict(path=str(path), config=config if isinstance(config, dict) else {},
                kimg=data.get('kimg'))
    return _build_checked(data['net_kwargs'], data[key], path), info

#----------------------------------------------------------------------------
# EDM/SiD .pkl: the inert record of the `ema` network, flattened to a state dict (EDM's module tree,
# torch_utils.persistence format version 6).

def _flatten_state(rec, prefix='', out=None):
    """module.state_dict() equivalent of a pickled module tree (records / inert modules)."""
    out = {} if out is None else out
    state = rec['state'] if isinstance(rec, dict) else getattr(rec, 'state', {})
    skip = set(state.get('_non_persistent_buffers_set', ()))
    for group in ('_parameters', '_buffers'):
        for name, t in (state.get(group) or {}).items():
            if t is not None and not (group == '_buffers' and name in skip):
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f'checkpoint entry {prefix}{name} is not a tensor')
                out[f'{prefix}{name}'] = t.detach()
    for name, child in (state.get('_modules') or {}).items():
        if child is not None:
            _flatten_state(child, f'{prefix}{name}.', out)
    return out


def _load_edm_file(path):
    with open_regular(path, MAX_FILE_BYTES) as f:
        data = bounded_unpickle(f, EDM_GLOBALS, path)
    if not isinstance(data, dict) or 'ema' not in data:
        found = list(data)[:10] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f'{path}: no "ema" network in the checkpoint (found {found})')
    rec = data['ema']
    if not isinstance(rec, dict) or 'state' not in rec:
        raise ValueError(f'{path}: "ema" is not a persistent network record')
    state = rec['state']
    if state.get('_init_args'):
        raise ValueError(f'{path}: positional constructor arguments are not supported')
    class_name = str(rec['class_name']).rsplit('.', 1)[-1]
    kwargs, weights, encoder = state.get('_init_kwargs', {}), _flatten_state(rec), None
    if class_name in EDM2_CLASSES:
        kwargs = _edm2_kwargs(kwargs, class_name, path)
        weights = {k: v.float() for k, v in weights.items()}  # EDM2 pickles hold float16
        encoder = _latent_encoder(data.get('encoder'), path)
    elif class_name != 'EDMPrecond':
        raise ValueError(f'{path}: unsupported network class "{rec["class_name"]}" '
                         f'(EDMPrecond or EDM2\'s {", ".join(EDM2_CLASSES)})')
    net = _build_checked(kwargs, weights, path)
    for attr in ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_min',
                 'sigma_max', 'sigma_data'):
        if attr in state and state[attr] != getattr(net, attr, None):
            raise ValueError(f'{path}: {attr}={state[attr]} in the pickle but '
                             f'{getattr(net, attr, None)} after rebuilding')
    return net, dict(path=str(path), config={}, kimg=None, class_name=rec['class_name'],
                     module_src_sha1=rec['module_src_sha1'], encoder=encoder)

#----------------------------------------------------------------------------
# EDM2 .pkl: NVIDIA's teachers (`ema`: Precond, float16, with the logvar head; `encoder`: the latent
# encoder's statistics) and the official SiD/SiDA/SiD²A generators (`ema` only:
# EDM_2_Precond_Generator, float32, no logvar head; sida branch, sida_networks_edm2.py).

EDM2_CLASSES = ('Precond', 'EDM_2_Precond_EncoderDecoder', 'EDM_2_Precond_Generator')


def _edm2_kwargs(kwargs, class_name, source):
    """An EDM2 record's constructor kwargs -> EDM2Precond's (checked afterwards as any net's): the
    generators have no logvar head, and the official generators' flags (use_gan,
    force_normalization) mean forced weight normalisation iff not use_gan or force_normalization
    (sida: networks_edm2_modified.py)."""
    if not isinstance(kwargs, dict):
        raise ValueError(f'{source}: network kwargs are not a dict of names')
    kwargs = dict(kwargs, model_type='EDM2UNet')
    if class_name == 'EDM_2_Precond_Generator':
        kwargs['logvar_channels'] = 0
    flags = {k: kwargs.pop(k) for k in ('use_gan', 'force_normalization') if k in kwargs}
    for k, v in flags.items():
        if type(v) not in (bool, int) or v not in (0, 1):
            raise ValueError(f'{source}: network kwarg {k}={str(v)[:60]} is not a flag (0 or 1)')
    if flags:
        kwargs['force_normalization'] = not flags.get('use_gan') or bool(
            flags.get('force_normalization', True))
    return kwargs


def _latent_encoder(rec, source):
    """EDM2's `encoder` record: StabilityVAEEncoder's stored statistics (vae_name, scale, bias),
    which must be latents.py's (we decode with those; other statistics would give wrong pixels), or
    StandardRGBEncoder (pixels). -> dict(class_name, vae_name, scale, bias) or None (no encoder:
    the official generators)."""
    if rec is None:
        return None
    name = str(rec.get('class_name')) if isinstance(rec, dict) and 'state' in rec else ''
    if name.rsplit('.', 1)[-1] == 'StandardRGBEncoder':
        return dict(class_name=name)
    if name.rsplit('.', 1)[-1] != 'StabilityVAEEncoder':
        raise ValueError(f'{source}: "encoder" is not an EDM2 latent encoder record ({name[:60]})')
    state = rec['state']
    stats = [state.get(k) for k in ('scale', 'bias')]
    plain = all(isinstance(a, np.ndarray) and a.shape == (4,) and a.dtype.kind == 'f'
                for a in stats)
    ok = (plain and state.get('vae_name') == latents.VAE_NAME
          and np.allclose(stats[0], latents.SCALE, rtol=1e-6, atol=0)
          and np.allclose(stats[1], latents.BIAS, rtol=1e-6, atol=0))
    if not ok:
        raise ValueError(f'{source}: its latent encoder ({str(state.get("vae_name"))[:60]}, '
                         f'scale/bias) is not EDM2\'s {latents.VAE_NAME} with the statistics '
                         'sid decodes with')
    return dict(class_name=name, vae_name=latents.VAE_NAME, scale=stats[0].tolist(),
                bias=stats[1].tolist())

#----------------------------------------------------------------------------
# The one checkpoint reader.

def _looks_like_release(src):  # a misspelt name gets the names like it, not 'no such file'
    shaped = re.fullmatch(r'(sid|sida|sid2a)-[a-z0-9-]+-a[0-9.]+', src) is not None
    return src in releases.RELEASES or (shaped and not os.path.exists(src))


def load_checkpoint(src):
    """(eval-mode frozen EDMPrecond or EDM2Precond, info) from an EDM/EDM2/SiD .pkl (its `ema`) or
    our torch.save file ({'G_ema' or 'ema': state_dict, 'net_kwargs': dict, 'config': dict,
    'kimg'}); src: a path, URL, PRESETS name (a teacher) or releases.RELEASES name (a released
    generator, downloaded into the cache). info = dict(path, config ({} for .pkl), kimg, release
    (its name or None); for .pkl: class_name, module_src_sha1, encoder: EDM2's latent statistics
    or None). Nothing from the file is executed."""
    src = os.fspath(src)
    release = releases.resolve(src) if _looks_like_release(src) else None
    if release is not None:
        path = download(release.url, sha256=release.sha256)
    else:
        path = download(PRESETS[src]['url'] if src in PRESETS else src)
    net, info = _load_torch_file(path) if zipfile.is_zipfile(path) else _load_edm_file(path)
    return net, dict(info, release=release and release.name)
