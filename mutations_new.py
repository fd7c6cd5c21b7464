"""The mutation baseline of /work/wt-mut (mutations.md) re-applied to the redesigned code, against the new suite.

    python mutations_new.py                 # all, one at a time -> mutations_new.md
    python mutations_new.py --only M18,M23  # a subset
    python mutations_new.py --check         # every snippet occurs exactly once

Each row: (id, description, [(file, old, new)], -k expression). The tree is copied to /tmp/mutnew-ID, edited, and
only the tests named by the -k expression run (OMP_NUM_THREADS=1, -x): caught there means caught by the suite; a
miss means missed by that selection (the whole suite was not run per mutation, for time).
"""
import os, shutil, subprocess, sys, time

ROOT = os.path.dirname(os.path.abspath(__file__))
M = [
    ('M01', 'SiD loss: alpha term sign flipped', [('sid.py', '(diff * ((y_phi - x_g) - alpha * diff))', '(diff * ((y_phi - x_g) + alpha * diff))')], 'paper_forms'),
    ('M02', 'SiD loss: w from f_psi instead of the teacher', [('sid.py', 'w = (x_g - y_phi).abs()', 'w = (x_g - y_psi).abs()')], 'paper_forms'),
    ('M03', 'SiD loss: w not detached', [('sid.py', '    with torch.no_grad():  # the normaliser uses the teacher', '    if True:  # the normaliser uses the teacher')], 'gradient_flows'),
    ('M04', 'SiD loss: f_phi(x_t) detached', [('sid.py', '    y_phi = f_phi(x_t, sigma, labels)\n', '    y_phi = f_phi(x_t, sigma, labels).detach()\n')], 'gradient_flows'),
    ('M05', 'SiD loss: f_psi(x_t) detached', [('sid.py', 'else (f_psi(x_t, sigma, labels), None)', 'else (f_psi(x_t, sigma, labels).detach(), None)')], 'gradient_flows'),
    ('M06', 'SiD loss: x_t detached (DMD-style)', [('sid.py', '    x_t = x_g + sigma * noise\n    y_phi', '    x_t = (x_g + sigma * noise).detach()\n    y_phi')], 'gradient_flows'),
    ('M07', 'sigma_from_t inverted', [('sid.py', 'return (a + (1 - t) * (b - a)) ** rho', 'return (a + t * (b - a)) ** rho')], 'sigma_schedule'),
    ('M08', 'generator sigma ignores tmax', [('sid.py', 'device=x.device) * tmax / 1000)', 'device=x.device))')], 'sigma_schedule'),
    ('M09', 'fake-score P_mean +1.2', [('sid.py', 'def draw_sigma_fake(x, P_mean=-1.2, P_std=1.2)', 'def draw_sigma_fake(x, P_mean=1.2, P_std=1.2)')], 'sigma_schedule'),
    ('M10', 'fake-score P_std 2.0', [('sid.py', 'def draw_sigma_fake(x, P_mean=-1.2, P_std=1.2)', 'def draw_sigma_fake(x, P_mean=-1.2, P_std=2.0)')], 'sigma_schedule'),
    ('M11', 'edm_weight denominator not squared', [('sid.py', 'return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2', 'return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data)')], 'fake_score_loss_minimised or sida_fake'),
    ('M12', 'EDMPrecond c_out without sqrt', [('edm_nets.py', 'c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()', 'c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2)')], 'precond'),
    ('M13', 'EDMPrecond c_noise = ln(sigma)/2 (image nets AND the toy MLP now)', [('edm_nets.py', '        c_noise = sigma.log() / 4', '        c_noise = sigma.log() / 2')], 'precond'),
    ('M14', 'fake_score_loss does not detach x_g', [('sid.py', '    x_g = x_g.detach()\n    return dsm_loss(f_psi(', '    return dsm_loss(f_psi(')], 'fake_score_loss_minimised'),
    ('M15', 'f_psi Adam step after the G step', [('sid.py', '    sanitize_grads_(net.parameters(), clip)\n    opt.step()\n', '    sanitize_grads_(net.parameters(), clip)\n    opt.step() if phase == 2 else None\n'),
                                                  ('sid.py', '        # 3. EMA of G;', '        run.opt_psi.step()\n        # 3. EMA of G;')], 'toy_run or fast_options or end_to_end or sida_loop'),
    ('M16', 'G in train mode when sampling for f_psi', [('sid.py', 'run.G.eval(); run.f_psi.train().requires_grad_(True)', 'run.G.train(); run.f_psi.train().requires_grad_(True)')], 'phase_states'),
    ('M17', 'f_psi in train mode in the G step', [('sid.py', 'run.G.train(); run.f_psi.eval().requires_grad_(False)', 'run.G.train(); run.f_psi.train().requires_grad_(False)')], 'phase_states'),
    ('M18', 'EMA beta from batch_gpu', [('sid.py', 'beta = 0.5 ** (cfg.batch / max(', 'beta = 0.5 ** (cfg.batch_gpu / max(')], 'ema_closed'),
    ('M19', 'EMA ramp-up 10 %', [('sid.py', '0.05 * cur_nimg), 1e-8', '0.1 * cur_nimg), 1e-8')], 'ema_closed'),
    ('M20', 'G_ema tracks f_psi', [('sid.py', 'update_ema(run.G_ema, run.G, cfg, run.cur_nimg)', 'update_ema(run.G_ema, run.f_psi, cfg, run.cur_nimg)')], 'ema_closed'),
    ('M21', "f_psi's Adam beta1 0.9", [('sid.py', 'lr=cfg.lr, betas=(0.0, 0.999)', 'lr=cfg.lr, betas=(0.9, 0.999)')], 'adam'),
    ('M22', 'fp16 Adam eps 1e-8', [('sid.py', "(1e-6 if cfg.precision == 'fp16' else 1e-8)", '(1e-8)')], 'adam'),
    ('M23', 'SiDA mix 0.5 L + 1.0 L_gan', [('sid.py', '(0.5 * loss + 0.5 * loss_gan if mix else loss)', '(0.5 * loss + 1.0 * loss_gan if mix else loss)')], 'G_sida or sida_loop'),
    ('M24', 'SiDA mixing from 100 kimg (default sida_mix_kimg)', [('sid.py', "sida_mix_kimg: float = opt(200,", "sida_mix_kimg: float = opt(100,")], 'sida_phases or G_sida'),
    ('M25', 'SiDA warm-up ignored (G steps while frozen)', [('sid.py', "lambda cfg, nimg: sida_phase(nimg, cfg.sida_warmup_kimg, cfg.sida_mix_kimg) != 'frozen',", 'lambda cfg, nimg: True,')], 'sida_phases or sida_loop'),
    ('M26', "SiDA's +-1 clip of f_psi's gradients dropped", [('sid.py', "                   1.0, 'loss_gan'),", "                   None, 'loss_gan'),")], 'sida_loop'),
    ('M27', 'SiDA GAN logits clamp removed', [('sid.py', '    logits = logits.clamp(-10, 10)\n', '')], 'sida_generator_loss'),
    ('M28', 'SiDA D: real branch with fresh noise', [('sid.py', 'logits_real = f_psi(x_r + sigma * noise,', 'logits_real = f_psi(x_r + sigma * torch.randn_like(noise),')], 'sida_fake_score'),
    ('M29', 'SiDA D: BCE labels swapped', [('sid.py', 'bce(logits_real, torch.ones_like(logits_real)) + bce(logits_fake, torch.zeros_like(logits_fake))', 'bce(logits_real, torch.zeros_like(logits_real)) + bce(logits_fake, torch.ones_like(logits_fake))')], 'sida_fake_score'),
    ('M30', 'SIGN: L_idem through the outer call', [('sid.py', 'idem=D * idem_loss(f_bar, x_g)', 'idem=D * idem_loss(f, x_g)')], 'sign_student'),
    ('M31', 'SIGN sampling: the same noise for every step', [('runs.py', 'noises = [torch.stack([torch.randn(G.img_shape, generator=g) for g in gens]).to(device) for _ in sigmas]', 'noises = [torch.stack([torch.randn(G.img_shape, generator=g) for g in gens]).to(device)] * len(sigmas)')], 'sign_noise'),
    ('M32', "SIGN: f_theta' never refreshed", [('sid.py', '    refresh_frozen_(run.G_bar, run.G)  # theta', '    pass  # theta')], 'sign_toy_idempotence', 'SID_SLOW=1 '),
    ('M33', 'CIFAR unpickler: any numpy global allowed', [('edm_nets.py', "        if (module, name) not in self.allow:\n", "        if module.split('.')[0] == 'numpy':\n            return getattr(__import__('importlib').import_module(module), name)\n        if (module, name) not in self.allow:\n")], 'cifar_unpickler'),
    ('M34', 'to_uint8 rounds', [('fid.py', 'return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)', 'return (x * 127.5 + 127.5).round().clip(0, 255).to(torch.uint8)')], 'to_uint8'),
    ('M35', 'resume: data position not restored', [('sid.py', "    run.data_batches = st['data_images'] // (run.batch_gpu * run.world_size)\n", '')], 'resume_is'),
    ('M36', 'G loss divided by batch_gpu instead of n', [('sid.py', 'c, cfg.alpha).sum() * cfg.lsg / run.n', 'c, cfg.alpha).sum() * cfg.lsg / run.batch_gpu')], 'ddp_equals'),
    ('M37', 'fake loss divided by batch_gpu instead of n', [('sid.py', 'c, aug).sum() * run.cfg.ls / run.n', 'c, aug).sum() * run.cfg.ls / run.batch_gpu')], 'ddp_equals'),
    # new behaviours of the redesign
    ('N01', 'resume accepts a changed --alpha', [('sid.py', "RESUMABLE = {'resume',", "RESUMABLE = {'alpha', 'resume',")], 'resume-alpha'),
    ('N02', 'stats.jsonl not truncated on resume', [('sid.py', "        runs.truncate_stats(os.path.join(run.cfg.outdir, 'stats.jsonl'), run.cur_nimg / 1e3)", '        pass')], 'resume_is and toy'),
    ('N03', 'NaN samples kept (no zero loss)', [('sid.py', '    return torch.stack([~t.flatten(1).isnan().any(1) for t in ts]).all(0)', '    return torch.ones(len(ts[0]), dtype=torch.bool, device=ts[0].device)')], 'nan_samples'),
    ('N04', 'batch_gpu not clamped to batch / world_size', [('sid.py', '    batch_gpu = min(cfg.batch_gpu, cfg.batch // world_size)', '    batch_gpu = cfg.batch_gpu')], 'clamped'),
    ('N06', 'atomic_write writes in place (no temporary)', [('edm_nets.py', "            fd = os.open(tmp, flags, 0o644)", "            fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)"),
        ('edm_nets.py', "        os.replace(tmp, path)\n", "        pass\n")], 'crash_during or atomic_write'),
    ('N07', 'truncate_stats keeps a half last line', [('runs.py', "        except ValueError:\n            return False", "        except ValueError:\n            return True")], 'sigkill', 'SID_SLOW=1 '),
    ('N08', 'zip member sizes not checked', [('edm_nets.py', "    if big:", "    if False:")], 'hostile'),
    ('N09', 'attention: channels_last output with H and W swapped', [('edm_nets.py', "    return a.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)", "    return a.transpose(2, 3).contiguous(memory_format=torch.channels_last) if cl else a")], 'fast_path or attention'),
    ('N10', 'attention: SDPA scale 1 instead of 1/sqrt(C_head)', [('edm_nets.py', "F.scaled_dot_product_attention(q, k, v)", "F.scaled_dot_product_attention(q, k, v, scale=1.0)")], 'fast_path or attention'),
    ('N11', 'AugmentPipe: identity rows resampled too', [('edm_nets.py', "            images = torch.where(moved.reshape(N, 1, 1, 1), warp_images(images, G_inv), images)", "            images = warp_images(images, G_inv)")], 'augment'),
    ('N05', 'snapshots named by kimg', [('sid.py', "f'network-snapshot-{run.cur_nimg:09d}.pt'", "f'network-snapshot-{run.cur_nimg // 1000:06d}.pt'")], 'end_to_end'),
]

def apply(mid):
    row = next(r for r in M if r[0] == mid)
    dst = f'/tmp/mutnew-{mid}'
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns('.git', '__pycache__', 'runs'))
    for f, old, new in row[2]:
        p = os.path.join(dst, f)
        s = open(p).read()
        assert s.count(old) == 1, (mid, f, old, s.count(old))
        open(p, 'w').write(s.replace(old, new))
    return dst, row

def main():
    args = sys.argv[1:]
    ids = args[args.index('--only') + 1].split(',') if '--only' in args else [r[0] for r in M]
    if '--check' in args:
        return [apply(i) and print(i, 'ok') for i in ids]
    out = os.path.join(ROOT, 'mutations_new.md')
    for mid in ids:
        dst, row = apply(mid)
        t = time.time()
        r = subprocess.run(f'{row[4] if len(row) > 4 else ""}OMP_NUM_THREADS=1 timeout 900 python -m pytest -q -x -p no:cacheprovider test_sid.py -k "{row[3]}"', shell=True,
                           cwd=dst, capture_output=True, text=True)
        first = next((l.split()[1] for l in r.stdout.splitlines() if l.startswith(('FAILED', 'ERROR'))), '')
        res = 'caught' if r.returncode not in (0, 5) else 'MISSED' if r.returncode == 0 else 'no tests selected'
        line = f'| {mid} | {res} | `{first}` | {time.time() - t:.0f} | `{row[3]}` | {row[1]} |'
        print(line, flush=True)
        with open(out, 'a') as f:
            f.write(line + '\n')
        shutil.rmtree(dst, ignore_errors=True)

if __name__ == '__main__':
    main()
