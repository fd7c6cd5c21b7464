# Pictures of sid's runs, drawn with pillow: the toys' panels, animations and quality curves, and
# grids of image samples. Every function returns image bytes (PNG or GIF); the run driver (runs.py)
# writes them; and the FID curve of a run.

import io
import math

import numpy as np
import torch

import toy

#----------------------------------------------------------------------------
# Basics: a font, round tick values, and the encoders.

def font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()

def ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12) / n))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if (hi - lo) / (step * m) <= n)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [k * step for k in range(first, last + 1)]

def png_bytes(image):
    out = io.BytesIO()
    image.save(out, format='PNG')
    return out.getvalue()

def gif_bytes(images, duration_ms=80):
    """An animated GIF on a fixed palette, 250 greys and the dots' yellow: fast (Pillow's default
    median cut per frame is slow) and without banding in the density."""
    from PIL import Image
    pal = Image.new('P', (1, 1))
    pal.putpalette([v for i in range(250) for v in (i * 255 // 249,) * 3] + [255, 220, 80] * 6)
    frames = [im.quantize(palette=pal, dither=Image.Dither.NONE) for im in images]
    out = io.BytesIO()
    frames[0].save(out, format='GIF', save_all=True, append_images=frames[1:], duration=duration_ms,
                   loop=0)
    return out.getvalue()

#----------------------------------------------------------------------------
# The 2-D toy: samples as dots over the true density, with numbered axes and the figures below.

YELLOW = (255, 220, 80)

def density(teacher, size, extent):
    """The true density as a grey image (row 0 at the top, y = +extent)."""
    g = torch.linspace(-extent, extent, size)
    grid = torch.stack(torch.meshgrid(g, -g, indexing='xy'), -1).reshape(-1, 2)
    dens = teacher.log_prob(grid, torch.full((len(grid), 1), 1e-3)).exp().reshape(size, size)
    return (dens / dens.max()).clamp(0, 1).pow(0.3).mul(110).byte().numpy()

def point_panel(bg, title, pts, lines, size, extent, pad=(48, 34, 26, 16)):
    """One panel: title, samples over the density, x/y axes with numbered ticks, lines below."""
    from PIL import Image, ImageDraw
    left, top, right, below = pad
    im = Image.new('RGB', (left + size + right, top + size + below + 15 * len(lines) + 4), 'black')
    plot = np.repeat(bg[:, :, None], 3, 2)
    uv = ((pts.float().clamp(-extent, extent) / extent + 1) * (size - 1) / 2).round().long().numpy()
    plot[size - 1 - uv[:, 1], uv[:, 0]] = YELLOW  # one pixel per sample
    im.paste(Image.fromarray(plot), (left, top))
    dr, f11 = ImageDraw.Draw(im), font(11)

    def px(v):
        return (v / extent + 1) * (size - 1) / 2

    dr.rectangle([left - 1, top - 1, left + size, top + size], outline=(160, 160, 160))
    for t in [t for t in ticks(-extent, extent, 6) if abs(t) < extent - 0.05]:  # none at corners
        x, y = left + px(t), top + size - 1 - px(t)
        dr.line([(x, top + size), (x, top + size + 4)], fill='white')
        dr.text((x, top + size + 5), f'{t:g}', fill='white', font=f11, anchor='mt')
        dr.line([(left - 5, y), (left - 1, y)], fill='white')
        dr.text((left - 7, y), f'{t:g}', fill='white', font=f11, anchor='rm')
    dr.text((left + size / 2, 8), title, fill='white', font=font(12), anchor='mt')
    for i, line in enumerate(lines):
        dr.text((left, top + size + below + 2 + 15 * i), line, fill=(220, 220, 220), font=f11)
    return im

def point_panels(panels, teacher, size=256, extent=1.4):
    """[(title, points, text lines)] -> one PIL image per panel."""
    bg = density(teacher, size, extent)
    return [point_panel(bg, title, pts, lines, size, extent) for title, pts, lines in panels]

def side_by_side(panels, teacher):
    """The panels side by side with a legend: a PNG."""
    from PIL import Image, ImageDraw
    ims = point_panels(panels, teacher)
    w, h = ims[0].size
    canvas = Image.new('RGB', (w * len(ims), h + 24), 'black')
    for i, im in enumerate(ims):
        canvas.paste(im, (i * w, 0))
    dr = ImageDraw.Draw(canvas)
    dr.rectangle([12, h + 6, 24, h + 18], fill=(110, 110, 110))
    dr.text((30, h + 12), 'true density (grey)', fill='white', font=font(11), anchor='lm')
    dr.ellipse([170, h + 9, 176, h + 15], fill=YELLOW)
    dr.text((182, h + 12), 'samples (yellow dots); the figures: toy.toy_figures', fill='white',
            font=font(11), anchor='lm')
    return png_bytes(canvas)

def samples_picture(x, teacher):
    """One panel of toy points with their figures (`python sid.py generate` on a toy generator)."""
    lines = toy.figure_lines(toy.toy_figures(x, teacher))
    return side_by_side([(f'{len(x)} samples', x, lines)], teacher)

#----------------------------------------------------------------------------
# SiD's mechanism on the 2-D toy (SiD §4, Algorithm 1): G's samples, the teacher's and the fake
# score's denoised points at one noise level, and the direction of G's update, at a few moments.

CYAN, MAGENTA, ORANGE = (80, 220, 255), (255, 90, 220), (255, 150, 40)

def arrow(dr, a, b, colour, head=5):
    """A line from a to b (pixels) with a head at b."""
    dr.line([a, b], fill=colour, width=2)
    dx, dy = b[0] - a[0], b[1] - a[1]
    n = math.hypot(dx, dy)
    if n < 1:
        return
    ux, uy = dx / n, dy / n
    for side in (1, -1):
        dr.line([b, (b[0] - head * (ux - side * 0.5 * uy), b[1] - head * (uy + side * 0.5 * ux))],
                fill=colour, width=2)

def mechanism_picture(panels, teacher, size=300, extent=1.4, arrow_len=0.3):
    """panels: [dict(title, samples, x_g, x_t, y_phi, y_psi, direction, lines)] (lab.mechanism) ->
    one PNG: per panel, all of G's samples (yellow), and for some of them x_g (white), x_t (grey,
    joined to x_g), f_phi(x_t) (cyan) and f_psi(x_t) (magenta) joined by a line, and G's update
    direction at x_g (orange arrows, scaled per panel: the longest is arrow_len)."""
    from PIL import Image, ImageDraw
    bg = density(teacher, size, extent)
    left, top = 48, 34  # point_panel's padding

    def at(v):
        u = (float(v[0]) / extent + 1) * (size - 1) / 2
        w = (float(v[1]) / extent + 1) * (size - 1) / 2
        return left + u, top + size - 1 - w

    ims = []
    for p in panels:
        longest = float(p['direction'].norm(dim=1).max())
        im = point_panel(bg, p['title'], p['samples'], p['lines'], size, extent)
        dr = ImageDraw.Draw(im)
        for i in range(len(p['x_g'])):
            g, t = at(p['x_g'][i]), at(p['x_t'][i])
            phi, psi = at(p['y_phi'][i]), at(p['y_psi'][i])
            dr.line([g, t], fill=(120, 120, 120))
            dr.line([phi, psi], fill=(230, 230, 230))
            for c, colour in ((t, (150, 150, 150)), (phi, CYAN), (psi, MAGENTA)):
                dr.ellipse([c[0] - 2.5, c[1] - 2.5, c[0] + 2.5, c[1] + 2.5], fill=colour)
            end = at(p['x_g'][i] + p['direction'][i] * arrow_len / max(longest, 1e-12))
            arrow(dr, g, end, ORANGE)
            dr.ellipse([g[0] - 2.5, g[1] - 2.5, g[0] + 2.5, g[1] + 2.5], fill='white')
        ims.append(im)
    w, h = ims[0].size
    canvas = Image.new('RGB', (w * len(ims), h + 40), 'black')
    for i, im in enumerate(ims):
        canvas.paste(im, (i * w, 0))
    dr, f11 = ImageDraw.Draw(canvas), font(11)
    legend = [(YELLOW, "G's samples"), ((255, 255, 255), 'x_g'),
              ((150, 150, 150), 'x_t = x_g + sigma n'),
              (CYAN, "f_phi(x_t): the teacher's denoiser"),
              (MAGENTA, "f_psi(x_t): the fake score's (G's samples')"),
              (ORANGE, "G's update at x_g: -d loss / d x_g, mean over SiD's (sigma, n), scaled "
               'per panel')]
    x, y = 12, h + 8
    for colour, text in legend:
        dr.ellipse([x, y + 2, x + 7, y + 9], fill=colour)
        dr.text((x + 12, y + 5), text, fill='white', font=f11, anchor='lm')
        x += 24 + int(dr.textlength(text, font=f11))
        if x > canvas.width - 260:
            x, y = 12, y + 16
    return png_bytes(canvas)

def quality_plot(curve, width=760, height=350):
    """Quality against kimg from (kimg, toy_figures) pairs: energy distance (log scale) on the left;
    within 2 std, clustering and balance on the right, each with its exact samples' value dashed."""
    from PIL import Image, ImageDraw
    img, f11 = Image.new('RGB', (width, height), 'white'), font(11)
    dr, ks = ImageDraw.Draw(img), [k for k, _ in curve]
    log_ed = [math.log10(max(q['energy'], 1e-5)) for _, q in curve]
    colours = (('within', (214, 39, 40)), ('clustering', (44, 160, 44)),
               ('balance', (148, 103, 189)))
    plots = [(f'energy distance (log10, {toy.ENERGY_N} samples), lower is better',
              [('energy distance', log_ed, (31, 119, 180), None)],
              (math.floor(min(log_ed)), math.ceil(max(log_ed) + 1e-9))),
             ('clusters: higher is better, dashed = exact samples',
              [(n, [q[n] for _, q in curve], c, toy.EXACT[n]) for n, c in colours], (0, 1))]
    for i, (title, series, (lo, hi)) in enumerate(plots):
        L, R, T, B = 55 + i * width // 2, (i + 1) * width // 2 - 15, 30, height - 60

        def px(k):
            return L + (k - ks[0]) / max(ks[-1] - ks[0], 1e-9) * (R - L)

        def py(v):
            return B - (v - lo) / (hi - lo) * (B - T)

        for k in ticks(ks[0], ks[-1]):
            dr.line([(px(k), T), (px(k), B)], fill=(225, 225, 225))
            dr.text((px(k), B + 5), f'{k:g}', fill='black', font=f11, anchor='mt')
        for v in ticks(lo, hi):
            dr.line([(L, py(v)), (R, py(v))], fill=(225, 225, 225))
            dr.text((L - 5, py(v)), f'{v:g}', fill='black', font=f11, anchor='rm')
        dr.rectangle([L, T, R, B], outline='black')
        dr.text(((L + R) / 2, 8), title, fill='black', font=font(12), anchor='mt')
        dr.text(((L + R) / 2, B + 20), 'kimg', fill='black', font=f11, anchor='mt')
        for j, (name, ys, colour, exact) in enumerate(series):
            if exact is not None:
                for x0 in range(L, R, 10):
                    dr.line([(x0, py(exact)), (min(x0 + 5, R), py(exact))], fill=colour)
            dr.line([(px(k), py(v)) for k, v in zip(ks, ys)], fill=colour, width=2)
            x0 = L + j * (R - L) // len(series)  # legend row under the plot
            dr.line([(x0, height - 10), (x0 + 20, height - 10)], fill=colour, width=2)
            dr.text((x0 + 25, height - 10), name, fill=colour, font=f11, anchor='lm')
    return png_bytes(img)

def toy_curve(frames, teacher):
    """[(kimg, toy_figures)] of the observations, each on all its samples as the run's start and
    end lines (toy.ENERGY_N of them for the energy): the GIF's last figures ARE the end line's."""
    return [(float(t.split()[0]), toy.toy_figures(x, teacher)) for t, x in frames]

def toy_pictures(world, frames, method, sigma_init):
    """The 2-D toy's pictures from its observations [(title 'K kimg', samples)]: toy.png (start,
    end, exact samples, with figures), toy.gif (every observation), toy_quality.png (figures
    against kimg). Drawn from the frames alone, so a resumed run draws its whole history."""
    teacher = world.teacher
    name = {'sid': 'SiD', 'sida': 'SiDA', 'sign': 'SIGN'}.get(method, 'SiD')
    curve = toy_curve(frames, teacher)
    first, last = curve[0][1], curve[-1][1]
    exact = teacher.sample(len(world.eps), torch.Generator().manual_seed(3))
    start_title = f"start: G = teacher's denoiser at sigma_init {sigma_init:g}"
    still = [(start_title, frames[0][1], toy.figure_lines(first)),
             (f'after {name}, {curve[-1][0]:g} kimg', frames[-1][1], toy.figure_lines(last)),
             ('exact samples', exact, toy.figure_lines(toy.toy_figures(exact, teacher)))]
    moving = [(f'{name}, {t}', x, toy.figure_lines(q)) for (t, x), (_, q) in zip(frames, curve)]
    return {'toy.png': side_by_side(still, teacher),
            'toy.gif': gif_bytes(point_panels(moving, teacher)),
            'toy_quality.png': quality_plot(curve)}

#----------------------------------------------------------------------------
# Images: grids of samples side by side, each with a title and a subtitle.

def image_panels(panels, cols=8, scale=4):
    """[(title, subtitle, images [n, C, H, W] in [-1, 1])] -> one PNG of grids side by side; pixels
    as EDM's uint8 rule, upscaled by nearest neighbour so that 16x16 images can be seen."""
    from PIL import Image, ImageDraw
    grids = []
    for _, _, x in panels:
        u = (x[:cols * cols].detach().cpu().float() * 127.5 + 128).clip(0, 255).to(torch.uint8)
        n, C, H, W = u.shape
        rows = (n + cols - 1) // cols
        g = torch.full((rows * (H + 1) + 1, cols * (W + 1) + 1, C), 80, dtype=torch.uint8)
        for i, v in enumerate(u):
            r, k = divmod(i, cols)
            top, left = 1 + r * (H + 1), 1 + k * (W + 1)
            g[top:top + H, left:left + W] = v.permute(1, 2, 0)
        im = Image.fromarray(g.numpy())
        grids.append(im.resize((im.width * scale, im.height * scale), Image.NEAREST))
    head, pad = 30, 8
    width = sum(g.width + pad for g in grids) + pad
    canvas = Image.new('RGB', (width, max(g.height for g in grids) + head + pad), (20, 20, 20))
    d, u = ImageDraw.Draw(canvas), pad
    for (title, sub, _), g in zip(panels, grids):
        d.text((u, 3), title, fill=(255, 255, 255))
        d.text((u, 16), sub, fill=(200, 200, 120))
        canvas.paste(g, (u, head))
        u += g.width + pad
    return png_bytes(canvas)

def image_toy_pictures(world, frames, sign=None):
    """The image toy's pictures: toy-images.png (start, end, exact samples) and, for SIGN, the 1-,
    2- and 4-step samples and the projections f(y) of corrupted data y."""
    (t0, x0), (t1, x1) = frames[0], frames[-1]
    xe, qe = world.exact()
    out = {'toy-images.png': image_panels([
        (f'start ({t0})', toy.quality_text(world.quality(x0)), x0),
        (f'end ({t1})', toy.quality_text(world.quality(x1)), x1),
        ('exact samples', toy.quality_text(qe), xe)])}
    if sign is not None:
        steps = []
        for k, q in world.step_figures(sign):
            sub = f"cov {q['coverage']:.2f} en {q['energy']:.3f} acc {q['class_acc']:.2f}"
            steps.append((f'{k} step(s)', sub, sign['steps'][k - 1]))
        out['toy-images-sign-steps.png'] = image_panels(steps)
        proj = []
        for name, y, p, rms, hit in world.projection_figures(sign):
            proj += [(name, f'RMS {rms[0]:.3f}', y),
                     (f'f({name})', f'RMS {rms[1]:.3f} hit {hit[1]:.2f}', p)]
        proj.append(('clean data', '', sign['data']))
        out['toy-images-sign-projection.png'] = image_panels(proj)
    return out

#----------------------------------------------------------------------------
# The FID of a run against the images seen.

def curve(points, xlabel='Mimg', ylabel='FID', width=560, height=360):
    """A line plot of (x, y) points with round ticks -> PNG bytes."""
    from PIL import Image, ImageDraw
    points = sorted((float(x), float(y)) for x, y in points)
    if not points:
        raise ValueError('curve needs at least one point')
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    xt = ticks(*widened(min(xs), max(xs)))
    yt = ticks(*widened(min(ys), max(ys)))
    left, right, top, bottom = 60, width - 20, 20, height - 45  # the plot area in pixels

    def px(x):
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * (right - left)

    def py(y):
        return bottom - (y - yt[0]) / (yt[-1] - yt[0]) * (bottom - top)

    img = Image.new('RGB', (width, height), 'white')
    pen = ImageDraw.Draw(img)
    small = font(11)
    for x in xt:
        pen.line([(px(x), top), (px(x), bottom)], fill=(225, 225, 225))
        pen.text((px(x), bottom + 6), f'{x:g}', fill='black', font=small, anchor='mt')
    for y in yt:
        pen.line([(left, py(y)), (right, py(y))], fill=(225, 225, 225))
        pen.text((left - 6, py(y)), f'{y:g}', fill='black', font=small, anchor='rm')
    pen.rectangle([left, top, right, bottom], outline='black')
    pen.text(((left + right) / 2, height - 6), xlabel, fill='black', font=small, anchor='mb')
    pen.text((6, top - 14), ylabel, fill='black', font=small)
    xy = [(px(x), py(y)) for x, y in points]
    if len(xy) > 1:
        pen.line(xy, fill=(31, 119, 180), width=2)
    for x, y in xy:
        pen.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
    return png_bytes(img)

def widened(lo, hi):
    """A range of one value widened around it, so that the ticks span something."""
    if hi > lo:
        return lo, hi
    return lo - 0.5 - abs(lo) * 0.05, hi + 0.5 + abs(hi) * 0.05
