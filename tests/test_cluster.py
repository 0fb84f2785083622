"""Claims about runs that survive a cluster (cluster.py, in all four trainers): two "nodes" on
loopback take the steps one process takes; a worker SIGKILLed at a random moment is restarted by
torchrun, a SIGTERM or SIGUSR1 stops every rank after the same step with a checkpoint and exit
code 75, and the run launched again ends bitwise where an uninterrupted run ends; a save that
fails halfway leaves the previous checkpoint whole; a non-finite loss or gradient stops the run
before the update. Every address is 127.0.0.1, every port is picked free, and every process a
test starts is ended by that test."""
import glob
import os
import queue
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from codes import write_codes
from conftest import ROOT
import diffusion as D
import prior as P
import text2dlc as X
import tokenizer as T
import test_diffusion
import test_prior
import test_text2dlc
import test_tokenizer

# -- the four trainers, each on a tiny config ------------------------------------------------


@pytest.fixture(scope='module')
def dirs(shapes_dir, tmp_path_factory):
    """The data of each trainer's tiny config: the built-in images, toy codes, toy pairs."""
    codes = tmp_path_factory.mktemp('toy_codes')
    write_codes(codes, 'train', test_prior.toy_codes(1024, 0), 8, 8, 32, 'toy codes')
    pairs = tmp_path_factory.mktemp('toy_pairs')
    codes_array, captions = test_text2dlc.toy_pairs(1024, 0)
    write_codes(pairs, 'train', codes_array, 4, 8, 32, 'toy pairs')
    (pairs / 'train_captions.txt').write_text('\n'.join(captions) + '\n')
    return dict(shapes=shapes_dir, codes=str(codes), pairs=str(pairs))


def tiny(trainer, dirs, out_dir, **kw):
    """Batch 16 as 2 micro-batches of 8 (1 process) or one per process (2 processes); dropout on
    where the model has it; a checkpoint every iteration."""
    kw = {'log_interval': 1, 'ckpt_interval': 1, **kw}
    if trainer == 'tokenizer':      # drop-path is drawn per process: off, so 2 processes = 1
        kw = {'batch_size': 16, 'koleo_weight': 0.0, **kw}
        kw.pop('micro_batch_size', None)
        return test_tokenizer.tiny(dirs['shapes'], out_dir, **kw)
    if trainer == 'diffusion':      # class labels: no tokenizer needed
        return test_diffusion.tiny_cfg(dirs['shapes'], '', out_dir, cond='class', num_classes=24,
                                       **kw)
    if trainer == 'prior':
        return test_prior.tiny_cfg(dirs['codes'], out_dir, **{'dropout': 0.1, **kw})
    return test_text2dlc.tiny_cfg(dirs['pairs'], out_dir, **{'dropout': 0.1, 'noise_caption': True,
                                                            'caption_dropout': 0.3, **kw})


TRAINERS = {'tokenizer': (T, 'tokenizer.py', 'tokenizer.pt'),
            'diffusion': (D, 'diffusion.py', 'diffusion.pt'),
            'prior': (P, 'prior.py', 'prior.pt'),
            'text2dlc': (X, 'text2dlc.py', 'text2dlc.pt')}


def as_args(module, cfg):
    return [f'--{k}={v!r}' if isinstance(v, (str, tuple)) else f'--{k}={v}'
            for k, v in cfg.items() if v != module.CONFIG[k]]


def state_of(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def tensors(state, part):
    """The tensors of a checkpoint part (model, ema, teacher, optimizer state) by name."""
    if part != 'optimizer':
        return state.get(part) or {}
    return {f'{i}.{k}': v for i, s in state['optimizer']['state'].items() for k, v in s.items()
            if torch.is_tensor(v)}


# -- launching two "nodes" with the documented torchrun line, on loopback -----------------------

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def documented_sbatch():
    """The torchrun line of the sbatch example (docs/details.md, "Running on a cluster"), as a
    list of words, and the variables its script exports."""
    text = open(os.path.join(ROOT, 'docs', 'details.md')).read().replace('\\\n', ' ')
    lines = [l for l in text.splitlines() if l.strip().startswith('srun torchrun')]
    assert len(lines) == 1, "docs/details.md's sbatch example should have one `srun torchrun` line"
    words = shlex.split(lines[0].split('#')[0])[1:]
    exports = dict(shlex.split(l.split('#')[0])[1].split('=', 1) for l in text.splitlines()
                   if l.startswith('export '))
    return (words[:-1] if words[-1] == '&' else words), exports


def node_command(port, job, script, args):
    """The documented line with a 2-node job's values: one process a node, loopback addresses."""
    values = {'$SLURM_NNODES': '2', '$GPUS_PER_NODE': '1', '$HEAD': '127.0.0.1',
              '29500': str(port), '$SLURM_JOB_ID': job}
    words = []
    for w in documented_sbatch()[0]:
        for k, v in values.items():
            w = w.replace(k, v)
        words.append(w)
    assert words[0] == 'torchrun' and words[-2:] == ['diffusion.py', 'config/diffusion_imagenet.py']
    # on a cluster torchrun looks up each node's address; here it must be the loopback one
    return [sys.executable, '-m', 'torch.distributed.run', '--local_addr=127.0.0.1'] + \
        words[1:-2] + [script] + args


def processes_with(text):
    """{pid: parent pid} of the processes whose command line holds text."""
    found = {}
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            cmd = open(f'/proc/{pid}/cmdline').read()
            stat = open(f'/proc/{pid}/stat').read()
        except OSError:
            continue
        if text in cmd and int(pid) != os.getpid():
            found[int(pid)] = int(stat.rsplit(')', 1)[1].split()[1])
    return found


class Nodes:
    """Two torchrun agents ("nodes") of one job, their output read line by line as it comes."""
    def __init__(self, script, args):
        port, job = free_port(), f'test{random.randrange(10**9)}'
        env = dict(os.environ, **documented_sbatch()[1], GLOO_SOCKET_IFNAME='lo', PYTHONUNBUFFERED='1',
                   OMP_NUM_THREADS='1')
        self.lines, self.log = queue.Queue(), []
        self.out_dir = next(a for a in args if a.startswith('--out_dir=')).split('=', 1)[1]
        self.out_dir = self.out_dir.strip("'")
        self.agents = [subprocess.Popen(node_command(port, job, script, args), cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True) for _ in range(2)]
        for agent in self.agents:
            threading.Thread(target=self._read, args=(agent,), daemon=True).start()

    def _read(self, agent):
        for line in agent.stdout:
            self.lines.put(line)

    def wait_for(self, pattern, timeout=120):
        """The first match of pattern in a line not read yet."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if all(a.poll() is not None for a in self.agents):
                    break
                continue
            self.log.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        output = ''.join(self.log)[-4000:]
        raise AssertionError(f"no line matched {pattern!r}; the output:\n{output}")

    def workers(self):
        """The pids of the agents' worker processes (their children running the script)."""
        return [pid for pid, parent in processes_with(self.out_dir).items()
                if parent in [a.pid for a in self.agents]]

    def finish(self, timeout=180):
        """Wait for both agents; the whole output."""
        for agent in self.agents:
            agent.wait(timeout)
        time.sleep(0.2)                             # the reader threads' last lines
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return ''.join(self.log)

    def end(self):
        """SIGKILL whatever of the job is left: torchrun starts each worker in a session of its
        own, so they are found by the out_dir in their command line, not by process group."""
        for agent in self.agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
        for pid in processes_with(self.out_dir):
            os.kill(pid, signal.SIGKILL)


def run_nodes(script, args):
    nodes = Nodes(script, args)
    try:
        out = nodes.finish()
        assert [a.returncode for a in nodes.agents] == [0, 0], out[-4000:]
        return out
    finally:
        nodes.end()


# -- the claims -----------------------------------------------------------------------------

N_ITERS = 12


@pytest.fixture(scope='module')
def two_node_runs(dirs, tmp_path_factory):
    """Per trainer, an uninterrupted two-node run of N_ITERS (made once, on first use)."""
    done = {}
    def get(trainer):
        if trainer not in done:
            module, script, ckpt = TRAINERS[trainer]
            out = tmp_path_factory.mktemp(f'{trainer}_two_nodes')
            printed = run_nodes(script, as_args(module, tiny(trainer, dirs, out,
                                                             max_iters=N_ITERS)))
            done[trainer] = state_of(out / ckpt), printed
        return done[trainer]
    return get


@pytest.mark.parametrize('trainer', list(TRAINERS))
def test_two_nodes_on_loopback_take_the_steps_one_process_takes(trainer, dirs, two_node_runs,
                                                                tmp_path):
    module, _, ckpt = TRAINERS[trainer]
    two, printed = two_node_runs(trainer)
    module.train(tiny(trainer, dirs, tmp_path, max_iters=N_ITERS))
    one = state_of(tmp_path / ckpt)
    # the work was split: one run of two processes, not two runs of one that wrote alike
    assert (one['world_size'], two['world_size']) == (1, 2)
    assert len(re.findall(r'\b2 process\(es\)', printed)) == 1 and '1 process(es)' not in printed
    assert one['iter_num'] == two['iter_num'] == N_ITERS
    for k, v in one['model'].items():
        torch.testing.assert_close(v, two['model'][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize('trainer, sig', [('tokenizer', 'SIGTERM'), ('diffusion', 'SIGUSR1'),
                                          ('prior', 'SIGTERM'), ('text2dlc', 'SIGUSR1')])
def test_a_killed_worker_and_a_preemption_lose_nothing(trainer, sig, dirs, two_node_runs,
                                                      tmp_path):
    module, script, ckpt = TRAINERS[trainer]
    args = as_args(module, tiny(trainer, dirs, tmp_path, max_iters=N_ITERS, auto_resume=True))
    rng = random.Random()
    nodes = Nodes(script, args)
    try:
        # 1. a worker is SIGKILLed at a random step: torchrun restarts the group, which resumes
        killed_after = int(nodes.wait_for(rf'iter ({rng.randint(2, 4)}):').group(1))
        victim = rng.choice(nodes.workers())
        os.kill(victim, signal.SIGKILL)
        resumed_at = int(nodes.wait_for(r'resuming from .* at iteration (\d+)').group(1))
        assert 1 <= resumed_at < N_ITERS
        # 2. both nodes are signalled, as SLURM does: every rank stops after the same step
        nodes.wait_for(rf'iter ({resumed_at + rng.randint(1, 2)}):')
        for agent in nodes.agents:
            agent.send_signal(getattr(signal, sig))
        printed = nodes.finish()
    finally:
        nodes.end()
    stops = re.findall(rf'rank (\d): preempted \({sig}\) after iteration (\d+)', printed)
    assert sorted(r for r, _ in stops) == ['0', '1'] and len({i for _, i in stops}) == 1, printed
    stopped_at = int(stops[0][1])
    assert resumed_at < stopped_at < N_ITERS and state_of(tmp_path / ckpt)['iter_num'] == stopped_at
    assert 'exiting with 75' in printed
    # 3. launched again, it continues to the end: bitwise the uninterrupted run's state
    printed = run_nodes(script, args)
    assert f'resuming from {tmp_path / ckpt} at iteration {stopped_at}' in printed
    final, straight = state_of(tmp_path / ckpt), two_node_runs(trainer)[0]
    assert final['iter_num'] == N_ITERS
    for part in ['model', 'ema', 'teacher', 'optimizer']:
        a, b = tensors(final, part), tensors(straight, part)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    assert not glob.glob(str(tmp_path / '*.tmp*'))
    print(f'{trainer}: killed after iteration {killed_after}, resumed at {resumed_at}, '
          f'preempted after {stopped_at}')


@pytest.mark.parametrize('trainer', list(TRAINERS))
def test_one_process_stops_on_sigterm_with_a_checkpoint_and_exit_code_75(trainer, dirs, tmp_path):
    module, script, ckpt = TRAINERS[trainer]
    # no checkpoint but the one the signal makes
    args = as_args(module, tiny(trainer, dirs, tmp_path, max_iters=200, ckpt_interval=1000))
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    proc = subprocess.Popen([sys.executable, script] + args, cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        at = random.randint(2, 5)
        for line in proc.stdout:
            if re.search(rf'iter {at}:', line):
                proc.send_signal(signal.SIGTERM)
                break
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 75, out
    stopped_at = int(re.search(r'preempted \(SIGTERM\) after iteration (\d+)', out).group(1))
    assert at <= stopped_at < 200 and state_of(tmp_path / ckpt)['iter_num'] == stopped_at


# -- crash safety of the checkpoint and the NaN guard, in process ------------------------------

@pytest.mark.parametrize('trainer', list(TRAINERS))
def test_a_save_that_fails_halfway_leaves_the_previous_checkpoint_whole(trainer, dirs, tmp_path,
                                                                        monkeypatch):
    module, _, ckpt = TRAINERS[trainer]
    real_save, saves = torch.save, []
    def save_that_fails_on_the_third_call(obj, f, *a, **kw):
        saves.append(1)
        if len(saves) == 3:
            f.write(b'half of a checkpoint')                  # part of the bytes, then the error
            raise OSError(28, 'No space left on device')
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, 'save', save_that_fails_on_the_third_call)
    with pytest.raises(OSError, match='No space left'):
        module.train(tiny(trainer, dirs, tmp_path, max_iters=5))
    assert state_of(tmp_path / ckpt)['iter_num'] == 2
    assert os.listdir(tmp_path) == [ckpt]                       # no temporary file is left


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps a copy of the parameters after each of its steps."""
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.after_steps = []

    def step(self, *a, **kw):
        out = super().step(*a, **kw)
        self.after_steps.append([p.detach().clone() for g in self.param_groups
                                 for p in g['params']])
        RecordingAdamW.last = self
        return out


LOSSES = {'tokenizer': 'infonce_loss', 'diffusion': 'eps_loss', 'prior': 'diffusion_loss',
          'text2dlc': 'masked_cross_entropy'}


@pytest.mark.parametrize('fault', ['nan loss', 'nan gradient'])
@pytest.mark.parametrize('trainer', list(TRAINERS))
def test_a_non_finite_loss_or_gradient_stops_the_run_before_the_update(trainer, fault, dirs,
                                                                       tmp_path, monkeypatch):
    module, _, ckpt = TRAINERS[trainer]
    real, calls = getattr(module, LOSSES[trainer]), []
    def poisoned(*a, **kw):                   # the 4th call: iteration 3 (one micro-batch each)
        out = real(*a, **kw)
        calls.append(1)
        if len(calls) != 4:
            return out
        loss = out[0] if isinstance(out, tuple) else out
        if fault == 'nan loss':
            loss = loss * float('nan')
        else:                                 # the same finite value; its gradient is 0 * inf
            loss = loss + 0.0 * (loss - loss.detach()).sqrt()
        return (loss,) + out[1:] if isinstance(out, tuple) else loss
    monkeypatch.setattr(module, LOSSES[trainer], poisoned)
    monkeypatch.setattr(torch.optim, 'AdamW', RecordingAdamW)
    cfg = tiny(trainer, dirs, tmp_path, max_iters=8, batch_size=8, micro_batch_size=8,
               ckpt_interval=2)
    with pytest.raises(FloatingPointError, match=rf'at iteration 3.*{ckpt}'):
        module.train(cfg)
    opt = RecordingAdamW.last
    assert len(opt.after_steps) == 3                          # iterations 0, 1, 2, and no more
    now = [p.detach() for g in opt.param_groups for p in g['params']]
    assert all(torch.isfinite(p).all() for p in now)
    assert all(torch.equal(p, q) for p, q in zip(now, opt.after_steps[-1]))   # unchanged
    assert state_of(tmp_path / ckpt)['iter_num'] == 2
