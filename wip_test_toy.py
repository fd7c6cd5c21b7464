# Tests of the 2-D toy's quality figures, pictures and default run (toy.py; issue "A newcomer's first hour", item 3).
import contextlib, io, json, math, os, re
import pytest, torch
from PIL import Image
import sid, toy

T = toy.ToyMixture()

def on_ring(n, radius, gen):
    """Points at the given radii (a tensor, or one number) with uniformly random angles."""
    a = torch.rand(n, generator=gen, dtype=torch.float64) * 2 * math.pi
    return torch.stack([radius * a.cos(), radius * a.sin()], 1).float()

#----------------------------------------------------------------------------
# The figures: exact samples score high, rings score ~0 clustering, one mode fails the balance.

def test_ring_chance_matches_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    x = T.sample(20000, gen)
    shuffled = torch.cat([on_ring(1, float(r), gen) for r in x.double().norm(dim=1)[:4000]])  # random angle per radius
    mc = float((torch.cdist(shuffled.double(), T.mu).min(1).values < 2 * T.s).double().mean())
    assert abs(toy.ring_chance(x[:4000], T) - mc) < 0.02  # MC std ~0.008
    assert abs(toy.ring_chance(x, T) - 0.624) < 0.01      # the 62 % chance level of the brief

def test_figures_tell_clusters_from_rings_and_single_modes():
    gen = torch.Generator().manual_seed(1)
    exact = toy.toy_figures(T.sample(4000, gen), T)
    assert abs(exact['within'] - toy.EXACT['within']) < 0.02 and abs(exact['clustering'] - toy.EXACT['clustering']) < 0.02
    assert exact['balance'] > 0.9 and exact['covered'] == 8
    R = float(T.mu[0].norm())
    for ring in (on_ring(4000, R, gen), on_ring(4000, T.sample(4000, gen).double().norm(dim=1), gen)):  # thin, thick
        q = toy.toy_figures(ring, T)
        assert q['within'] > 0.6 and q['covered'] == 8 and abs(q['clustering']) < 0.03  # old figures pass, new one not
    one = toy.toy_figures(T.mu[2].float() + T.s * torch.randn(4000, 2, generator=gen), T)
    assert one['within'] > 0.8 and one['balance'] < 0.01 and one['covered'] == 1
    x = T.sample(8000, gen)
    half = toy.toy_figures(x[torch.cdist(x.double(), T.mu).argmin(1) < 4], T)
    assert abs(half['balance'] - (1 - 0.5 / (1 - 1 / 8))) < 0.03  # 4 of 8 modes: TV 0.5
    assert toy.toy_figures(torch.zeros(10, 2), T)['balance'] == 0 == toy.toy_figures(torch.zeros(10, 2), T)['clustering']

#----------------------------------------------------------------------------
# The pictures: three titled panels (method in the title), one GIF frame per kept frame, the quality plot.

def test_report_writes_pictures(tmp_path, monkeypatch):
    world, gen = toy.Toy2D(), torch.Generator().manual_seed(2)
    for i in range(5):
        world.frames.append((f'{i * 50} kimg', T.sample(2000, gen) * i / 4))
    (tmp_path / 'config.json').write_text(json.dumps(dict(method='sida')))
    titles, draw = [], toy.toy_picture
    monkeypatch.setattr(toy, 'toy_picture', lambda panels, *a, **k: titles.append([p[0] for p in panels]) or draw(panels, *a, **k))
    lines = []
    paths = world.report(str(tmp_path), lines.append)
    assert [os.path.basename(p) for p in paths] == ['toy.png', 'toy.gif', 'toy_quality.png']
    assert titles[0] == ["start: G = teacher's denoiser at sigma_init 2.5", 'after SiDA, 200 kimg', 'exact samples']
    assert len(titles[1]) == 5 and 'clustering' in lines[0] and 'balance' in lines[0]
    panel = toy._panel(toy._density(T, 256, 1.4), 't', T.sample(10), toy.figure_lines(toy.toy_figures(T.sample(10), T)), 256, 1.4)
    png, gif = Image.open(tmp_path / 'toy.png'), Image.open(tmp_path / 'toy.gif')
    assert png.size == (3 * panel.size[0], panel.size[1] + 24)  # three panels and the legend row
    assert gif.n_frames == 5 and gif.size == panel.size
    assert Image.open(tmp_path / 'toy_quality.png').size == (760, 350)
    assert not [p for p in os.listdir(tmp_path) if 'tmp' in p]

#----------------------------------------------------------------------------
# The default run reaches clusters: seeds 0 / 1 gave 0.789 / 0.817 within 2 std of a mode (exact 0.865; the old
# defaults 0.679) and clustering 0.149 / 0.168 (old 0.026 / 0.050); the bounds leave a little room for other CPUs.

@pytest.mark.skipif(not os.environ.get('SID_SLOW'), reason='a full default toy run (~15-30 s); set SID_SLOW=1')
def test_default_toy_run_makes_clusters(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sid.main(['--dataset', 'toy', '--outdir', tmp_path / 'run'])
    end = next(l for l in out.getvalue().splitlines() if l.startswith('toy end'))
    within, clustering = (float(re.search(rf'{k} ([-0-9.]+)', end).group(1)) for k in ('of a mode', 'clustering'))
    assert within >= 0.78 and clustering > 0.12, end
    assert Image.open(tmp_path / 'run' / 'toy.png').size[0] > 900
