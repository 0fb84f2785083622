"""
`make demo`: the built-in pipeline end to end at full length, then one table of how far each
stage got against its floor, and one labeled picture.

    python data/shapes/demo.py                       # every stage, then the table and the picture
    python data/shapes/demo.py --parallel=False      # one process at a time, all on the console
    python data/shapes/demo.py --report_only=True    # the table and the picture again, from out_dir

The stages are commands of the repository's scripts with the built-in configs (config/*_shapes.py)
as they are, every output in out_dir:
    tokenizer  tokenizer.py: train the ViT + SEM, dump the codes of every split, fit the probe
    dit        diffusion.py: train the DLC-conditioned DiT, redraw the first 500 val codes
    prior      prior.py: train the discrete diffusion prior over codes
    text       text2dlc.py: train the text model on (code, caption) pairs
    samples    sample.py: prior samples (uncond), compositions of pairs of val images whose shape
               and color make a held-out pair, and text: the val captions, and the short prompts
               of the 14 seen (shape, color) pairs ("a red square"), 20 times each
Each command is printed before it runs; each stage's wall time is measured. After the tokenizer,
the DiT, then the prior, run beside the text model (parallel=True): two lanes, every process on
one thread (two torch jobs on 2 cores slow each other far more than 2x unless each has
OMP_NUM_THREADS=1), each stage's output in out_dir/logs/<stage>.log, whose last lines are shown
when the stage ends. A run starts every stage afresh: it does not resume (`make results` does).

Then each stage's quality, read from the files it wrote (probe.pt, recon_val.npz, prior.pt, the
sample runs' scores.json), against FLOORS: one table, out_dir/demo.json with every number and
command, and out_dir/demo.png: val images beside their reconstructions, prior samples, pairs of
sources beside their composition, short prompts under their images.
"""
import json
import os
import shlex
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:                # run as a script: the repository's modules
    sys.path.insert(0, ROOT)
from configurator import MissingFile, UserError, command_line  # noqa: E402
from data.shapes.results import short_prompts  # noqa: E402
from data.shapes.score import held_out_pair_groups, load_meta, reconstruction_scores  # noqa: E402

# -----------------------------------------------------------------------------
# config
out_dir = 'out-demo'
data_dir = 'data/shapes'        # the built-in data (prepare.py): scores and picture read it
parallel = True                 # after the tokenizer: the DiT beside the prior, then the text model
report_only = False             # run nothing: the table, demo.json and demo.png from out_dir
extra = {}                      # more overrides per script, after the demo's own (a later key
                                # wins): {'diffusion.py': '--max_iters=3000 --sample_interval=0'}
# -----------------------------------------------------------------------------
CONFIG = {k: globals()[k] for k in ['out_dir', 'data_dir', 'parallel', 'report_only', 'extra']}

SCRIPTS = ('tokenizer.py', 'diffusion.py', 'prior.py', 'text2dlc.py', 'sample.py')
LANES = (['dit', 'prior'], ['text'])    # after the tokenizer, side by side when parallel: each
                                        # lane about 14 minutes on one core
N_RECON = 500                   # val codes the DiT redraws
N_UNCOND = 500                  # prior samples
N_COMPOSE = 32                  # compositions: the 4 held-out pairs, 8 source pairs each
N_TEXT_VAL = 500                # val captions, one image each
TEXT_SEEN_REPEATS = 20          # images per short prompt of a seen pair

# What a full run of the built-in configs should clear on 2 CPU cores: (direction, floor). A value
# on the wrong side means a stage has regressed, or was cut short.
FLOORS = {
    'probe_val_shape': ('>=', 0.89),        # the tokenizer's linear probe reads val codes' shape
    'recon_shape_and_color': ('>=', 0.78),  # val codes redrawn by the DiT keep shape and color
    'recon_valid': ('>=', 0.98),            # ... and are one clean shape (the attribute reader)
    'prior_val_bits': ('<=', 0.38),         # the prior's held-out ELBO, bits per token
    'uncond_valid': ('>=', 0.91),           # prior samples drawn by the DiT: one clean shape
    'text_val_kept': ('>=', 0.65),          # val captions: the shape and color they name, drawn
    'text_seen_kept': ('>=', 0.55),         # "a red square" for the 14 seen pairs: the same
}
METRICS = [     # (stage, metric, what the table calls it), in the table's order
    ('tokenizer', 'probe_val_shape', 'linear probe on val codes: shape accuracy'),
    ('dit', 'recon_shape_and_color', 'val codes redrawn: shape and color kept'),
    ('dit', 'recon_valid', 'val codes redrawn: valid'),
    ('prior', 'prior_val_bits', 'held-out ELBO, bits/token'),
    ('prior', 'uncond_valid', 'samples drawn by the DiT: valid'),
    ('text', 'text_val_kept', 'val captions: shape and color kept'),
    ('text', 'text_seen_kept', 'seen-pair short prompts: shape and color kept'),
    ('samples', 'compose_unseen_pair', 'compositions showing a held-out pair'),
]
# the sample runs' scores (sample.py's scores.json in out_dir/samples/<run>): (run, mode, score)
SAMPLE_SCORES = {'uncond_valid': ('uncond', 'uncond', 'valid'),
                 'text_val_kept': ('text_val', 'text', 'kept'),
                 'text_seen_kept': ('text_seen', 'text', 'kept'),
                 'compose_unseen_pair': ('compose', 'compose', 'unseen_pair')}


def stages(cfg):
    """{stage: its commands}, in the order they run; a command is a list of words, run in the
    repository root. Each sample run has an out_dir of its own: sample.py refuses to continue
    another run's chunks with other settings."""
    out, py = cfg['out_dir'], sys.executable
    script = lambda name, *args: [py, name, f"config/{name[:-3]}_shapes.py", *args,
                                  *shlex.split(cfg['extra'].get(name, ''))]
    trained = [f'--codes_dir={out}', f'--out_dir={out}']
    sample = lambda run, *args: script(
        'sample.py', f'--tokenizer_dir={out}', f'--diffusion_dir={out}', f'--prior_dir={out}',
        f'--text2dlc_dir={out}', f'--out_dir={out}/samples/{run}', *args)
    seen = short_prompts()[0]
    return {
        'tokenizer': [script('tokenizer.py', f'--out_dir={out}'),
                      script('tokenizer.py', f'--out_dir={out}', '--mode=dump'),
                      script('tokenizer.py', f'--out_dir={out}', '--mode=probe')],
        'dit': [script('diffusion.py', *trained),
                script('diffusion.py', *trained, '--mode=recon', f'--n_recon={N_RECON}',
                       '--split=val')],
        'prior': [script('prior.py', *trained)],
        'text': [script('text2dlc.py', *trained)],
        'samples': [
            sample('uncond', '--mode=uncond', f'--n_samples={N_UNCOND}'),
            sample('compose', '--mode=compose', '--sources=held_out', f'--n_samples={N_COMPOSE}'),
            sample('text_val', '--mode=text', f"--prompts={cfg['data_dir']}/val_captions.txt",
                   f'--n_samples={N_TEXT_VAL}'),
            sample('text_seen', '--mode=text', f'--prompts={seen}',
                   f"--n_samples={TEXT_SEEN_REPEATS * len(seen.split('|'))}")],
    }


# -----------------------------------------------------------------------------
# Running the stages

ONE_THREAD = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
RUNNING, STOPPING = [], threading.Event()   # the lanes' processes; set when a lane failed
LAUNCH = threading.Lock()                   # no lane starts a process while the others are stopped


def tail(path, n=5):
    """The last n lines of a log, each as a terminal shows it (a progress bar's last state)."""
    with open(path, errors='replace') as f:
        lines = [line.split('\r')[-1] for line in f.read()[-20000:].split('\n')]
    return [line for line in lines if line.strip()][-n:]


def minutes(seconds):
    return '-' if seconds is None else f'{seconds / 60:.1f} min'


def run_stage(name, commands, log=None):
    """A stage's commands in turn, each printed before it runs, its output on the console, or
    with log (a path) appended to the log, every process on one thread. Returns the stage's wall
    time in seconds."""
    t0 = time.monotonic()
    if log is not None:
        open(log, 'w').close()          # an earlier run's log goes
    for command in commands:
        print(f'== {name}: {shlex.join(command)}', flush=True)
        if log is None:
            code = subprocess.call(command, cwd=ROOT)
        else:
            with open(log, 'a') as f:
                f.write(f'== {shlex.join(command)}\n')
                f.flush()
                with LAUNCH:
                    if STOPPING.is_set():
                        raise SystemExit(f'stage {name} stopped: the other lane failed')
                    process = subprocess.Popen(command, cwd=ROOT, stdout=f,
                                               stderr=subprocess.STDOUT, env=ONE_THREAD)
                    RUNNING.append(process)
                code = process.wait()
        if code:
            raise SystemExit(f"stage {name} failed (exit {code}): {shlex.join(command)}"
                             + (f'\nsee {log}' if log else ''))
    seconds = time.monotonic() - t0
    if log is not None:
        print(f'== {name} done in {minutes(seconds)}; the end of {log}:\n  '
              + '\n  '.join(tail(log)), flush=True)
    return seconds


def run_lanes(commands, out):
    """Each lane's stages in turn, the lanes side by side; {stage: wall time}. When a stage
    fails, the other lane's process is stopped and the failure is reported."""
    lane = lambda names: {n: run_stage(n, commands[n], f'{out}/logs/{n}.log') for n in names}
    STOPPING.clear()
    RUNNING.clear()
    with ThreadPoolExecutor(len(LANES)) as pool:
        futures = [pool.submit(lane, names) for names in LANES]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f.exception() for f in done if f.exception() is not None]
        if failed:
            with LAUNCH:
                STOPPING.set()
                for process in RUNNING:
                    if process.poll() is None:
                        process.terminate()
            wait(futures)
            raise failed[0]
    return {name: seconds for f in futures for name, seconds in f.result().items()}


def run(cfg):
    """Every stage; what demo.json keeps of the run: its config, commands and wall times."""
    out, commands = cfg['out_dir'], stages(cfg)
    os.makedirs(f'{out}/logs', exist_ok=True)
    t0 = time.monotonic()
    seconds = {'tokenizer': run_stage('tokenizer', commands['tokenizer'])}
    if cfg['parallel']:
        print(f"== the lanes {' | '.join(' then '.join(lane) for lane in LANES)}, side by side, "
              f"one thread each; their output in {out}/logs", flush=True)
        seconds.update(run_lanes(commands, out))
    else:
        seconds.update({n: run_stage(n, commands[n]) for lane in LANES for n in lane})
    seconds['samples'] = run_stage('samples', commands['samples'])
    return dict(config=cfg, total_seconds=time.monotonic() - t0,
                seconds={n: seconds[n] for n in commands},
                commands={n: [shlex.join(c) for c in cs] for n, cs in commands.items()})


# -----------------------------------------------------------------------------
# The report: each stage's quality from its files, the table, demo.json, demo.png

def quality(out, data_dir):
    """{metric: value} read from what the stages wrote; a metric whose file is missing is absent."""
    got = {}
    if os.path.exists(f'{out}/probe.pt'):               # tokenizer.py --mode=probe
        probe = torch.load(f'{out}/probe.pt', map_location='cpu', weights_only=True)
        got['probe_val_shape'] = probe['accuracy'].get('shape')
    if os.path.exists(f'{out}/recon_val.npz'):           # diffusion.py --mode=recon
        recon = reconstruction_scores(data_dir, 'val', np.load(f'{out}/recon_val.npz')['arr_0'])
        got['recon_shape_and_color'] = recon.get('shape_and_color')
        got['recon_valid'] = recon.get('valid')
    if os.path.exists(f'{out}/prior.pt'):                # its last log entry holds the ELBO
        history = torch.load(f'{out}/prior.pt', map_location='cpu', weights_only=True)['history']
        got['prior_val_bits'] = history[-1].get('val_bits') if history else None
    for metric, (run_name, mode, score) in SAMPLE_SCORES.items():
        path = f'{out}/samples/{run_name}/scores.json'
        if os.path.exists(path):
            with open(path) as f:
                got[metric] = json.load(f).get(mode, {}).get(score)
    return {k: v for k, v in got.items() if v is not None}


def meets(value, floor):
    op, level = floor
    return value >= level if op == '>=' else value <= level


def table(metrics, seconds, total_seconds):
    """The final table's text: a row per metric, a stage's name and time on its first row."""
    rows, shown = [], set()
    for stage, key, what in METRICS:
        m = metrics[key]
        first = stage not in shown
        shown.add(stage)
        rows.append([stage if first else '', minutes(seconds.get(stage)) if first else '', what,
                     '-' if m['value'] is None else f"{m['value']:.3f}",
                     ' '.join(map(str, m['floor'])) if m['floor'] else '-',
                     {True: 'yes', False: 'no', None: '-'}[m['met']]])
    header = ['stage', 'wall time', 'quality metric', 'value', 'floor', 'met']
    widths = [max(len(r[j]) for r in rows + [header]) for j in range(len(header))]
    line = lambda r: '  '.join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
    floored = [m for m in metrics.values() if m['floor']]
    return '\n'.join([line(header), line(['-' * w for w in widths])] + [line(r) for r in rows] + [
        f"total wall time {minutes(total_seconds)}; floors met: "
        f"{sum(bool(m['met']) for m in floored)} of {len(floored)}"])


TILE, GAP, GROUP_GAP, MARGIN, TITLE_H, LINE_H = 64, 2, 10, 8, 16, 11
BACKDROP = (225, 225, 225)      # not white: the data has white backgrounds


def draw_gallery(panels, path):
    """One picture of titled panels; a panel is (title, groups), a group a list of (image,
    caption) drawn side by side, the groups apart; images (uint8 HWC) enlarged to TILE px."""
    def width(groups):
        return sum(len(g) * (TILE + GAP) - GAP for g in groups) + GROUP_GAP * (len(groups) - 1)
    heights = [TITLE_H + TILE + MARGIN + (2 * LINE_H if any(c for g in gs for _, c in g) else 0)
               for _, gs in panels]
    canvas = Image.new('RGB', (2 * MARGIN + max(width(gs) for _, gs in panels),
                               MARGIN + sum(heights)), BACKDROP)
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    for (title, groups), height in zip(panels, heights):
        draw.text((MARGIN, y), title, fill=(0, 0, 0))
        x = MARGIN
        for group in groups:
            for image, caption in group:
                tile = Image.fromarray(np.asarray(image)).resize((TILE, TILE), Image.NEAREST)
                canvas.paste(tile, (x, y + TITLE_H))
                for j, text in enumerate(textwrap.wrap(caption, TILE // 6)[:2]):  # 6 px a letter
                    draw.text((x, y + TITLE_H + TILE + 1 + j * LINE_H), text, fill=(0, 0, 0))
                x += TILE + GAP
            x += GROUP_GAP - GAP
        y += height
    canvas.save(path)


def gallery(out, data_dir, path):
    """out_dir/demo.png from the runs' images, a panel for each that is there; the titles."""
    val = np.load(f'{data_dir}/val_images.npy', mmap_mode='r')
    images = lambda p: np.load(p)['arr_0'] if os.path.exists(p) else None
    panels = []
    recon = images(f'{out}/recon_val.npz')
    if recon is not None:
        panels.append(('val image | its reconstruction (tokenizer -> DLC -> DiT)',
                       [[(val[i], ''), (recon[i], '')] for i in range(min(6, len(recon)))]))
    uncond = images(f'{out}/samples/uncond/uncond.npz')
    if uncond is not None:
        panels.append(('prior samples (prior -> DLC -> DiT)', [[(x, '')] for x in uncond[:12]]))
    compose = images(f'{out}/samples/compose/compose.npz')
    if compose is not None:         # sample.py's groups for --sources=held_out (its seed is 0)
        factors = np.load(f'{data_dir}/val_factors.npy')
        groups = held_out_pair_groups(factors, load_meta(data_dir), len(compose), 2, seed=0)
        panels.append(("source A | source B | their composition (A's shape with B's color is a "
                       "held-out pair)", [[(val[a], ''), (val[b], ''), (compose[i], '')]
                                          for i, (a, b) in enumerate(groups[:4])]))
    text = images(f'{out}/samples/text_seen/text.npz')
    if text is not None:
        prompts = short_prompts()[0].split('|')
        panels.append(('short prompt -> text model -> DLC -> DiT',
                       [[(x, prompts[i % len(prompts)])] for i, x in enumerate(text[:12])]))
    if panels:
        draw_gallery(panels, path)
    return [title for title, _ in panels]


def report(cfg, ran):
    """The table (printed), out_dir/demo.json and out_dir/demo.png, from out_dir and the run."""
    out = cfg['out_dir']
    values = quality(out, cfg['data_dir'])
    metrics = {}
    for stage, key, what in METRICS:
        value, floor = values.get(key), FLOORS.get(key)
        met = None if floor is None else value is not None and meets(value, floor)
        metrics[key] = dict(stage=stage, metric=what, value=value, floor=floor, met=met)
    panels = gallery(out, cfg['data_dir'], f'{out}/demo.png')
    text = table(metrics, ran.get('seconds', {}), ran.get('total_seconds'))
    with open(f'{out}/demo.json', 'w') as f:
        json.dump(dict(ran, metrics=metrics, gallery=dict(path=f'{out}/demo.png', panels=panels),
                       table=text), f, indent=1)
    print(f'\n{text}\nwrote {out}/demo.json and {out}/demo.png ({len(panels)} panels)')


def main(cfg):
    unknown = set(cfg['extra']) - set(SCRIPTS)
    if unknown:
        raise UserError(f"--extra names {sorted(unknown)}: its keys are scripts, {SCRIPTS}")
    for name in ('val_images.npy', 'val_factors.npy'):     # what the report reads of the data
        if not os.path.exists(f"{cfg['data_dir']}/{name}"):
            raise MissingFile(f"'{cfg['data_dir']}/{name}' not found: --data_dir is the built-in "
                              "data (python data/shapes/prepare.py writes it)")
    if cfg['report_only'] and not os.path.isdir(cfg['out_dir']):
        raise MissingFile(f"--report_only=True reads a demo's folder; '{cfg['out_dir']}' is not "
                          "there: run python data/shapes/demo.py first, or set --out_dir")
    if cfg['report_only']:          # the commands and times of the run that made out_dir
        path = f"{cfg['out_dir']}/demo.json"
        ran = {}
        if os.path.exists(path):
            with open(path) as f:
                earlier = json.load(f)
            ran = {k: earlier[k] for k in ('config', 'total_seconds', 'seconds', 'commands')
                   if k in earlier}
    else:
        ran = run(cfg)
    report(cfg, ran)


if __name__ == '__main__':
    path = os.path.abspath(__file__)
    os.chdir(ROOT)
    command_line(CONFIG, sys.argv[1:], main, path)
