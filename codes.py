"""
codes.py: the one contract between the components, a code dump and the sidecar beside it.

A tokenizer (or any other source of codes, e.g. the built-in data's oracle codes) writes

    <codes_dir>/codes_<split>.npy   unsigned ints (N, L) in [0, V), row i = item i of the split
    <codes_dir>/codes.json          {"L", "V", "image_size", "source", "splits": {split: N}}

and every consumer (diffusion.py, prior.py, text2dlc.py, sample.py) reads the dump through
load_codes, which checks it against the sidecar, so nothing opens a tokenizer checkpoint (18 GB
on ImageNet) to learn two integers. Dumps written before the sidecar existed keep working: the
contract is then read from the tokenizer.pt beside them, memory-mapped (its metadata is read,
not its tensors), with a note to dump again.
"""
import json
import os

import numpy as np
import torch

from cluster import save_atomic
from configurator import MissingFile, UserError

SIDECAR = 'codes.json'


def dump_path(codes_dir, split):
    return os.path.join(codes_dir, f'codes_{split}.npy')


def code_dtype(V):
    return np.uint16 if V <= 65536 else np.uint32


def write_codes(codes_dir, split, codes, L, V, image_size, source):
    """Write a split's dump and record it in the sidecar (both atomically). A sidecar of another
    contract (a new tokenizer in the same folder) is replaced: its other splits' dumps are stale."""
    if np.asarray(codes).min(initial=0) < 0:
        raise UserError(f"codes for '{dump_path(codes_dir, split)}' hold negative tokens")
    codes = np.asarray(codes).astype(code_dtype(V))
    check_codes(codes, L, V, dump_path(codes_dir, split), fix='(writing it)')
    os.makedirs(codes_dir, exist_ok=True)
    save_atomic(codes, dump_path(codes_dir, split))
    contract = dict(L=int(L), V=int(V), image_size=int(image_size), source=str(source))
    old = read_sidecar(codes_dir)
    splits = old['splits'] if old and {k: old.get(k) for k in contract} == contract else {}
    tmp = os.path.join(codes_dir, f'{SIDECAR}.tmp.{os.getpid()}')
    with open(tmp, 'w') as f:
        json.dump(dict(contract, splits=dict(splits, **{split: len(codes)})), f, indent=1)
    os.replace(tmp, os.path.join(codes_dir, SIDECAR))


def read_sidecar(codes_dir):
    path = os.path.join(codes_dir, SIDECAR)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_contract(codes_dir):
    """{'L', 'V', 'image_size', 'source', 'splits'} of the dumps in codes_dir."""
    contract = read_sidecar(codes_dir)
    if contract is not None:
        return contract
    ckpt_path = os.path.join(codes_dir, 'tokenizer.pt')
    if not os.path.exists(ckpt_path):
        raise MissingFile(f"'{codes_dir}' holds neither {SIDECAR} nor tokenizer.pt, so its "
                                "codes have no L and V: point --codes_dir at the folder a "
                                "tokenizer dumped its codes to (python tokenizer.py --mode=dump)")
    # mmap: the tensors stay on disk, only the pickled metadata is read
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True, mmap=True)
    print(f"note: '{codes_dir}' has no {SIDECAR}; L and V read from {ckpt_path}. Dump the codes "
          "again (python tokenizer.py --mode=dump) to write it.")
    return dict(L=int(ckpt['L']), V=int(ckpt['V']), image_size=int(ckpt.get('image_size', 0)),
                source=ckpt_path, splits={})


def check_codes(codes, L, V, path, n_items=None, fix=None):
    """Refuse codes (N, L) that do not fit the contract: shape, unsigned dtype, tokens < V, and
    (n_items) one row per item of the split."""
    fix = fix or "write it again with python tokenizer.py --mode=dump (the tokenizer it fits)"
    if codes.ndim != 2 or codes.shape[1] != L:
        raise UserError(f"code dump '{path}' has shape {codes.shape}, but its codes have L={L} "
                         f"tokens (expected (N, {L})); {fix}")
    if not np.issubdtype(codes.dtype, np.unsignedinteger):
        raise UserError(f"code dump '{path}' has dtype {codes.dtype}, not unsigned integers; {fix}")
    if codes.size and int(codes.max()) >= V:
        raise UserError(f"code dump '{path}' holds token {int(codes.max())} >= V={V}, the "
                         f"vocabulary size; {fix}")
    if n_items is not None and len(codes) != n_items:
        raise UserError(f"code dump '{path}' has {len(codes)} codes but its split has {n_items} "
                         f"items; {fix}")
    return codes


def load_codes(codes_dir, split, n_items=None, contract=None):
    """A split's dump, checked against the sidecar (and the dataset's item count)."""
    contract = contract or read_contract(codes_dir)
    path = dump_path(codes_dir, split)
    if not os.path.exists(path):
        raise MissingFile(f"code dump '{path}' not found; write it with python tokenizer.py "
                                f"--mode=dump --dump_split={split} --out_dir={codes_dir}")
    codes = np.load(path)
    if split in contract['splits'] and contract['splits'][split] != len(codes):
        raise UserError(f"code dump '{path}' has {len(codes)} codes but {codes_dir}/{SIDECAR} "
                         f"records {contract['splits'][split]}: the dump and its sidecar come "
                         "from different runs; write both again with python tokenizer.py "
                         "--mode=dump")
    return check_codes(codes, contract['L'], contract['V'], path, n_items)


def check_fits(contract, L, V, codes_dir, what, flag='--codes_dir'):
    """The codes in codes_dir must be the kind `what` (a checkpoint) was trained on; the message
    names the script's option (flag) that points at them."""
    if (contract['L'], contract['V']) != (L, V):
        raise UserError(f"the codes in {codes_dir} have L={contract['L']}, V={contract['V']} "
                         f"({contract.get('source', 'its sidecar')}), but {what} was trained on L={L}, V={V}; point "
                         f"{flag} at the codes it was trained on")
