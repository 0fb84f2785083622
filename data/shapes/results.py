"""
The paper's claims measured against baselines on the built-in data: `make results`.

    python data/shapes/results.py                   # every stage not done yet, then the report
    python data/shapes/results.py --parallel=False  # the same, one stage at a time
    python data/shapes/results.py --only=oracle     # the oracle stages, merged into the last report
    python data/shapes/results.py --report          # redraw docs/results.md from docs/results.json

1. Fidelity. 2,000 images from the prior -> DLC -> DiT pipeline (uncond) against 2,000 from a
   DiT trained with no condition (plain; also one given the extra CPU time the prior's training
   took) and from a class-conditional DiT given the true (shape, color) labels at the training
   split's frequencies (class): valid share, total variation of each factor's histogram and of
   the joint one, coverage of the training combinations, median distance to the nearest
   training image. Two training seeds of each DiT. uncond and class also without guidance (it
   trades diversity for fidelity), and real val images as the floor.
2. Composition. Pairs (and triples) of val images whose shape and color make a held-out pair,
   composed: valid, from the sources, novel, a held-out pair shown; against the prior's samples
   and the DiT's ceiling, the reconstructions of the ood split's own codes. The attempt to do
   better: soft codes (the sources' averaged distributions given to the DiT).
3. Text. The text model (config/text2dlc_shapes.py, one per seed) given val captions and short
   prompts ("a red square") of the 14 seen pairs, then ood captions and short prompts of the 4
   held-out pairs, each code decoded by the seed's DLC DiT: the prompt's shape and color kept,
   against the DiT's ceiling on the held-out pairs.
4. The oracle control. The true factors as codes (prepare.py --oracle_codes, a perfectly
   factorized code), given to the same DiT and text model configs: the held-out pairs' recon,
   composition and short prompts, the ceiling the DLC rows of 2 and 3 are read against; and
   the factorization report of both kinds of codes (score.py).

Every stage is a command of the repository's scripts with the built-in configs. The shared
stages (the tokenizer, its codes, the prior, the real images, the oracle codes) run first, in
order; then each seed's stages, in order, in a lane of its own, the two lanes side by side and
every process of a lane on one thread (OMP_NUM_THREADS=1): a model this small runs nearly as fast
on one thread as on two, so the lanes about halve the 3-4 hours of one stage after another on 2
cores. (--parallel=False: every stage in the stage list's order, on the default threads.)
A stage that finished leaves a stamp (out-results/stamps/<stage>.json, with its wall time) and
is not run again; one that was interrupted runs again with the same command, which continues
(the trainers resume from out_dir with --auto_resume=True, sample.py from its chunks). When a
stage fails, no stage starts after it and the other lane's running stage is stopped (SIGTERM: a
trainer saves first); the error names each. Each run adds its wall time to
out-results/stamps/_runs.json, and the report gives their sum beside the stages' own times.
The report is two files: docs/results.json, every stamp and score it shows, and docs/results.md,
drawn from that file alone, with each claim's verdict computed from its table.
"""
import glob
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = 'out-results'
SEEDS = (0, 1)
N_IMAGES = 2000
DIT_ITERS = 13000                   # config/diffusion_shapes.py's max_iters


def stages(out=OUT):
    """(name, command) in order; a command is a list of words, run in the repository root.
    The plain DiT given the prior's CPU time is the one stage whose command depends on an
    earlier stage's wall time, so it is a function of the stamps."""
    py = [sys.executable]
    tok, prior = f'{out}/tok', f'{out}/prior'
    dit = lambda name, seed: f'{out}/dit_{name}_s{seed}'
    train_dit = lambda cond, seed, name=None, *extra, codes=tok: py + [
        'diffusion.py', 'config/diffusion_shapes.py', f'--codes_dir={codes}',
        f'--out_dir={dit(name or cond, seed)}', f'--cond={cond}', f'--seed={seed}',
        '--auto_resume=True', *(['--num_classes=18'] if cond == 'class' else []), *extra]
    sample = lambda name, seed, *extra, codes=tok, dlc='dlc': py + [
        'sample.py', 'config/sample_shapes.py', f'--out_dir={out}/samples/{name}_s{seed}',
        f'--seed={seed}', f'--n_samples={N_IMAGES}', '--batch_size=100', f'--tokenizer_dir={codes}',
        f'--prior_dir={prior}', f'--diffusion_dir={dit(dlc, seed)}', *extra]
    out_stages = [
        ('tokenizer', py + ['tokenizer.py', 'config/tokenizer_shapes.py', f'--out_dir={tok}',
                            '--auto_resume=True']),
        ('dump', py + ['tokenizer.py', 'config/tokenizer_shapes.py', f'--out_dir={tok}',
                       '--mode=dump']),
        ('probe', py + ['tokenizer.py', 'config/tokenizer_shapes.py', f'--out_dir={tok}',
                        '--mode=probe']),
        ('codes_report', py + ['data/shapes/score.py', f'--codes_dir={tok}']),
        ('prior', py + ['prior.py', 'config/prior_shapes.py', f'--codes_dir={tok}',
                        f'--out_dir={prior}', '--auto_resume=True']),
        # the floor: real images held out of training, scored like the generated ones
        ('real_val', py + ['data/shapes/results.py', '--real', f'{out}/samples/real_val']),
    ]
    def none_plus(done):
        """The plain DiT of seed 0 continued (lr is constant after warm-up, and resume is exact:
        the same as a longer run) by as many iterations as it runs in the prior's training
        time."""
        os.makedirs(dit('none_plus', 0), exist_ok=True)
        target = f"{dit('none_plus', 0)}/diffusion.pt"
        if not os.path.exists(target):
            shutil.copy(f"{dit('none', 0)}/diffusion.pt", target)
        return train_dit('none', 0, 'none_plus', f'--max_iters={plus_iters(done)}')

    text_model = lambda seed: f'{out}/text2dlc_s{seed}'
    text = lambda name, seed, prompts, model='', **codes: sample(
        name, seed, '--mode=text', f'--text2dlc_dir={text_model(seed)}{model}',
        f'--prompts={prompts}', **codes)
    seen, held = short_prompts()
    oracle = f'{out}/oracle'
    out_stages += [('oracle_codes', py + ['data/shapes/prepare.py', f'--oracle_codes={oracle}']),
                   ('oracle_report', py + ['data/shapes/score.py', f'--codes_dir={oracle}'])]
    on_oracle = dict(codes=oracle, dlc='oracle')
    # each seed's stages in the order its lane runs them; one stage at a time (--parallel=False),
    # seed 0 whole first, so an interrupted run has its numbers
    for seed in SEEDS:
        out_stages += [
            (f'dit_dlc_s{seed}', train_dit('dlc', seed)),
            (f'uncond_s{seed}', sample('uncond', seed, '--mode=uncond')),
            (f'compose2_s{seed}', sample('compose2', seed, '--mode=compose',
                                         '--sources=held_out')),
            (f'compose3_s{seed}', sample('compose3', seed, '--mode=compose',
                                         '--sources=held_out:3')),
            # the attempt to raise composition's valid share: the averaged distributions
            (f'compose2_soft_s{seed}', sample('compose2_soft', seed, '--mode=compose',
                                              '--sources=held_out', '--compose_soft=True')),
            (f'compose3_soft_s{seed}', sample('compose3_soft', seed, '--mode=compose',
                                              '--sources=held_out:3', '--compose_soft=True')),
            (f'ceiling_s{seed}', sample('ceiling', seed, '--mode=recon', '--split=ood')),
            (f'dit_none_s{seed}', train_dit('none', seed)),
            (f'plain_s{seed}', sample('plain', seed, '--mode=plain',
                                      f'--plain_dit={dit("none", seed)}/diffusion.pt')),
            (f'dit_class_s{seed}', train_dit('class', seed)),
            (f'class_s{seed}', sample('class', seed, '--mode=class', '--labels=train',
                                      f'--class_dit={dit("class", seed)}/diffusion.pt')),
            # guidance (the config's 3.0) trades diversity for fidelity: both DiTs without it
            (f'uncond_cfg1_s{seed}', sample('uncond_cfg1', seed, '--mode=uncond',
                                            '--cfg_scale=1.0')),
            (f'class_cfg1_s{seed}', sample('class_cfg1', seed, '--mode=class', '--labels=train',
                                           f'--class_dit={dit("class", seed)}/diffusion.pt',
                                           '--cfg_scale=1.0')),
            # 3. text: the text model on the tokenizer's codes, decoded by this seed's DLC DiT
            (f'text2dlc_s{seed}', py + ['text2dlc.py', 'config/text2dlc_shapes.py',
                                        f'--codes_dir={tok}', f'--out_dir={text_model(seed)}',
                                        f'--seed={seed}', '--auto_resume=True']),
            (f'text_val_s{seed}', text('text_val', seed, 'data/shapes/val_captions.txt')),
            (f'text_seen_s{seed}', text('text_seen', seed, seen)),
            (f'text_ood_s{seed}', text('text_ood', seed, 'data/shapes/ood_captions.txt')),
            (f'text_held_s{seed}', text('text_held', seed, held)),
        ]
        # the oracle control: the same DiT and text model on the true factors as codes (a
        # perfectly factorized code), the ceiling the DLC rows are read against
        out_stages += [
            (f'dit_oracle_s{seed}', train_dit('dlc', seed, 'oracle', codes=oracle)),
            (f'oracle_ceiling_s{seed}', sample('oracle_ceiling', seed, '--mode=recon',
                                               '--split=ood', **on_oracle)),
            (f'oracle_compose2_s{seed}', sample('oracle_compose2', seed, '--mode=compose',
                                                '--sources=held_out', **on_oracle)),
            (f'text2dlc_oracle_s{seed}', py + ['text2dlc.py', 'config/text2dlc_shapes.py',
                                               f'--codes_dir={oracle}',
                                               f'--out_dir={text_model(seed)}_oracle',
                                               f'--seed={seed}', '--auto_resume=True']),
            (f'oracle_text_seen_s{seed}', text('oracle_text_seen', seed, seen, '_oracle',
                                               **on_oracle)),
            (f'oracle_text_held_s{seed}', text('oracle_text_held', seed, held, '_oracle',
                                               **on_oracle)),
        ]
        if seed == 0:
            out_stages += [
                ('dit_none_plus_s0', none_plus),
                ('plain_plus_s0', sample('plain_plus', 0, '--mode=plain',
                                         f'--plain_dit={dit("none_plus", 0)}/diffusion.pt')),
                # its raw weights too: a loss spike late in a run leaves the EMA behind
                ('plain_plus_raw_s0', sample('plain_plus_raw', 0, '--mode=plain',
                                             f'--plain_dit={dit("none_plus", 0)}/diffusion.pt',
                                             '--dit_weights=model')),
            ]
    return out_stages


def short_prompts():
    """'a red circle|...' for the (shape, color) pairs seen in training, and for the held-out
    ones (data/shapes/prepare.py's)."""
    from data.shapes.prepare import COLORS, SHAPES, CONFIG, parse_held_out
    held = parse_held_out(CONFIG['held_out'])
    pairs = [[s, c] for s in range(len(SHAPES)) for c in range(len(COLORS))]
    say = lambda ps: '|'.join(f'a {COLORS[c]} {SHAPES[s]}' for s, c in ps)
    return say([p for p in pairs if p not in held]), say(held)


def plus_iters(done, base=DIT_ITERS):
    """The plain DiT's iterations plus as many as it runs in the prior's training time."""
    per_iter = done['dit_none_s0']['seconds'] / base
    return base + int(round(done['prior']['seconds'] / per_iter))


def git_commit():
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip() or 'unknown'


# -----------------------------------------------------------------------------
# Running the stages: the shared ones, then a lane per seed

RUNNING, STOPPING = [], threading.Event()   # the run's processes; set once the run is stopping
LAUNCH = threading.Lock()                   # no stage starts while the running ones are stopped


def seed_of(name):
    """A stage's training seed, from its name (dit_dlc_s1: 1); None for a shared stage."""
    found = re.fullmatch(r'.+_s(\d+)', name)
    return None if found is None else int(found.group(1))


def lanes(plan):
    """The plan's shared stages, and a lane per seed: that seed's stages, each list in the plan's
    order. A seed's stages read only the shared stages' outputs and those of earlier stages of
    their own seed (dit_none_plus_s0: prior's and dit_none_s0's), so once the shared stages are
    done the lanes can run side by side."""
    shared = [(name, command) for name, command in plan if seed_of(name) is None]
    seeds = sorted({seed_of(name) for name, _ in plan} - {None})
    return shared, [[(n, c) for n, c in plan if seed_of(n) == seed] for seed in seeds]


def run_stage(name, command, done, out, one_thread=False):
    """One stage, unless its stamp says it is done: its command (a function of the stamps in
    done, for the stage that needs them) with its output appended to out/logs/<name>.log, every
    process on one thread if one_thread; then its stamp, also put in done."""
    stamp = f'{out}/stamps/{name}.json'
    if os.path.exists(stamp):
        with open(stamp) as f:
            done[name] = json.load(f)
        return
    command = command(done) if callable(command) else command
    print(f"== {name}: {shlex.join(command)}", flush=True)
    # the time of earlier runs of an interrupted stage counts too: the plain DiT's extra
    # iterations are computed from the stamps' times
    partial = stamp + '.partial'
    spent = float(open(partial).read()) if os.path.exists(partial) else 0.0
    # two torch processes on 2 cores slow each other far more than 2x unless each has one thread
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1') if one_thread else None
    with LAUNCH:
        if STOPPING.is_set():
            raise SystemExit(f"stage {name} not started: the run was stopping")
        t0 = time.time()
        with open(f'{out}/logs/{name}.log', 'a') as log:
            process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       env=env)
        RUNNING.append(process)
    try:
        code = process.wait()
    except BaseException:       # ^C or SIGTERM while this thread waits: the stage stops too,
        process.terminate()     # a trainer after saving
        process.wait()
        raise
    finally:
        spent += time.time() - t0
        with open(partial, 'w') as f:
            f.write(repr(spent))
    if code and STOPPING.is_set():
        raise SystemExit(f"stage {name} stopped (exit {code}) with the run; run again and it "
                         "continues")
    if code == 75:                  # cluster.PREEMPTED: the trainer saved and stopped
        raise SystemExit(f"stage {name} was stopped by a signal after saving; run again and "
                         "it continues")
    if code:
        raise SystemExit(f"stage {name} failed (exit {code}); see {out}/logs/{name}.log, fix, "
                         "and run again: the stages done are kept")
    done[name] = dict(command=shlex.join(command), seconds=spent, commit=git_commit())
    with open(stamp + '.tmp', 'w') as f:
        json.dump(done[name], f, indent=1)
    os.replace(stamp + '.tmp', stamp)
    os.remove(partial)


def stop():
    """No stage starts from now on, and the running ones get SIGTERM: a trainer finishes its step,
    saves and exits, a sampler keeps the chunks it wrote; both continue when run again."""
    with LAUNCH:
        STOPPING.set()
        for process in RUNNING:
            if process.poll() is None:
                process.terminate()


def run_lanes(seed_lanes, done, out):
    """The lanes side by side, each a thread that runs its stages in turn on one thread each. When
    a stage fails, or this process is interrupted, the other lanes' stages are stopped; the error
    names the stage that failed first, then each one stopped."""
    def lane(stages_of_seed):
        for name, command in stages_of_seed:
            run_stage(name, command, done, out, one_thread=True)
    with ThreadPoolExecutor(len(seed_lanes)) as pool:
        futures = [pool.submit(lane, stages_of_seed) for stages_of_seed in seed_lanes]
        try:
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:       # ^C or SIGTERM reach this thread alone
            stop()
            raise
        first = [f.exception() for f in finished if f.exception() is not None]
        if first:
            stop()
            wait(futures)
            if not isinstance(first[0], SystemExit):
                raise first[0]      # a bug: its traceback
            later = [f.exception() for f in futures
                     if f not in finished and f.exception() is not None]
            raise SystemExit('\n'.join(str(error) for error in first + later))


def add_run(out, record):
    """One more run of results.py in out/stamps/_runs.json: a resumed run's wall time is the sum
    of its runs'."""
    path = f'{out}/stamps/_runs.json'
    runs = json.load(open(path)) if os.path.exists(path) else []
    with open(path + '.tmp', 'w') as f:
        json.dump(runs + [record], f, indent=1)
    os.replace(path + '.tmp', path)


def run(out=OUT, only=None, parallel=True):
    """Every stage without a stamp: the shared ones in order, then the seeds' lanes side by side
    (parallel, with two seeds or more), or else every stage in the plan's order on the default
    threads. Returns {stage: stamp} in the plan's order. A run that started a stage adds its wall
    time to _runs.json, interrupted or not."""
    plan = stages(out) if only is None else only
    os.makedirs(f'{out}/stamps', exist_ok=True)
    os.makedirs(f'{out}/logs', exist_ok=True)
    STOPPING.clear()
    RUNNING.clear()
    shared, seed_lanes = lanes(plan)
    laned = parallel and len(seed_lanes) > 1
    done, start, t0 = {}, time.strftime('%Y-%m-%d %H:%M:%S %z'), time.time()
    try:
        for name, command in shared if laned else plan:
            run_stage(name, command, done, out)
        if laned:
            print(f"== the seeds' stages in {len(seed_lanes)} lanes side by side, one thread "
                  f"each; their output in {out}/logs", flush=True)
            run_lanes(seed_lanes, done, out)
    finally:
        if RUNNING:
            add_run(out, dict(start=start, end=time.strftime('%Y-%m-%d %H:%M:%S %z'),
                              seconds=time.time() - t0, lanes=len(seed_lanes) if laned else 1,
                              threads_per_lane=1 if laned else None))
    return {name: done[name] for name, _ in plan}


# -----------------------------------------------------------------------------
# The report

def score_real_images(out_dir, data_dir='data/shapes', split='val'):
    """The scores of the split's first N_IMAGES real images, the floor of every generated set's
    (a finite set of real images has TV > 0 and is some distance from the training images)."""
    from data.shapes.score import histogram_scores
    images = np.load(os.path.join(data_dir, f'{split}_images.npy'), mmap_mode='r')[:N_IMAGES]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'scores.json'), 'w') as f:
        json.dump({'real': histogram_scores(data_dir, np.asarray(images))}, f, indent=1)


def collect(done, out=OUT):
    """Everything the report shows, gathered from the stages' outputs: their stamps, each sample
    stage's scores.json, both kinds of codes' factorization report, the runs of results.py that
    ran them (_runs.json) and the machine. The report
    is drawn from this alone (it is saved as docs/results.json), so it can be redrawn without
    out-results (--report)."""
    scores = {}
    for path in sorted(glob.glob(f'{out}/samples/*/scores.json')):
        with open(path) as f:
            scores[os.path.basename(os.path.dirname(path))] = json.load(f)
    factorization = {}          # per factor, the best position's share and the positions alone
    for codes in ('tok', 'oracle'):
        path = f'{out}/{codes}/factorization.json'
        if os.path.exists(path):
            with open(path) as f:
                report = json.load(f)
            factorization[codes] = dict(best_share=np.asarray(report['share']).max(0).tolist(),
                                        alone=report['alone'],
                                        shape_not_color=report['shape_not_color'])
    machine = (f'{platform.machine()} with {os.cpu_count()} CPU cores '
               f'(Python {platform.python_version()})')
    runs = f'{out}/stamps/_runs.json'           # each run's wall time and lanes
    runs = json.load(open(runs)) if os.path.exists(runs) else []
    return dict(stages=done, scores=scores, factorization=factorization, machine=machine,
                dit_iters=DIT_ITERS, runs=runs)


def scores_of(res, name):
    """{mode: scores} of a sample.py stage."""
    return res['scores'][name]


def mean_spread(values):
    """'mean ± half the range' of one value per seed."""
    values = np.asarray(values, float)
    if len(values) == 1:
        return f'{values[0]:.3f}'
    return f'{values.mean():.3f} ± {(values.max() - values.min()) / 2:.3f}'


FIDELITY = [('valid', 'valid'), ('tv_shape', 'TV shape'), ('tv_color', 'TV color'),
            ('tv_background', 'TV background'), ('tv_size', 'TV size'),
            ('tv_joint', 'TV joint'), ('coverage', 'coverage'),
            ('nearest', 'nearest training image (RMS, 0-255)')]


def per_seed(res, stage, mode, key, seeds=SEEDS):
    return [scores_of(res, f'{stage}_s{s}')[mode][key] for s in seeds]


def plus_weights(res):
    """'plain_plus' (EMA) or 'plain_plus_raw': the plain DiT given the prior's time is compared
    with its better weights, by valid share, so the baseline gets its best chance. A loss spike
    late in a run can leave either one drawing noise."""
    valid = {w: scores_of(res, f'{w}_s0')['plain']['valid'] for w in ('plain_plus', 'plain_plus_raw')}
    return max(valid, key=valid.get)


def separated(a, b):
    """Whether two sets' values over the seeds have ranges that do not overlap: the difference
    between them exceeds the spread from seed to seed."""
    return max(a) < min(b) or max(b) < min(a)


def yes_no(answer):
    return '**yes**' if answer else '**no**'


def fidelity_table(res):
    rows = [('prior -> DLC -> DiT (uncond)', 'uncond', 'uncond'),
            ("DiT with cond='none' (plain)", 'plain', 'plain'),
            ('class-conditional DiT, true labels at the training frequencies', 'class', 'class'),
            ('uncond without guidance', 'uncond_cfg1', 'uncond'),
            ('class without guidance', 'class_cfg1', 'class')]
    lines = ['| set | ' + ' | '.join(title for _, title in FIDELITY) + ' |',
             '|---' * (len(FIDELITY) + 1) + '|']
    for title, stage, mode in rows:
        lines.append(f'| {title} | ' + ' | '.join(mean_spread(per_seed(res, stage, mode, k))
                                                   for k, _ in FIDELITY) + ' |')
    for title, stage, mode in [("plain, given the prior's training time in more iterations "
                                "(seed 0)", 'plain_plus_s0', 'plain'),
                               ('the same, its raw weights instead of the EMA', 'plain_plus_raw_s0',
                                'plain'),
                               ('real images: the val split (held out of training)', 'real_val',
                                'real')]:
        scores = scores_of(res, stage)[mode]
        lines.append(f'| {title} | ' + ' | '.join(f'{scores[k]:.3f}' for k, _ in FIDELITY) + ' |')
    return '\n'.join(lines)


def differences_table(res):
    """uncond's mean minus each baseline's, score by score, and whether the seeds' ranges are
    apart ('yes') or overlap ('no')."""
    plus = plus_weights(res)
    others = [('plain', 'plain', SEEDS), (plus, 'plain', (0,)), ('class', 'class', SEEDS)]
    weights = 'raw' if plus.endswith('raw') else 'EMA'
    lines = ['| score | uncond - plain | apart? | uncond - plain given the time '
             f'({weights}) | apart? | uncond - class | apart? |', '|---|---|---|---|---|---|---|']
    for key, title in FIDELITY:
        mine = per_seed(res, 'uncond', 'uncond', key)
        cells = []
        for stage, mode, seeds in others:
            theirs = per_seed(res, stage, mode, key, seeds)
            cells += [f'{np.mean(mine) - np.mean(theirs):+.3f}',
                      'yes' if separated(mine, theirs) else 'no']
        lines.append(f'| {title} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def fidelity_verdict(res):
    """Claim 1 holds when uncond's joint TV is below both DiTs that have no condition at all, by
    more than the seed spread. The class DiT is given the true labels: reported, not required."""
    mine = per_seed(res, 'uncond', 'uncond', 'tv_joint')
    plain = per_seed(res, 'plain', 'plain', 'tv_joint')
    plus = per_seed(res, plus_weights(res), 'plain', 'tv_joint', (0,))
    klass = per_seed(res, 'class', 'class', 'tv_joint')
    below = lambda theirs: np.mean(mine) < np.mean(theirs) and separated(mine, theirs)
    return (f"the pipeline's joint TV ({mean_spread(mine)}) is below that of both DiTs "
            f"without a condition (plain {mean_spread(plain)}; given the prior's time "
            f"{mean_spread(plus)}) by more than the seed spread: {yes_no(below(plain) and below(plus))}. "
            f"Below the class-conditional DiT's, which is given the true labels "
            f"({mean_spread(klass)}): {yes_no(below(klass))}.")


def seeds_table(res, first, columns, rows, seeds=SEEDS):
    """A table of the seeds' 'mean ± spread': columns [(title, score key, or {mode: key})], rows
    [(title, stage, mode)]; a key the mode's scores lack leaves its cell empty."""
    lines = [f'| {first} | ' + ' | '.join(title for title, _ in columns) + ' |',
             '|---' * (len(columns) + 1) + '|']
    for title, stage, mode in rows:
        scores = [scores_of(res, f'{stage}_s{s}')[mode] for s in seeds]
        keys = [key[mode] if isinstance(key, dict) else key for _, key in columns]
        cells = [mean_spread([p[k] for p in scores]) if k in scores[0] else '' for k in keys]
        lines.append(f'| {title} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def composition_table(res):
    rows = [('2 sources: the shape of one, the color of another, a held-out pair', 'compose2',
             'compose'),
            ('3 sources: the same and a random third', 'compose3', 'compose'),
            ('2 sources, soft codes (the averaged distributions)', 'compose2_soft', 'compose'),
            ('3 sources, soft codes', 'compose3_soft', 'compose'),
            ("the prior's samples (uncond)", 'uncond', 'uncond'),
            ("the DiT's ceiling: recon of the ood split's codes", 'ceiling', 'recon')]
    # recon's "kept" is the held-out image's own pair, shown
    shown = dict(compose='unseen_pair', uncond='unseen_pair', recon='kept')
    columns = [('valid', 'valid'), ('from sources', 'from_sources'), ('novel', 'novel'),
               ('held-out pair shown', shown)]
    return seeds_table(res, 'set', columns, rows)


def composition_verdict(res, stage='compose2', seeds=SEEDS):
    """Composition reaches held-out pairs when two sources' composed codes show one more often
    than the prior's samples do (those show a held-out pair only by the DiT's mistakes), by more
    than the seed spread."""
    composed = per_seed(res, stage, 'compose', 'unseen_pair', seeds)
    prior = per_seed(res, 'uncond', 'uncond', 'unseen_pair')
    reached = np.mean(composed) > np.mean(prior) and separated(composed, prior)
    return (f"two sources' composed codes show a held-out pair more often than the "
            f"prior's samples, by more than the seed spread: {yes_no(reached)} "
            f"({mean_spread(composed)} against {mean_spread(prior)}).")


def text_table(res):
    rows = [('captions of val images', 'text_val', 'text'),
            ('"a red square": the 14 seen (shape, color) pairs', 'text_seen', 'text'),
            ('captions of ood images (the 4 held-out pairs)', 'text_ood', 'text'),
            ('"a blue circle": the 4 held-out pairs', 'text_held', 'text'),
            ("the DiT's ceiling: recon of the ood split's codes", 'ceiling', 'recon')]
    columns = [('valid', 'valid'), ('shape and color kept', 'kept'), ('shape kept', 'shape_kept'),
               ('color kept', 'color_kept')]
    return seeds_table(res, 'prompts', columns, rows)


def text_verdict(res, held='text_held', seen='text_seen', seeds=SEEDS):
    """Text reaches held-out pairs when a prompt naming one is drawn as its pair at least half as
    often as a prompt naming a seen pair."""
    held_kept = per_seed(res, held, 'text', 'kept', seeds)
    seen_kept = per_seed(res, seen, 'text', 'kept', seeds)
    return (f"short prompts of held-out pairs are drawn as their pair at least half as "
            f"often as those of seen pairs: {yes_no(np.mean(held_kept) >= np.mean(seen_kept) / 2)} "
            f"({mean_spread(held_kept)} against {mean_spread(seen_kept)}).")


def oracle_section(res):
    """The DiT and the text model trained on the true factors as codes (prepare.py
    --oracle_codes), scored like the DLC rows of sections 2 and 3: what the models do when the
    code is factorized, the ceiling the DLCs are read against."""
    title = '## 4. The oracle control: the same models on a perfectly factorized code'
    seeds = [s for s in SEEDS if f'oracle_text_held_s{s}' in res['scores']]
    if not seeds:
        return f"{title}\n\nNot measured: the oracle stages have not run."
    rows = [("recon of the ood split's oracle codes (the DiT's ceiling)", 'oracle_ceiling',
             'recon'),
            ('2 sources composed: the shape of one, the color of another', 'oracle_compose2',
             'compose'),
            ('text model, "a red square": the 14 seen pairs', 'oracle_text_seen', 'text'),
            ('text model, "a blue circle": the 4 held-out pairs', 'oracle_text_held', 'text')]
    shown = dict(compose='unseen_pair', recon='kept', text='kept')
    columns = [('valid', 'valid'), ('from sources', 'from_sources'), ('novel', 'novel'),
               ('held-out pair shown (text: the prompt\'s pair)', shown)]
    table = seeds_table(res, 'oracle codes (shape, color, background, size)', columns, rows, seeds)
    ceiling = per_seed(res, 'oracle_ceiling', 'recon', 'kept', seeds)
    return f"""{title}

Each image's true factors as its code (L = 4, V = 6), given to the built-in DiT config and the
built-in text model config unchanged (seeds: {', '.join(map(str, seeds))}). A composed code
draws each position from one of its two sources, so about a quarter of the compositions take the
shape of the first and the color of the second.

{table}

Verdicts, read against the DLC rows of sections 2 and 3:
- the DiT draws the held-out pairs from their oracle codes in at least 0.85 of the ood images:
  {yes_no(np.mean(ceiling) >= 0.85)} ({mean_spread(ceiling)});
- {composition_verdict(res, 'oracle_compose2', seeds)}
- {text_verdict(res, 'oracle_text_held', 'oracle_text_seen', seeds)}

How the codes' positions carry the factors (data/shapes/score.py --codes_dir; train codes): per
factor, the best position's I(token; factor | the other factors) as a share of H(factor | the
others), and how many positions carry the factor alone (share >= 0.5, every other < 0.1).

{factorization_table(res)}"""


def factorization_table(res):
    """The factorization report of the run's DLCs and of the oracle codes, as far as written."""
    from data.shapes.prepare import FACTORS
    lines = ['| codes | ' + ' | '.join(f'{f}: best share, alone' for f in FACTORS) +
             ' | positions with shape, not color |', '|---' * (len(FACTORS) + 2) + '|']
    for title, codes in [('DLCs (the built-in tokenizer)', 'tok'), ('oracle', 'oracle')]:
        report = res['factorization'].get(codes)
        if report is None:
            continue
        lines.append(f'| {title} | ' + ' | '.join(f"{b:.2f}, {a}" for b, a in
                                                  zip(report['best_share'], report['alone'])) +
                     f" | {report['shape_not_color']} |")
    return '\n'.join(lines)


def plus_note(done, base):
    """base: the DiT config's iterations when the run was made (a report from before they were
    recorded was made at 24,000)."""
    if 'dit_none_s0' not in done or 'prior' not in done:
        return ''
    # the iterations it ran are in its command; recomputing them needs the stamps' exact seconds
    ran = done.get('dit_none_plus_s0', {}).get('command', '').split('--max_iters=')
    extra = (int(ran[1].split()[0]) if len(ran) > 1 else plus_iters(done, base)) - base
    return (f"The plain DiT given the prior's time: {base:,} + {extra:,} iterations, because "
            f"the prior's training took {done['prior']['seconds']:,.0f} s and the plain DiT's "
            f"{base:,} iterations {done['dit_none_s0']['seconds']:,.0f} s.")


def wall_note(res, hours):
    """The runs' wall time beside the stages' summed times, and how the stages shared the machine;
    nothing for results from before the runs were recorded."""
    runs = res.get('runs')
    if not runs:
        return ''
    ways = {}
    for r in runs:
        threads = 'one thread' if r['threads_per_lane'] == 1 else f"{r['threads_per_lane']} threads"
        way = ('one stage at a time' if r['lanes'] == 1 else
               f"the shared stages first, then each seed's stages in a lane of its own, the "
               f"{r['lanes']} lanes side by side, each lane's processes on {threads}")
        ways[way] = ways.get(way, 0) + 1
    how = (next(iter(ways)) if len(ways) == 1 else
           '; '.join(f'in {n} of the runs, {way}' for way, n in ways.items()))
    wall = sum(r['seconds'] for r in runs) / 3600
    return (f"The wall time of the run: {wall:.1f} hours for those {hours:.1f} hours of stages "
            f"({len(runs)} run{'s' * (len(runs) > 1)} of results.py, a resumed run counting "
            f"each): {how}.\n")


def commands(done):
    """Each stage's command and wall time, as a reader would type it."""
    lines = []
    for name, stamp in done.items():
        interpreter, _, rest = stamp['command'].partition(' ')    # any checkout's python
        command = ('python ' + rest if os.path.basename(interpreter).startswith('python')
                   else stamp['command'])
        command = command.replace(ROOT + '/', '')
        lines += [f"# {name}: {stamp['seconds'] / 60:.1f} min", command]
    return '\n'.join(lines)


def copy_grids(out, assets='assets/results'):
    """The seed-0 grid of each sample stage, as assets/results/<stage>_s0.png."""
    os.makedirs(os.path.join(ROOT, assets), exist_ok=True)
    for grid in sorted(glob.glob(f'{out}/samples/*_s0/*.png')):
        name = os.path.basename(os.path.dirname(grid))
        shutil.copy(grid, os.path.join(ROOT, assets, f'{name}.png'))


def render(res):
    """docs/results.md's text, from the collected results alone."""
    done = res['stages']
    ran_at = {}                 # the stages may have run at several commits (a resumed run)
    for stamp in done.values():
        c = f"`{stamp['commit']}`" if 'commit' in stamp else 'not recorded'
        ran_at[c] = ran_at.get(c, 0) + 1
    ran_at = ', '.join(f'{c} for {n}' for c, n in ran_at.items())
    hours = sum(d['seconds'] for d in done.values()) / 3600
    provenance = f"\n{res['provenance']}\n" if res.get('provenance') else ''
    return f"""# Results: the paper's claims on the built-in data

Written by `make results` (data/shapes/results.py) from docs/results.json, the stages' scores and
stamps; on {res['machine']}, {hours:.1f} hours of stages in all (their wall times are below).
{wall_note(res, hours)}The stages' commits: {ran_at}.
Every set is {N_IMAGES:,} images read by the attribute reader; "±" is half the range over the
training seeds {', '.join(map(str, SEEDS))}. A verdict line is computed from its table.
{provenance}
## 1. Fidelity: does a prior over DLCs with a DLC-conditioned DiT draw the data better than DiTs without DLCs?

{fidelity_table(res)}

uncond against each baseline: the difference of the means, and whether the seeds' ranges are
apart (the difference exceeds the spread) or overlap.

{differences_table(res)}

{plus_note(done, res.get('dit_iters', 24000))}

Verdict: {fidelity_verdict(res)}

## 2. Composition: do two images' DLCs, composed, draw (shape, color) pairs no training image has?

{composition_table(res)}

Verdict: {composition_verdict(res)}

## 3. Text: are prompts that name a held-out (shape, color) pair drawn as that pair?

{text_table(res)}

The ceiling is what the DiT draws from the held-out images' own codes (section 2's last row).

Verdict: {text_verdict(res)}

Grids (seed 0): `assets/results/<set>_s0.png`.

{oracle_section(res)}

## The commands

Every stage, in the order of the stage list, with its wall time (a stage interrupted and
continued counts each of its runs; wall times include whatever else ran on the machine):

```
{commands(done)}
```
"""


def merge(earlier, res):
    """An earlier run's results with some stages run again (or added): theirs replace the
    earlier ones; the stages stay in the stage list's order."""
    for key in ('stages', 'scores', 'factorization'):
        earlier[key].update(res[key])
    # the runs of both reports' folders, each once (the same folder holds the earlier ones too);
    # an earlier report without them leaves the wall time unknown
    if 'runs' in earlier:
        earlier['runs'] += [r for r in res.get('runs', []) if r not in earlier['runs']]
    order = [n for n, _ in stages()]
    earlier['stages'] = dict(sorted(earlier['stages'].items(), key=lambda kv: order.index(kv[0])))
    return earlier


def report(res, path='docs/results.md'):
    """docs/results.json (the collected results) and docs/results.md drawn from it."""
    with open(os.path.join(ROOT, os.path.splitext(path)[0] + '.json'), 'w') as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(ROOT, path), 'w') as f:
        f.write(render(res))
    print(f'wrote {path} and its .json')


if __name__ == '__main__':
    # SIGTERM (a job or its time limit ending) unwinds like ^C, so an interrupted stage keeps its time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)                # score.py's imports, when run as a script
    if sys.argv[1:2] in (['--help'], ['-h']):
        from configurator import help_text
        print(help_text(__file__, {}), end='')
        sys.exit(0)
    if sys.argv[1:2] == ['--real']:
        score_real_images(sys.argv[2])
    elif sys.argv[1:2] == ['--report']:         # redraw docs/results.md from docs/results.json
        with open('docs/results.json') as f:
            report(json.load(f))
    else:
        # --only=oracle: the oracle stages alone, merged into the results of an earlier run
        unknown = [a for a in sys.argv[1:] if a not in ('--only=oracle', '--parallel=False')]
        if unknown:
            print(f"error: no option {unknown[0]!r}: data/shapes/results.py takes --only=oracle, "
                  "--parallel=False, --report, --real <dir> (see --help)", file=sys.stderr)
            sys.exit(2)
        only = [(n, c) for n, c in stages() if 'oracle' in n] if '--only=oracle' in sys.argv else None
        done = run(only=only, parallel='--parallel=False' not in sys.argv)
        copy_grids(OUT)
        res = collect(done)
        if only is not None and os.path.exists('docs/results.json'):
            with open('docs/results.json') as f:
                res = merge(json.load(f), res)
        report(res)
