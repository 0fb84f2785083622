"""
cluster.py: what lets the four training scripts run unattended on a cluster. Like
configurator.py it is plumbing, not the method; each trainer calls it in the same few places:

    rank, world, device = setup_distributed(device)   torchrun's RANK / WORLD_SIZE, or one process
    if resuming(cfg, ckpt_path): ...                  init_from='resume', or auto_resume with a
                                                      checkpoint in out_dir: continue from it
    save_atomic(state, ckpt_path)                     a crash or a full disk never tears a file
    if preemption_requested(device): save, then exit_preempted(...)       once per step

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
"""
import glob
import os
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist

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
        raise FileNotFoundError(f"init_from='resume' but '{ckpt_path}' does not exist; start with "
                                "--init_from=scratch, or use --auto_resume=True to resume only "
                                "when a checkpoint is there")
    return cfg['init_from'] == 'resume' or (cfg['auto_resume'] and os.path.exists(ckpt_path))


def save_atomic(obj, path):
    """torch.save (np.save for an array) to a temporary file in the same folder, flushed to disk,
    then renamed over path: a crash at any moment leaves the old file or the new one, whole. A
    failed save removes its temporary file; a successful one, those that killed runs left."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            if isinstance(obj, np.ndarray):
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
