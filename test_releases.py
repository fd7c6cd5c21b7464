"""Tests of releases: every released generator against the authors' tables as published (the SiDA
README's links, the SiD README's FIDs), the label mistakes resolved to what the files are, the
presets and references each name implies."""
import re

import pytest

import edm_nets
import fid
import releases

SID = 'https://huggingface.co/UT-Austin-PML/SiD/resolve/main/'
SIDA = 'https://huggingface.co/UT-Austin-PML/SiDA/resolve/main/EDM_distillation/'
EDM2 = 'https://huggingface.co/UT-Austin-PML/SiDA/resolve/main/EDM2_distillation/'

# The SiDA README's table of EDM generators, transcribed as published: (dataset, method, alpha as
# the README says, link), and the name that link has here.
README_EDM = [
    ('cifar10-uncond', 'SiD', 1.2,
     SID + 'cifar10-uncond/alpha1.2/network-snapshot-1.200000-403968.pkl',
     'sid-cifar10-uncond-a1.2'),
    ('cifar10-uncond', 'SiDA', 1.0, SIDA + 'cifar10_uncond_sida_alpha1-217920.pkl',
     'sida-cifar10-uncond-a1'),
    ('cifar10-uncond', 'SiD2A', 1.0, SIDA + 'cifar10_uncond_sid2a_alpha1-028160.pkl',
     'sid2a-cifar10-uncond-a1'),
    ('cifar10-uncond', 'SiD2A', 1.2, SIDA + 'cifar10_uncond_sid2a_alpha1.2-022528.pkl',
     'sid2a-cifar10-uncond-a1.2'),
    ('cifar10-cond', 'SiD', 1.2,
     SID + 'cifar10-cond/alpha1.2/network-snapshot-1.200000-713312.pkl', 'sid-cifar10-cond-a1.2'),
    ('cifar10-cond', 'SiDA', 1.0, SIDA + 'cifar10_cond_sida_alpha1-293184.pkl',
     'sida-cifar10-cond-a1'),
    ('cifar10-cond', 'SiD2A', 1.0, SIDA + 'cifar10_cond_sid2a_alpha1-038912.pkl',
     'sid2a-cifar10-cond-a1'),
    ('cifar10-cond', 'SiD2A', 1.2, SIDA + 'cifar10_cond_sid2a_alpha1.2-053760.pkl',
     'sid2a-cifar10-cond-a1.2'),
    ('imagenet64', 'SiD', 1.2, SID + 'imagenet64/alpha1.2/network-snapshot-1.200000-939176.pkl',
     'sid-imagenet64-a1.2'),
    ('imagenet64', 'SiDA', 1.0, SIDA + 'imgnet64_sida_alpha1-249167.pkl', 'sida-imagenet64-a1'),
    ('imagenet64', 'SiD2A', 1.0, SIDA + 'imgnet64_sid2a_alpha1-029499.pkl', 'sid2a-imagenet64-a1'),
    ('imagenet64', 'SiD2A', 1.2, SIDA + 'imgnet64_sid2a_alpha1.2-021471.pkl',
     'sid2a-imagenet64-a1.2'),
    ('ffhq64', 'SiD', 1.2, SID + 'ffhq64/alpha1.2/network-snapshot-1.200000-498176.pkl',
     'sid-ffhq64-a1.2'),
    ('ffhq64', 'SiDA', 1.0, SIDA + 'ffhq64_sida_alpha1-185856.pkl', 'sida-ffhq64-a1'),
    ('ffhq64', 'SiD2A', 1.0, SIDA + 'ffhq64_sid2a_alpha1-168960.pkl', 'sid2a-ffhq64-a1'),
    ('ffhq64', 'SiD2A', 1.2, SIDA + 'ffhq64_sid2a_alpha1.2-080896.pkl', 'sid2a-ffhq64-a1.2'),
    # "1.2", but the link is the alpha-1 file: named for what it is
    ('afhqv2-64', 'SiD', 1.2, SID + 'afhq64/alpha1/network-snapshot-1.000000-371712.pkl',
     'sid-afhqv2-64-a1'),
    ('afhqv2-64', 'SiDA', 1.0, SIDA + 'afhq64-v2_sida_alpha1-127488.pkl', 'sida-afhqv2-64-a1'),
    ('afhqv2-64', 'SiD2A', 1.0, SIDA + 'afhq64-v2_sid2a_alpha1-175104.pkl', 'sid2a-afhqv2-64-a1'),
    # a link to a file the HF folder does not hold: the name takes the alpha-1.2 file it holds
    ('afhqv2-64', 'SiD2A', 1.2, SIDA + 'afhq64-v2_sid2a_alpha1.2-175104.pkl',
     'sid2a-afhqv2-64-a1.2'),
]
HF_ONLY = {  # in the SiD repository's files, not in the README's table
    'sid-cifar10-uncond-a1': 'cifar10-uncond/alpha1/network-snapshot-1.000000-416768.pkl',
    'sid-cifar10-cond-a1': 'cifar10-cond/alpha1/network-snapshot-1.000000-415744.pkl',
    'sid-imagenet64-a1': 'imagenet64/alpha1/network-snapshot-1.000000-492836.pkl',
    'sid-ffhq64-a1': 'ffhq64/alpha1/network-snapshot-1.000000-453120.pkl',
    'sid-afhqv2-64-a1.2': 'afhq64/alpha1.2/network-snapshot-1.200000-305664.pkl',
}
README_EDM2 = {  # size: the README's SiD, SiDA, SiD2A files
    'xs': ('sid_alpha1-249360', 'sida_alpha1-166410', 'sid2a_alpha1-028674'),
    's': ('sid_alpha1-192010', 'sida_alpha1-117764', 'sid2a_alpha1-075268'),
    'm': ('sid_alpha1-226830', 'sida_alpha1-115716', 'sid2a_alpha1-044036'),
    'l': ('sid_alpha1-203788', 'sida_alpha1-166918', 'sid2a_alpha1-050182'),
    'xl': ('sid_alpha1-234004', 'sid2a_alpha1-024578', 'sid2a_alpha1-079495'),
    'xxl': ('sida_alpha1-077932', 'sida_alpha1-089816', 'sid2a_alpha1-029812'),
}
SID_FIDS = {'sid-cifar10-uncond-a1.2': 1.923, 'sid-cifar10-cond-a1.2': 1.710,
            'sid-imagenet64-a1.2': 1.524, 'sid-ffhq64-a1.2': 1.550, 'sid-afhqv2-64-a1': 1.628}


def alpha_of_file(file):
    """SiD's alpha as a file name gives it: network-snapshot-<alpha:.6f>-... or ..._alpha<a>-..."""
    found = re.search(r'network-snapshot-(\d\.\d+)-|_alpha([\d.]+)-', file)
    return float(found.group(1) or found.group(2))


def test_every_readme_link_has_a_name_and_the_mistakes_are_named_for_the_files():
    expected = {name: url for *_, url, name in README_EDM}
    expected['sid2a-afhqv2-64-a1.2'] = SIDA + 'afhq64-v2_sid2a_alpha1.2-055808.pkl'
    expected.update({name: SID + path for name, path in HF_ONLY.items()})
    for size, files in README_EDM2.items():
        for method, file in zip(('sid', 'sida', 'sid2a'), files):
            expected[f'{method}-img512-{size}-a1'] = EDM2 + f'edm2_img512_{size}_{file}.pkl'
    assert {n: r.url for n, r in releases.RELEASES.items()} == expected
    for dataset, method, readme_alpha, url, name in README_EDM:
        r = releases.resolve(name)
        assert (r.dataset, r.method, r.listed) == (dataset, method, 'README')
        assert r.alpha == alpha_of_file(r.file) and r.file == r.url.rsplit('/', 1)[1]
        assert (r.alpha != readme_alpha or r.url != url) == ('README row differs' in r.note)
    for name in HF_ONLY:
        r = releases.resolve(name)
        assert r.listed == 'HF' and r.method == 'SiD' and r.alpha == alpha_of_file(r.file)


def test_methods_presets_references_and_fids():
    for name, r in releases.RELEASES.items():
        assert name == f'{r.method.lower()}-{r.dataset}-a{r.alpha:g}'
        assert r.kimg == int(r.file.rsplit('-', 1)[1][:-4]) and r.sha256 is None
        said = re.search(r'_(sid|sida|sid2a)_alpha', r.file)
        if said and said.group(1) != r.method.lower():  # EDM2 XL SiDA, XXL SiD
            assert f'file name says {said.group(1)}' in r.note, name
        kwargs = edm_nets.PRESETS[r.preset]['kwargs']
        assert (kwargs['label_dim'] > 0) == ('class-conditional' in releases.DATASETS[r.dataset][0])
        if r.network == 'edm':
            assert r.ref in fid.REF_PRESETS and r.preset.startswith(r.ref)
        else:  # EDM2: the size's teacher (1000 classes, 64x64x4 latents), EDM2's reference
            size = r.dataset.split('-')[1]
            want = (f'edm2-img512-{size}', 'img512', 64)
            assert (r.preset, r.ref, kwargs['img_resolution']) == want
        assert r.fid == SID_FIDS.get(name), name
    assert sum(r.network == 'edm' for r in releases.RELEASES.values()) == 25
    best = dict(zip(releases.DATASETS, (1.499, 1.396, 1.110, 1.040, 1.276,  # the SiDA README
                                        2.156, 1.669, 1.488, 1.413, 1.379, 1.366)))
    assert {r.dataset: r.best_fid for r in releases.RELEASES.values()} == best
    table = releases.table()
    assert all(any(line.startswith(n + ' ') for line in table) for n in releases.RELEASES)
    with pytest.raises(ValueError, match='e.g. sid2a-ffhq64-a1, sid2a-ffhq64-a1.2'):
        releases.resolve('sid2a-ffhq64-a1.1')
