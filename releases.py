# The released one-step generators of SiD, SiDA and SiD²A by name: URL, what each file is, the FIDs.
#
# Sources: the SiD README (github.com/mingyuanzhou/SiD, main branch) for the SiD FIDs, the README of
# its `sida` branch for the SiDA/SiD²A links and FIDs (Zhou et al. 2024, arXiv 2404.04057; Zhou et
# al. 2025, arXiv 2410.14919), and the file lists of the Hugging Face repositories UT-Austin-PML/SiD
# and UT-Austin-PML/SiDA. A name says what the file IS (method, dataset, alpha read from the file
# name), which is not always what the README's table says: each such case is in the entry's note.
#
# The authors give one FID per dataset (SiD) or the best per dataset (SiDA/SiD²A), never per file:
# `fid` holds the SiD number where the SiD README's dataset has exactly one released SiD file of the
# run it describes, and None where no file can be matched to a number (see `best_fid`).
# SHA-256 digests are not known to this project yet (the files were never downloaded here): `sha256`
# is None everywhere, and fileio.download checks it once it is filled in.

import dataclasses
import re

SID_HF = 'https://huggingface.co/UT-Austin-PML/SiD/resolve/main/'
SIDA_HF = 'https://huggingface.co/UT-Austin-PML/SiDA/resolve/main/EDM_distillation/'
EDM2_HF = 'https://huggingface.co/UT-Austin-PML/SiDA/resolve/main/EDM2_distillation/'
SIGMA_INIT = 2.5  # every released generator: G(sigma_init * eps; sigma_init), official default

#----------------------------------------------------------------------------
# The datasets: (what it is, the teacher preset of edm_nets.PRESETS, the reference statistics of
# fid.REF_PRESETS). EDM2's ImageNet 512 generators work in the SD VAE's latents (Karras et al.
# 2024): EDM2's networks, their images decoded by the VAE and scored against EDM2's img512
# reference.

DATASETS = {
    'cifar10-uncond': ('CIFAR-10 32x32, unconditional', 'cifar10-32x32-uncond-vp',
                       'cifar10-32x32'),
    'cifar10-cond': ('CIFAR-10 32x32, class-conditional', 'cifar10-32x32-cond-vp',
                     'cifar10-32x32'),
    'imagenet64': ('ImageNet 64x64, class-conditional', 'imagenet-64x64-cond-adm',
                   'imagenet-64x64'),
    'ffhq64': ('FFHQ 64x64, unconditional', 'ffhq-64x64-uncond-vp', 'ffhq-64x64'),
    'afhqv2-64': ('AFHQv2 64x64, unconditional', 'afhqv2-64x64-uncond-vp', 'afhqv2-64x64'),
    **{f'img512-{size}': (f'ImageNet 512x512, EDM2-{size.upper()} teacher, class-conditional',
                          f'edm2-img512-{size}', 'img512')
       for size in ('xs', 's', 'm', 'l', 'xl', 'xxl')},
}

# The SiDA README's FIDs: the best of SiDA / SiD²A (alpha 1 or 1.2) per dataset, and one per EDM2
# size ("SiDA achieves"); the authors do not say which released file reaches each.
BEST_FID = {'cifar10-uncond': 1.499, 'cifar10-cond': 1.396, 'imagenet64': 1.110, 'ffhq64': 1.040,
            'afhqv2-64': 1.276, 'img512-xs': 2.156, 'img512-s': 1.669, 'img512-m': 1.488,
            'img512-l': 1.413, 'img512-xl': 1.379, 'img512-xxl': 1.366}

#----------------------------------------------------------------------------
# One released file.

@dataclasses.dataclass(frozen=True)
class Release:
    name: str  # <method>-<dataset>-a<alpha>
    method: str  # 'SiD', 'SiDA' or 'SiD2A' (SiDA started from a SiD generator)
    dataset: str  # a key of DATASETS
    alpha: float  # SiD's alpha as the file name gives it
    url: str
    listed: str  # 'README' (the authors' table) or 'HF' (in the repository's files only)
    fid: float = None  # the authors' FID, where it belongs to this file
    note: str = ''
    sha256: str = None  # unknown yet: nothing can be downloaded where this table was written

    @property
    def file(self):
        return self.url.rsplit('/', 1)[1]

    @property
    def kimg(self):  # the snapshot's training progress, the number at the end of the file name
        return int(re.search(r'-(\d+)\.pkl$', self.url).group(1))

    @property
    def network(self):  # its network: 'edm' (EDMPrecond) or 'edm2' (EDM2Precond, SD-VAE latents)
        return 'edm2' if self.dataset.startswith('img512') else 'edm'

    @property
    def preset(self):  # the teacher preset of edm_nets.PRESETS it was distilled from
        return DATASETS[self.dataset][1]

    @property
    def ref(self):  # the reference statistics its FID is computed against
        return DATASETS[self.dataset][2]

    @property
    def best_fid(self):  # the authors' best FID on its dataset (SiDA/SiD²A), whichever file
        return BEST_FID.get(self.dataset)

#----------------------------------------------------------------------------
# The table.

_SID_README = 'the SiD README (per dataset, the run of main:run_sid.sh)'
_AFHQ_SID_A1 = ('README row differs: the SiDA README lists it as alpha 1.2, but links this '
                'alpha-1 file; main:run_sid.sh trains AFHQv2 at alpha 1.0')
_AFHQ_SIDA = ('run_sida.sh passes the FFHQ dataset as --data (the real images) for AFHQv2; '
              'whether this file was trained so is unknown')


def _sid(dataset, alpha, path, listed='README', fid=None, note=''):
    return Release(f'sid-{dataset}-a{alpha:g}', 'SiD', dataset, alpha, SID_HF + path, listed,
                   fid, note)


def _sida(method, dataset, alpha, file, note=''):
    return Release(f'{method.lower()}-{dataset}-a{alpha:g}', method, dataset, alpha,
                   SIDA_HF + file, 'README', None, note)


def _edm2(method, size, file, note=''):
    return Release(f'{method.lower()}-img512-{size}-a1', method, f'img512-{size}', 1.0,
                   EDM2_HF + file, 'README', None, note)


_EDM = [
    _sid('cifar10-uncond', 1.2, 'cifar10-uncond/alpha1.2/network-snapshot-1.200000-403968.pkl',
         fid=1.923, note=f'FID from {_SID_README}'),
    _sid('cifar10-cond', 1.2, 'cifar10-cond/alpha1.2/network-snapshot-1.200000-713312.pkl',
         fid=1.710, note=f'FID from {_SID_README}'),
    _sid('imagenet64', 1.2, 'imagenet64/alpha1.2/network-snapshot-1.200000-939176.pkl',
         fid=1.524, note=f'FID from {_SID_README}'),
    _sid('ffhq64', 1.2, 'ffhq64/alpha1.2/network-snapshot-1.200000-498176.pkl',
         fid=1.550, note=f'FID from {_SID_README}'),
    _sid('afhqv2-64', 1.0, 'afhq64/alpha1/network-snapshot-1.000000-371712.pkl', fid=1.628,
         note=f'FID from {_SID_README}; {_AFHQ_SID_A1}'),
    _sid('cifar10-uncond', 1.0, 'cifar10-uncond/alpha1/network-snapshot-1.000000-416768.pkl',
         'HF'),
    _sid('cifar10-cond', 1.0, 'cifar10-cond/alpha1/network-snapshot-1.000000-415744.pkl', 'HF'),
    _sid('imagenet64', 1.0, 'imagenet64/alpha1/network-snapshot-1.000000-492836.pkl', 'HF'),
    _sid('ffhq64', 1.0, 'ffhq64/alpha1/network-snapshot-1.000000-453120.pkl', 'HF'),
    _sid('afhqv2-64', 1.2, 'afhq64/alpha1.2/network-snapshot-1.200000-305664.pkl', 'HF',
         note='the real alpha-1.2 AFHQv2 SiD file, which the README does not link'),
    _sida('SiDA', 'cifar10-uncond', 1.0, 'cifar10_uncond_sida_alpha1-217920.pkl'),
    _sida('SiD2A', 'cifar10-uncond', 1.0, 'cifar10_uncond_sid2a_alpha1-028160.pkl'),
    _sida('SiD2A', 'cifar10-uncond', 1.2, 'cifar10_uncond_sid2a_alpha1.2-022528.pkl'),
    _sida('SiDA', 'cifar10-cond', 1.0, 'cifar10_cond_sida_alpha1-293184.pkl'),
    _sida('SiD2A', 'cifar10-cond', 1.0, 'cifar10_cond_sid2a_alpha1-038912.pkl'),
    _sida('SiD2A', 'cifar10-cond', 1.2, 'cifar10_cond_sid2a_alpha1.2-053760.pkl'),
    _sida('SiDA', 'imagenet64', 1.0, 'imgnet64_sida_alpha1-249167.pkl',
          note='the HF folder also holds an earlier imgnet64_sida_alpha1-185856.pkl'),
    _sida('SiD2A', 'imagenet64', 1.0, 'imgnet64_sid2a_alpha1-029499.pkl'),
    _sida('SiD2A', 'imagenet64', 1.2, 'imgnet64_sid2a_alpha1.2-021471.pkl'),
    _sida('SiDA', 'ffhq64', 1.0, 'ffhq64_sida_alpha1-185856.pkl'),
    _sida('SiD2A', 'ffhq64', 1.0, 'ffhq64_sid2a_alpha1-168960.pkl'),
    _sida('SiD2A', 'ffhq64', 1.2, 'ffhq64_sid2a_alpha1.2-080896.pkl'),
    _sida('SiDA', 'afhqv2-64', 1.0, 'afhq64-v2_sida_alpha1-127488.pkl', _AFHQ_SIDA),
    _sida('SiD2A', 'afhqv2-64', 1.0, 'afhq64-v2_sid2a_alpha1-175104.pkl', _AFHQ_SIDA),
    _sida('SiD2A', 'afhqv2-64', 1.2, 'afhq64-v2_sid2a_alpha1.2-055808.pkl',
          f'README row differs: it links afhq64-v2_sid2a_alpha1.2-175104.pkl (the alpha-1 '
          f'file\'s number), which the HF folder does not hold; this is the alpha-1.2 file it '
          f'holds; {_AFHQ_SIDA}'),
]

_XL_SIDA = ('the README lists it as SiDA, its file name says sid2a (the official metric script '
            'evaluates it as xl-sida); which is right is unknown')
_XXL_SID = ('the README lists it as SiD, its file name says sida; run_sid_sida_edm2.sh starts '
            'SiD2A-XXL from it, as from a SiD generator; which is right is unknown')
_EDM2 = [
    _edm2('SiD', 'xs', 'edm2_img512_xs_sid_alpha1-249360.pkl'),
    _edm2('SiDA', 'xs', 'edm2_img512_xs_sida_alpha1-166410.pkl'),
    _edm2('SiD2A', 'xs', 'edm2_img512_xs_sid2a_alpha1-028674.pkl'),
    _edm2('SiD', 's', 'edm2_img512_s_sid_alpha1-192010.pkl'),
    _edm2('SiDA', 's', 'edm2_img512_s_sida_alpha1-117764.pkl'),
    _edm2('SiD2A', 's', 'edm2_img512_s_sid2a_alpha1-075268.pkl'),
    _edm2('SiD', 'm', 'edm2_img512_m_sid_alpha1-226830.pkl'),
    _edm2('SiDA', 'm', 'edm2_img512_m_sida_alpha1-115716.pkl'),
    _edm2('SiD2A', 'm', 'edm2_img512_m_sid2a_alpha1-044036.pkl'),
    _edm2('SiD', 'l', 'edm2_img512_l_sid_alpha1-203788.pkl'),
    _edm2('SiDA', 'l', 'edm2_img512_l_sida_alpha1-166918.pkl'),
    _edm2('SiD2A', 'l', 'edm2_img512_l_sid2a_alpha1-050182.pkl'),
    _edm2('SiD', 'xl', 'edm2_img512_xl_sid_alpha1-234004.pkl'),
    _edm2('SiDA', 'xl', 'edm2_img512_xl_sid2a_alpha1-024578.pkl', _XL_SIDA),
    _edm2('SiD2A', 'xl', 'edm2_img512_xl_sid2a_alpha1-079495.pkl'),
    _edm2('SiD', 'xxl', 'edm2_img512_xxl_sida_alpha1-077932.pkl', _XXL_SID),
    _edm2('SiDA', 'xxl', 'edm2_img512_xxl_sida_alpha1-089816.pkl'),
    _edm2('SiD2A', 'xxl', 'edm2_img512_xxl_sid2a_alpha1-029812.pkl'),
]

RELEASES = {r.name: r for r in _EDM + _EDM2}


def resolve(name):
    """The Release of a name, or a one-line ValueError naming released generators like it."""
    if name not in RELEASES:
        stem = name.rsplit('-a', 1)[0]
        near = [n for n in RELEASES if n.startswith(stem)] or list(RELEASES)[:5]
        raise ValueError(f'unknown released generator "{name}" (e.g. {", ".join(near[:6])}; '
                         f'python sid.py --list shows all)')
    return RELEASES[name]


def table():
    """Lines of a plain-text table of every released generator."""
    lines = [f'{"name":<26} {"method":<6} {"alpha":>5} {"kimg":>7} {"FID*":>6}  dataset']
    for r in RELEASES.values():
        fid = f'{r.fid:.3f}' if r.fid else '-'
        lines.append(f'{r.name:<26} {r.method:<6} {r.alpha:>5g} {r.kimg:>7} {fid:>6}  '
                     f'{DATASETS[r.dataset][0]}')
    lines += ["* the authors' FID (SiD README) where it belongs to one file.",
              '  The best of SiDA/SiD2A per dataset (SiDA README; no file named):']
    best = [f'{k} {v:.3f}' for k, v in BEST_FID.items()]
    lines += ['  ' + ', '.join(best[i:i + 6]) for i in range(0, len(best), 6)]
    return lines
