"""
codes.py: the one contract between the components, a code dump and the sidecar beside it.

A tokenizer (or any other source of codes, e.g. the built-in data's oracle codes) writes

    <codes_dir>/codes_<split>.npy   unsigned ints (N, L) in [0, V), row i = item i of the split
    <codes_dir>/codes.json          {"L", "V", "image_size", "source", "splits": {split: N},
                                     "tokenizer_id", "fingerprints": {split: of its images}}

and every consumer (diffusion.py, prior.py, text2dlc.py, sample.py) reads the dump through
load_codes, which checks it against the sidecar, so nothing opens a tokenizer checkpoint (18 GB
on ImageNet) to learn two integers. Dumps written before the sidecar existed keep working: the
contract is then read from the tokenizer.pt beside them, memory-mapped (its metadata is read,
not its tensors), with a note to dump again.

Runs are tied together by identities. A tokenizer run draws an id when it starts (kept in its
checkpoint through resumes); its codes' identity is '<id>@<iteration>', recorded in codes.json
beside a fingerprint of the images each split encoded (a hash of an array's header and some of its
rows, or of the relative paths and sizes of a folder's images). Every checkpoint trained on codes
keeps the identity of its codes, and so does the .json written beside sampled codes (<stem>.json).
A consumer that meets codes, images or checkpoints of different runs refuses them
(check_same_tokenizer, check_same_images), naming both files and what to rerun; allow_mix=True
uses them together anyway. Artifacts written before identities existed are used with a note.
"""
import hashlib
import json
import os
import uuid

import numpy as np
import torch

from cluster import save_atomic
from configurator import MissingFile, UserError
from images import array_path, image_files

SIDECAR = 'codes.json'


def dump_path(codes_dir, split):
    return os.path.join(codes_dir, f'codes_{split}.npy')


def code_dtype(V):
    return np.uint16 if V <= 65536 else np.uint32


def write_codes(codes_dir, split, codes, L, V, image_size, source, tokenizer_id=None,
                fingerprint=None):
    """Write a split's dump and record it in the sidecar (both atomically), with the identity of
    the tokenizer and the fingerprint of the split's images. A sidecar of another contract (a new
    tokenizer in the same folder) is replaced: its other splits' dumps are stale."""
    if np.asarray(codes).min(initial=0) < 0:
        raise UserError(f"codes for '{dump_path(codes_dir, split)}' hold negative tokens")
    codes = np.asarray(codes).astype(code_dtype(V))
    check_codes(codes, L, V, dump_path(codes_dir, split), fix='(writing it)')
    os.makedirs(codes_dir, exist_ok=True)
    save_atomic(codes, dump_path(codes_dir, split))
    contract = dict(L=int(L), V=int(V), image_size=int(image_size), source=str(source),
                    tokenizer_id=tokenizer_id)
    old = read_sidecar(codes_dir)
    same = old and {k: old.get(k) for k in contract} == contract
    splits = old['splits'] if same else {}
    prints = old.get('fingerprints', {}) if same else {}
    tmp = os.path.join(codes_dir, f'{SIDECAR}.tmp.{os.getpid()}')
    with open(tmp, 'w') as f:
        json.dump(dict(contract, splits=dict(splits, **{split: len(codes)}),
                       fingerprints=dict(prints, **{split: fingerprint})), f, indent=1)
    os.replace(tmp, os.path.join(codes_dir, SIDECAR))


def read_sidecar(codes_dir):
    path = os.path.join(codes_dir, SIDECAR)
    if not os.path.exists(path):
        return None
    return read_json(path, 'python tokenizer.py --mode=dump')


def read_json(path, remake):
    """A .json file the scripts wrote; a torn or edited one is named with the command that
    writes it again."""
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"'{path}' is not readable JSON ({e}); write it again: {remake}") from None


def load_array(path, remake, **kwargs):
    """np.load of a file the scripts wrote; a truncated or corrupt one is named with the command
    that writes it again."""
    try:
        return np.load(path, **kwargs)
    except (ValueError, OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise MissingFile(f"'{path}' not found; write it with {remake}") from None
        raise UserError(f"'{path}' is truncated or not a .npy file ({' '.join(str(e).split())}); "
                        f"write it again: {remake}") from None


def read_checkpoint(path, remake):
    """torch.load of a checkpoint (weights only); a missing, truncated or corrupt one is named with
    the command that writes it again."""
    if not os.path.exists(path):
        raise MissingFile(f"checkpoint '{path}' not found; write it with {remake}")
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        reason = ' '.join(str(e).split()).split('. ')[0]
        raise UserError(f"checkpoint '{path}' is truncated or not a checkpoint ({reason}); write "
                        f"it again: {remake}") from None


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
    try:
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True, mmap=True)
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise UserError(f"checkpoint '{ckpt_path}' is truncated or not a checkpoint ({e}); train "
                        "the tokenizer again or restore it") from None
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
    codes = load_array(path, f"python tokenizer.py --mode=dump --dump_split={split} "
                             f"--out_dir={codes_dir}")
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


# -----------------------------------------------------------------------------
# Identities: which tokenizer run made the codes, which images they encode

def new_run_id():
    """The id a tokenizer run draws when it starts (and keeps through resumes)."""
    return uuid.uuid4().hex[:12]


def tokenizer_identity(ckpt):
    """The identity of the codes a tokenizer checkpoint makes: its run and iteration ('oracle' for
    data/shapes' oracle codes); None for a checkpoint written before runs had ids."""
    if not ckpt.get('run_id'):
        return None
    return f"{ckpt['run_id']}@{ckpt.get('iter_num', 0)}"


def fingerprint_images(data_dir, split):
    """A short hash of the images of a split, cheap at ImageNet scale: an array's header and 64 of
    its rows spread over it (memory-mapped), or a folder's images (images.py lists them: other
    files do not count) by relative path and size. None when data_dir holds no such split."""
    h = hashlib.sha1()
    if os.path.exists(array_path(data_dir, split)):
        images = load_array(array_path(data_dir, split), 'python data/shapes/prepare.py',
                            mmap_mode='r')
        h.update(f'{images.shape} {images.dtype}'.encode())
        for i in np.unique(np.linspace(0, len(images) - 1, 64).astype(np.int64)) if len(images) else []:
            h.update(np.ascontiguousarray(images[i]).tobytes())
    elif os.path.isdir(os.path.join(data_dir, split)):
        for relative, path in image_files(os.path.join(data_dir, split)):
            h.update(f'{relative} {os.path.getsize(path)}\n'.encode())
    else:
        return None
    return h.hexdigest()[:16]


def codes_identity(contract):
    """What a checkpoint trained on the codes of a sidecar records: the tokenizer's identity."""
    return contract.get('tokenizer_id')


def identity_path(codes_path):
    """Sampled codes X.npy carry their identity in X.json."""
    return os.path.splitext(codes_path)[0] + '.json'


def write_identity(codes_path, tokenizer_id, source):
    """Beside sampled codes: the identity of the codes the model that drew them was trained on."""
    tmp = f'{identity_path(codes_path)}.tmp.{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(dict(tokenizer_id=tokenizer_id, source=str(source)), f, indent=1)
    os.replace(tmp, identity_path(codes_path))


def read_identity(codes_path):
    """(tokenizer identity, the file that records it) of a code file: sampled codes' X.json, or
    for a tokenizer's dump codes_<split>.npy its folder's codes.json; (None, None) when neither
    records one."""
    if os.path.exists(identity_path(codes_path)):
        info = read_json(identity_path(codes_path), 'the command that drew the codes')
        return info.get('tokenizer_id'), identity_path(codes_path)
    folder = os.path.dirname(codes_path) or '.'
    if os.path.basename(codes_path).startswith('codes_') and read_sidecar(folder):
        return read_sidecar(folder).get('tokenizer_id'), os.path.join(folder, SIDECAR)
    return None, None


def check_same_tokenizer(have, have_where, want, want_where, fix, allow_mix=False):
    """Codes (have, recorded in have_where) given to a model trained on codes of tokenizer run
    `want` (want_where): refused when the runs differ, unless allow_mix; a note when either
    side was written before identities existed."""
    if have is None or want is None:
        old = have_where if have is None else want_where
        print(f"note: {old or 'the codes'} records no tokenizer identity (written before runs had "
              f"ids), so it is not checked against {want_where if have is None else have_where}")
        return
    if have != want and not allow_mix:
        raise UserError(f"{have_where} holds codes of tokenizer run {have}, but {want_where} "
                        f"those of tokenizer run {want}: they do not belong together; {fix} (or "
                        "--allow_mix=True to use them together anyway)")


def check_same_images(contract, codes_dir, split, data_dir, allow_mix=False):
    """The dump of a split must encode the images of data_dir's split (the fingerprint codes.json
    recorded): another dataset's images with as many items would pair each code with a stranger."""
    recorded = contract.get('fingerprints', {}).get(split)
    if recorded is None or allow_mix:
        return
    now = fingerprint_images(data_dir, split)
    if now is not None and now != recorded:
        raise UserError(f"{dump_path(codes_dir, split)} encodes other images than split '{split}' "
                        f"of {data_dir} (fingerprint {recorded} in {os.path.join(codes_dir, SIDECAR)}, "
                        f"{now} now): point --data_dir at the images it encoded, or dump them "
                        f"again: python tokenizer.py --mode=dump --data_dir={data_dir} "
                        f"--dump_split={split} --out_dir={codes_dir} (or --allow_mix=True)")
