"""
cluster.py: what lets the four training scripts run unattended on a cluster. Like
configurator.py it is plumbing, not the method; each trainer calls it in the same few places:

    rank, world, device = setup_distributed(device)   torchrun's RANK / WORLD_SIZE, or one process
    if resuming(cfg, ckpt_path): ...                  init_from='resume', or auto_resume with a
                                                      checkpoint in out_dir: continue from it
    save_atomic(state, ckpt_path)                     a crash or a full disk never tears a file
    if preemption_requested(device): save, then exit_preempted(...)       once per step
    draw_in_chunks(n, chunk_size, parts_dir, ...)     sampling that a killed run continues

Multi-node is plain torchrun: every node runs the same command and they meet at a rendezvous
endpoint (README, "Running on a cluster"); nothing here depends on where the processes are.

Preemption. SLURM ends a job (time limit, preemption, scancel) with SIGTERM, then SIGKILL after
its KillWait; it can also send SIGUSR1 some minutes before the time limit (--signal=USR1@300),
and torchrun forwards the signals it is told to handle (--signals-to-handle). The handler only
sets a flag: the step in flight finishes, every rank learns of the signal at the same iteration
(a max all-reduce of one number per step), rank 0 writes the checkpoint, and every rank exits with
PREEMPTED. Launched again, a run with auto_resume continues exactly where it stopped.

Elastic restarts. Under torchrun --max-restarts=N, a worker that dies (SIGKILL, out of memory, a
lost node) makes torchrun stop the others and start the whole group again; the new group finds
the last checkpoint (auto_resume) and continues from it. What is lost is the iterations since.
Export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the README's script does): with torchrun's shared
store a restarted group can read the dead group's addresses (docs/choices.md).

Sampling (sample.py, prior.py and text2dlc.py --mode=sample) draws in chunks that are saved as
they are drawn, so a killed 50,000-image run continues on any number of processes.
"""
import glob
import json
import math
import os
import re
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from configurator import MissingFile, UserError

PREEMPTED = 75          # the exit code of a preempted run (sysexits' EX_TEMPFAIL: "try again")
_received = []          # the preemption signals this process has received


def setup_distributed(device):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them this is a single process."""
    if int(os.environ.get('WORLD_SIZE', 1)) == 1:
        return 0, 1, device
    if device.startswith('cuda'):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    return dist.get_rank(), dist.get_world_size(), device


def resuming(cfg, ckpt_path):
    """Whether training continues from ckpt_path: init_from='resume' (the file must exist), or
    auto_resume and the file exists, so that a relaunched or restarted job continues by itself
    while its first launch starts as configured (from scratch or from init_from's weights)."""
    if cfg['init_from'] == 'resume' and not os.path.exists(ckpt_path):
        raise MissingFile(f"init_from='resume' but '{ckpt_path}' does not exist; start with "
                                "--init_from=scratch, or use --auto_resume=True to resume only "
                                "when a checkpoint is there")
    return cfg['init_from'] == 'resume' or (cfg['auto_resume'] and os.path.exists(ckpt_path))


def save_atomic(obj, path):
    """torch.save (np.save for an array, np.savez of a dict of arrays for an .npz path) to a
    temporary file in the same folder, flushed to disk, then renamed over path: a crash at any
    moment leaves the old file or the new one, whole. A failed save removes its temporary file;
    a successful one, those that killed runs left."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            if path.endswith('.npz'):
                np.savez(f, **obj)
            elif isinstance(obj, np.ndarray):
                np.save(f, obj)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    for stale in glob.glob(glob.escape(path) + '.tmp.*'):
        os.remove(stale)


def handle_preemption_signals():
    """Called once by each training script's __main__ (not by train(), so that a train() called
    from a notebook or a test leaves the process's signals alone). DataLoader workers forked
    later inherit the handler, so a SIGTERM sent to every process of a job does not kill them
    in the middle of the last step."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: _received.append(signum))


def preemption_requested(device):
    """Whether any process has received SIGTERM or SIGUSR1. Every rank calls it once per step:
    ranks signalled at different moments still stop after the same iteration."""
    flag = torch.tensor(float(len(_received) > 0), device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def exit_preempted(rank, world, iter_num, ckpt_path):
    """After rank 0 has saved: wait for it, say so, and exit with PREEMPTED on every rank."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    names = ', '.join(signal.Signals(s).name for s in sorted(set(_received))) or 'another rank'
    print(f"rank {rank}: preempted ({names}) after iteration {iter_num}, saved in {ckpt_path}; "
          f"exiting with {PREEMPTED}. Launch again with --auto_resume=True to continue.",
          flush=True)
    sys.exit(PREEMPTED)


def draw_in_chunks(n, chunk_size, parts_dir, run_info, rank, world, draw, desc='chunks'):
    """Samples 0 .. n-1 in chunks of consecutive indices, chunk j = [j chunk_size, (j + 1)
    chunk_size), each written to parts_dir/<j:06d>.npz as soon as it is drawn, with the rank and
    world that drew it. A killed run launched again with the same run_info (any JSON dict of the
    settings that change the output), on any number of processes, draws only the missing chunks;
    a chunk does not depend on who draws it, so neither does the result. draw(indices) returns a
    dict of arrays, a row per index. Rank 0 returns the dict of full (n, ...) arrays (memmaps in
    parts_dir), the other ranks None; the caller removes parts_dir once its outputs are written."""
    os.makedirs(parts_dir, exist_ok=True)
    info_path = os.path.join(parts_dir, 'run.json')
    run_info = json.loads(json.dumps(run_info))                 # tuples as lists, as read back
    if os.path.exists(info_path):
        with open(info_path) as f:
            saved = json.load(f)
        differ = sorted(k for k in saved.keys() | run_info.keys()
                        if saved.get(k) != run_info.get(k))
        if differ:
            changes = '; '.join(f"{k}: {saved.get(k)!r} there, {run_info.get(k)!r} now"
                                for k in differ)
            raise UserError(f"{parts_dir} holds the chunks of a run with other settings "
                             f"({changes}): relaunch with that run's settings to finish it, or "
                             "delete the folder to start over")
    elif rank == 0:
        with open(info_path + '.tmp', 'w') as f:
            json.dump(run_info, f, indent=1)
        os.replace(info_path + '.tmp', info_path)
    n_chunks = math.ceil(n / chunk_size)
    done = {int(name[:6]) for name in os.listdir(parts_dir) if re.fullmatch(r'\d{6}\.npz', name)}
    if world > 1:
        dist.barrier()                                  # every rank has seen the same chunks
    missing = [j for j in range(n_chunks) if j not in done]
    mine = missing[rank::world]
    bar = tqdm(total=n_chunks, initial=len(done), desc=desc, disable=rank != 0,
               dynamic_ncols=True)
    for j in mine:
        arrays = draw(list(range(j * chunk_size, min(n, (j + 1) * chunk_size))))
        save_atomic(dict(arrays, rank=np.array(rank), world=np.array(world)),
                    os.path.join(parts_dir, f'{j:06d}.npz'))
        bar.update(min(world, n_chunks - bar.n))
    bar.close()
    print(f"rank {rank} of {world}: drew {len(mine)} of {n_chunks} chunks "
          f"({len(done)} were already done)")
    if world > 1:
        dist.barrier()
    if rank:
        return None
    full = {}                       # on disk, not in memory: 50,000 ImageNet images are 9.8 GB
    for j in range(n_chunks):
        with np.load(os.path.join(parts_dir, f'{j:06d}.npz')) as chunk:
            for key in set(chunk.files) - {'rank', 'world'}:
                part = chunk[key]
                if key not in full:
                    full[key] = np.lib.format.open_memmap(
                        os.path.join(parts_dir, f'{key}.npy'), mode='w+', dtype=part.dtype,
                        shape=(n,) + part.shape[1:])
                full[key][j * chunk_size:j * chunk_size + len(part)] = part
    for array in full.values():
        array.flush()
    return full
