"""
Scores of generated images and codes on the built-in data, shared by sample.py and by this file
as a script, so that everything is measured the same way. The trainers only write arrays.

Images are judged by the attribute reader of prepare.py (read_attributes): valid (one clean
shape), then the factors it reads against those the image should have. Codes are judged by how
their positions carry the factors (factorization) and by the tokenizer's linear probe (probe.pt,
written by tokenizer.py --mode=probe), which reads factors from codes alone, before any DiT.

    python data/shapes/score.py --codes_dir=out-shapes       a folder of dumps: factorization, and
                                                             with probe.pt the held-out pairs' rows
    python data/shapes/score.py --images=X.npz [--split=val] images: against the split's items
                                                             (recon), or the factor histograms
    python data/shapes/score.py --samples=X.npy --codes_dir=D [--prompts=P.txt]
                                                             sampled codes read by D's probe

    reconstruction_scores   recon: the share of images that keep their source's factors
    factors_kept            recon and class in sample.py: shape and color kept
    composition_scores      compose: factors taken from the sources, novel, a held-out pair
    named_factors_kept      text: each factor the prompt names, kept
    histogram_scores        unconditional images: per factor, total variation to the training set
    joint_scores            ... and of the joint histogram of all four factors, and its coverage
    nearest_distances       per image, the pixel distance to the nearest training image (copies?)
    held_out_pair_groups    composition sources whose shape and color make a held-out pair
    code_histograms         sampled codes: the probe's factor histograms against training codes
    factorization           per position and factor, I(token; factor | the other factors)
    compositionality        how the probe and the nearest training code read held-out pairs
    print_table             the table of every sample.py mode's scores
"""
import json
import os
import sys

import numpy as np
import torch

if __name__ == '__main__':              # run as a script: the repository's modules
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from codes import (SIDECAR, check_codes, check_same_images, check_same_tokenizer, codes_identity,
                   dump_path, load_array, load_codes, read_contract, read_identity)
from configurator import UserError, MissingFile, command_line
from data.shapes.prepare import FACTORS, parse_caption, read_attributes
from tokenizer import probe_predict     # the tokenizer's linear probe reads factors from codes


# -----------------------------------------------------------------------------
# config, as a script (one of images, samples with codes_dir, or codes_dir alone)
codes_dir = ''                  # a folder of dumps (and probe.pt): its factorization, or the probe
                                # that reads --samples
images = ''                     # generated images, an .npz (arr_0 uint8 NHWC)
samples = ''                    # sampled codes, an .npy (prior.py, text2dlc.py), with --codes_dir
prompts = ''                    # with --samples: the prompts the codes were drawn from, a file
split = ''                      # with --images: the split they reconstruct ('' = unconditional)
data_dir = 'data/shapes'
allow_mix = False               # True: score codes of another tokenizer or dataset anyway
# -----------------------------------------------------------------------------
CONFIG = {k: globals()[k] for k in ['codes_dir', 'images', 'samples', 'prompts', 'split',
                                    'data_dir', 'allow_mix']}


def load_meta(data_dir):
    """The built-in dataset's meta.json (names, palettes, held-out pairs), or None elsewhere."""
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_builtin(data_dir, images):
    """The reader's factors of uint8 images (N, H, W, 3) and the dataset's meta, or (None, None)
    when data_dir is not the built-in dataset."""
    meta = load_meta(data_dir)
    return (None, None) if meta is None else (read_attributes(images, meta), meta)


def histogram_tv(a, b, n_bins):
    """Total variation between the histograms of two integer arrays over n_bins values."""
    pa = np.bincount(a, minlength=n_bins) / max(len(a), 1)
    pb = np.bincount(b, minlength=n_bins) / max(len(b), 1)
    return 0.5 * float(np.abs(pa - pb).sum())


def factors_kept(read, shape, color):
    """The share of images read as the given shape and color (N,) together."""
    return float(((read['shape'] == shape) & (read['color'] == color)).mean())


def reconstruction_scores(data_dir, split, images):
    """Items 0..n-1 of a split, reconstructed: per factor the share that keeps its source's."""
    read, _ = read_builtin(data_dir, images)
    if read is None:
        return {}
    factors = np.load(os.path.join(data_dir, f'{split}_factors.npy'))[:len(images)]
    same = {name: read[name] == factors[:, j] for j, name in enumerate(FACTORS)}
    scores = dict(valid=float(read['valid'].mean()), shape=float(same['shape'].mean()),
                  color=float(same['color'].mean()),
                  shape_and_color=factors_kept(read, factors[:, 0], factors[:, 1]),
                  background=float(same['background'].mean()), size=float(same['size'].mean()))
    print('attribute reader on the reconstructions (fraction of items whose source factor is '
          'kept):')
    for k, v in scores.items():
        print(f"  {k:<16} {v:.3f}")
    return scores


def histogram_scores(data_dir, images):
    """The reader's valid fraction; per factor, the total variation between the histogram of
    the valid images and that of the training set (background: every clean border); the same
    for all four jointly, the coverage of the training set's combinations, and the median
    distance to the nearest training image (a model that copies has 0)."""
    read, meta = read_builtin(data_dir, images)
    if read is None:
        return {}
    factors = np.load(os.path.join(data_dir, 'train_factors.npy'))
    scores = dict(valid=float(read['valid'].mean()))
    print(f"attribute reader on {len(images)} images: valid {scores['valid']:.3f}; per factor, the "
          "share of each value among the valid images vs the training set:")
    for j, name in enumerate(FACTORS):
        values = meta[name]
        got = read[name][read['valid'] if name != 'background' else read['background'] >= 0]
        p = np.bincount(got, minlength=len(values)) / max(len(got), 1)
        q = np.bincount(factors[:, j], minlength=len(values)) / len(factors)
        scores[f'tv_{name}'] = histogram_tv(got, factors[:, j], len(values))
        shares = ' '.join(f'{v}:{a:.2f}/{b:.2f}' for v, a, b in zip(values, p, q))
        print(f"  {name:<11} TV {scores[f'tv_{name}']:.3f}   {shares}")
    scores.update(joint_scores(read, factors, meta))
    train = np.load(os.path.join(data_dir, 'train_images.npy'), mmap_mode='r')
    scores['nearest'] = float(np.median(nearest_distances(images, np.asarray(train))))
    print(f"  all four   TV {scores['tv_joint']:.3f}   coverage of the training split's "
          f"combinations {scores['coverage']:.3f}; a held-out (shape, color) pair "
          f"{scores['unseen_pair']:.3f}; median RMS distance to the nearest training image "
          f"{scores['nearest']:.1f} (0-255)")
    return scores


def joint_cells(values, meta):
    """The cell of each row of (shape, color, background, size) indices, in [0, 3 * 6 * 3 * 2)."""
    sizes = [len(meta[name]) for name in FACTORS]
    return np.ravel_multi_index([np.asarray(v) for v in values], sizes), int(np.prod(sizes))


def joint_scores(read, train_factors, meta):
    """The valid images' joint histogram of (shape, color, background, size) against the
    training split's: its total variation; coverage, the share of the cells that the training
    split holds (the combinations it has) reached by at least one valid image; and the share of
    all images that are valid and show a (shape, color) pair held out of training."""
    valid = read['valid']
    got, n_cells = joint_cells([read[name][valid] for name in FACTORS], meta)
    want, _ = joint_cells(train_factors.T, meta)
    held_out = {tuple(p) for p in meta.get('held_out', [])}
    unseen = [(int(s), int(c)) in held_out for s, c in zip(read['shape'], read['color'])]
    return dict(tv_joint=histogram_tv(got, want, n_cells),
                coverage=float(np.isin(np.unique(want), got).mean()),
                unseen_pair=float(np.mean(valid & np.array(unseen, bool))))


def nearest_distances(images, reference, chunk=512):
    """Per image, the root-mean-square pixel difference (0-255) to its nearest reference image,
    all uint8 (N, H, W, 3): 0 for a copy of a reference image."""
    a = images.reshape(len(images), -1).astype(np.float32)
    b = reference.reshape(len(reference), -1).astype(np.float32)
    b_sq = (b ** 2).sum(1)
    best = np.full(len(a), np.inf, dtype=np.float32)
    for start in range(0, len(b), chunk):           # ||x - y||^2 = |x|^2 - 2 x.y + |y|^2
        part = b[start:start + chunk]
        d = (a ** 2).sum(1)[:, None] - 2 * a @ part.T + b_sq[start:start + chunk][None]
        best = np.minimum(best, d.min(1))
    return np.sqrt(np.maximum(best, 0) / a.shape[1])


def held_out_pair_groups(factors, meta, n, k=2, seed=0):
    """n groups of k items of a split ((N, 4) factors) whose first item's shape and second
    item's color make one of the pairs held out of training (the held-out pairs in turn); any
    further items are drawn at random. A composition that takes its shape from the first and its
    color from the second shows a combination no training image has."""
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(n):
        shape, color = meta['held_out'][i % len(meta['held_out'])]
        first = rng.choice(np.flatnonzero(factors[:, 0] == shape))
        second = rng.choice(np.flatnonzero((factors[:, 1] == color) & (factors[:, 0] != shape)))
        groups.append([int(first), int(second)] + [int(m) for m in rng.choice(len(factors), k - 2)])
    return groups


def composition_scores(read, factors, groups, meta):
    """Images composed from groups of dataset items (factors: the split's (N, 4)): the share
    that is valid with every one of shape, color, background taken from some source; of those,
    the share equal to no single source (novel); and the share showing a held-out pair."""
    got = np.stack([read['shape'], read['color'], read['background']], axis=1)         # (N, 3)
    from_sources = np.array([all(got[i, j] in factors[g, j] for j in range(3))
                             for i, g in enumerate(groups)])
    novel = np.array([not any((got[i] == factors[m, :3]).all() for m in g)
                      for i, g in enumerate(groups)])
    held_out = {tuple(p) for p in meta['held_out']}
    unseen = np.array([(int(s), int(c)) in held_out for s, c in got[:, :2]])
    valid = read['valid']
    return dict(from_sources=float(np.mean(valid & from_sources)),
                novel=float(np.mean(valid & from_sources & novel)),
                unseen_pair=float(np.mean(valid & unseen)))


def named_factors_kept(read, prompts, meta):
    """For factors read from images or codes ({factor: (N,) ints}) and the prompts they were made
    from: per factor, the share kept among the prompts that name it, and 'shape_and_color' among
    those that name both."""
    named = [parse_caption(p, meta) for p in prompts]
    scores = {}
    for factor in FACTORS:
        rows = [i for i, f in enumerate(named) if factor in f]
        if rows and factor in read:
            scores[factor] = float(np.mean([read[factor][i] == named[i][factor] for i in rows]))
    both = [i for i, f in enumerate(named) if 'shape' in f and 'color' in f]
    if both:
        scores['shape_and_color'] = float(np.mean([read['shape'][i] == named[i]['shape'] and
                                                   read['color'][i] == named[i]['color']
                                                   for i in both]))
    return scores


def code_histograms(probe, reference, sets):
    """The probe's reading of each set of codes ({column: (N, L)}) against its reading of the
    reference codes: per label and for shape x color x background jointly, the total variation
    between the histograms. Prints one column per set; returns {row name: {set: tv}}."""
    want = probe_predict(probe, reference)
    got = {s: probe_predict(probe, codes) for s, codes in sets.items()}
    n_classes = {k: probe['labels'][k]['bias'].numel() for k in want}
    rows = {k: {s: histogram_tv(g[k], want[k], n_classes[k]) for s, g in got.items()} for k in want}
    joint = [k for k in ('shape', 'color', 'background') if k in want]
    if joint:
        sizes = [n_classes[k] for k in joint]
        index = lambda d: np.ravel_multi_index([d[k] for k in joint], sizes)
        rows[' x '.join(joint)] = {s: histogram_tv(index(g), index(want), int(np.prod(sizes)))
                                   for s, g in got.items()}
    print(f"total variation between the probe's factor histograms and those of {len(reference)} "
          "training codes:")
    print(f"  {'':<28}" + ''.join(f"{s:>14}" for s in sets))
    for name, tvs in rows.items():
        print(f"  {name:<28}" + ''.join(f"{tvs[s]:>14.3f}" for s in sets))
    return rows


def print_table(results):
    """One row per sample.py mode ({mode: scores, with 'seconds'}): what `make demo` ends with."""
    columns = [('n', 'images'), ('valid', 'valid'), ('kept', 'shape+color kept'),
               ('from_sources', 'from sources'), ('novel', 'novel'), ('unseen_pair', 'unseen pair'),
               ('tv', 'TV shape/color/bg/size'), ('time', 'time')]
    rows = []
    for mode, s in results.items():
        row = dict(s, time=f"{s['seconds']:.0f} s")
        if 'tv_shape' in s:
            row['tv'] = '/'.join(f"{s['tv_' + k]:.2f}" for k in FACTORS)
        cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
        rows.append([mode] + [cell(row.get(k, '-')) for k, _ in columns])
    header = ['mode'] + [title for _, title in columns]
    widths = [max(len(r[j]) for r in rows + [header]) for j in range(len(header))]
    print()
    for r in [header] + rows:
        print('  '.join(v.ljust(w) for v, w in zip(r, widths)))


# -----------------------------------------------------------------------------
# Codes of the built-in data: are they factorized, and how do held-out pairs read?
#     python data/shapes/score.py --codes_dir=out-shapes      (after tokenizer.py --mode=dump,
#                                                              and --mode=probe for the probe rows)

def entropy(*columns):
    """The plug-in joint entropy (nats) of non-negative integer columns (N,)."""
    key = np.zeros(len(columns[0]), dtype=np.int64)
    for c in columns:                          # one integer per row: mixed radix
        key = key * (int(c.max()) + 1) + c
    counts = np.bincount(np.unique(key, return_inverse=True)[1].reshape(-1))
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def conditional_mi(token, factor, given):
    """The plug-in I(token; factor | given) in nats."""
    return entropy(token, given) + entropy(factor, given) - entropy(token, factor, given) \
        - entropy(given)


def shuffled_within(factor, given, seed=0):
    """The factor permuted within each value of `given`: a column that tells a token nothing
    beyond `given`, whose plug-in information is the estimator's bias on this many samples."""
    shuffled, rng = factor.copy(), np.random.default_rng(seed)
    for g in np.unique(given):
        at = np.flatnonzero(given == g)
        shuffled[at] = factor[rng.permutation(at)]
    return shuffled


def factorization(codes, factors, carries=0.5, alone=0.1):
    """Per position l and factor f: I(c_l; f | the other factors) less its bias (the same with f
    shuffled within each cell of the others), and that as a share of
    H(f | the other factors), the most any token can carry of f. A position carries f when its
    share is >= carries, and carries it alone when every other factor's share is < alone. A
    factorized code has positions that carry one factor alone; an entangled one mixes them. Unlike
    a probe, this does not reward a code for reading shape from color (which training allows)."""
    n_factors = factors.shape[1]
    info = np.zeros((codes.shape[1], n_factors))
    ceiling = np.zeros(n_factors)
    for j in range(n_factors):
        others = np.delete(factors, j, axis=1)
        given = np.unique(others, axis=0, return_inverse=True)[1].reshape(-1)
        ceiling[j] = entropy(factors[:, j], given) - entropy(given)
        shuffled = shuffled_within(factors[:, j], given)
        for l in range(codes.shape[1]):
            token = codes[:, l].astype(np.int64)
            info[l, j] = max(conditional_mi(token, factors[:, j], given)
                             - conditional_mi(token, shuffled, given), 0.0)
    share = info / ceiling
    carry = share >= carries
    pure = carry & ((share >= alone).sum(1, keepdims=True) == 1)
    return dict(info=info, share=share, ceiling=ceiling, carrying=carry.sum(0), alone=pure.sum(0))


def print_factorization(report, names, split):
    info, share = report['info'], report['share']
    print(f"factorization ({split} codes): per factor f, I(token; f | the other factors) in nats "
          "at the best position, as a share of H(f | the others), and how many positions carry f "
          "(share >= 0.5), and carry it alone (every other factor < 0.1):")
    print(f"  {'factor':<12}{'H(f|others)':>12}{'best I':>8}{'share':>7}{'carry':>7}{'alone':>7}")
    for j, name in enumerate(names):
        l = int(share[:, j].argmax())
        print(f"  {name:<12}{report['ceiling'][j]:>12.3f}{info[l, j]:>8.3f}{share[l, j]:>7.2f}"
              f"{report['carrying'][j]:>7d}{report['alone'][j]:>7d}")
    shape_not_color = int(((share[:, 0] >= 0.5) & (share[:, 1] < 0.1)).sum())
    print(f"  positions carrying shape and not color: {shape_not_color} of {len(share)}")
    return shape_not_color


def mutual_information(codes, labels, V):
    """Per position l, I(c_l; y) in nats between the token at l and a label, from the empirical
    joint: sum over (v, y) of p(v, y) log(p(v, y) / (p(v) p(y)))."""
    n_classes = int(labels.max()) + 1
    mi = np.zeros(codes.shape[1])
    for l in range(codes.shape[1]):
        joint = np.bincount(codes[:, l].astype(np.int64) * n_classes + labels,
                            minlength=V * n_classes).reshape(V, n_classes) / len(codes)
        independent = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
        seen = joint > 0
        mi[l] = float((joint[seen] * np.log(joint[seen] / independent[seen])).sum())
    return mi


def nearest_codes(codes, labels, ref_codes, ref_labels, chunk=128):
    """Each code's Hamming distance to its nearest reference code, and per label the share of
    those nearest codes (all, when several tie) that carry the code's label."""
    ref = torch.as_tensor(ref_codes.astype(np.int64))
    dist, same = [], {name: [] for name in labels}
    for start in range(0, len(codes), chunk):
        block = torch.as_tensor(codes[start:start + chunk].astype(np.int64))
        d = (block[:, None, :] != ref[None]).sum(-1)                      # (chunk, N_ref)
        nearest = (d == d.min(1, keepdim=True).values).float()            # ties all count
        dist.append(d.min(1).values.numpy())
        for name, y in labels.items():
            match = torch.as_tensor(y[start:start + chunk, None] == ref_labels[name][None])
            same[name].append(((nearest * match).sum(1) / nearest.sum(1)).numpy())
    return np.concatenate(dist), {name: np.concatenate(v) for name, v in same.items()}


def compositionality(probe, V, train_codes, train_labels, splits):
    """How codes of held-out factor combinations read: the probe on each split, each code's
    nearest training code, and per position the tokens' information about each factor. These
    rows are biased against a factorized code: the probe and the nearest training code learn
    from training pairs, where color predicts shape (a classifier on the oracle code reads ood
    pairs right about a quarter of the time). Judge codes by the factorization report and by
    what the DiT draws from them."""
    report = {}
    for split, (codes, labels) in splits.items():
        read = probe_predict(probe, codes)
        dist, same = nearest_codes(codes, labels, train_codes, train_labels)
        report[split] = dict(probe={n: float((read[n] == labels[n]).mean()) for n in labels},
                             nearest_hamming_median=float(np.median(dist)),
                             nearest_same={n: float(v.mean()) for n, v in same.items()})
    mi = {name: mutual_information(train_codes, y, V) for name, y in train_labels.items()}
    print("compositionality (biased: the probe and the nearest code learn from training pairs, "
          "in which color predicts shape): probe fit on train codes; nearest = the nearest train "
          "code(s) by Hamming distance")
    def row(label, values, fmt):
        print(f"{label:<34}" + ''.join(f"{v:>8{fmt}}" for v in values))
    row('', splits, '')
    for name in train_labels:
        row('probe ' + name, [report[s]['probe'][name] for s in splits], '.3f')
    row('nearest: median Hamming distance', [report[s]['nearest_hamming_median'] for s in splits],
        '.0f')
    for name in train_labels:
        row('nearest: same ' + name, [report[s]['nearest_same'][name] for s in splits], '.3f')
    print(f"mutual information of each position's token with each factor (train codes, nats, "
          f"min / mean / max over the {train_codes.shape[1]} positions):")
    for name in train_labels:
        print(f"  {name:<12} {mi[name].min():.3f} / {mi[name].mean():.3f} / {mi[name].max():.3f}")
    report['mutual_information'] = {n: v.tolist() for n, v in mi.items()}
    return report


def score_codes(codes_dir, data_dir='data/shapes', allow_mix=False):
    """The factorization report of a folder of dumps (a tokenizer's, or the oracle's), and with
    its probe.pt the compositionality rows; saved to codes_dir/factorization.json. Dumps of
    another dataset's images are refused (unless allow_mix)."""
    contract, meta = read_contract(codes_dir), load_meta(data_dir)
    factors = {split: np.load(os.path.join(data_dir, f'{split}_factors.npy'))
               for split in ('train', 'val', 'ood')}
    codes = {split: load_codes(codes_dir, split, len(f), contract)
             for split, f in factors.items() if os.path.exists(dump_path(codes_dir, split))}
    for split in codes:
        check_same_images(contract, codes_dir, split, data_dir, allow_mix)
    print(f"codes in {codes_dir}: L={contract['L']} V={contract['V']} ({contract['source']})")
    report = factorization(codes['train'], factors['train'])
    out = dict(shape_not_color=print_factorization(report, FACTORS, 'train'),
               **{k: np.asarray(v).tolist() for k, v in report.items()})
    probe_path = os.path.join(codes_dir, 'probe.pt')
    if os.path.exists(probe_path):
        probe = torch.load(probe_path, map_location='cpu', weights_only=True)
        labels = lambda split: {name: factors[split][:, j] for j, name in enumerate(FACTORS)}
        splits = {split: (codes[split], labels(split)) for split in ('val', 'ood') if split in codes}
        out['compositionality'] = compositionality(probe, contract['V'], codes['train'],
                                                   labels('train'), splits)
    with open(os.path.join(codes_dir, 'factorization.json'), 'w') as f:
        json.dump(out, f, indent=1)
    return out


def score_images(path, data_dir='data/shapes', split=''):
    """Generated images (an .npz, arr_0 uint8 NHWC: diffusion.py --mode=recon or decode, sample.py)
    read by the attribute reader: against items 0..n-1 of split (reconstructions), or without a
    split, their factor histograms against the training set's."""
    images = np.load(path)['arr_0']
    return reconstruction_scores(data_dir, split, images) if split else \
        histogram_scores(data_dir, images)


def score_samples(path, codes_dir, data_dir='data/shapes', prompts='', n_reference=10000,
                  allow_mix=False):
    """Sampled codes (an .npy: prior.py's samples, text2dlc.py's text codes) read by the
    tokenizer's probe (codes_dir/probe.pt): with prompts (a file, one per code), the share whose
    factors are the ones the prompt names, which judges a text model before any DiT draws its
    codes; without, the total variation of the factor histograms to the training codes', beside
    that of as many held-out codes (the noise of a finite sample). Codes of another tokenizer
    run than codes_dir's are refused (unless allow_mix)."""
    contract = read_contract(codes_dir)
    samples = check_codes(load_array(path, 'the command that drew them'), contract['L'],
                          contract['V'], path, fix=f"sample codes of the kind in {codes_dir}")
    identity, where = read_identity(path)
    check_same_tokenizer(identity, where or path, codes_identity(contract),
                         os.path.join(codes_dir, SIDECAR),
                         "point --codes_dir at the dumps (and probe) of the tokenizer the codes' "
                         "model was trained on", allow_mix)
    probe_path = os.path.join(codes_dir, 'probe.pt')
    if not os.path.exists(probe_path):
        raise MissingFile(f"'{probe_path}' not found: fit it with python tokenizer.py "
                                f"--mode=probe --out_dir={codes_dir}")
    probe = torch.load(probe_path, map_location='cpu', weights_only=True)
    if prompts:
        with open(prompts, encoding='utf-8') as f:
            named = f.read().splitlines()
        if len(named) != len(samples):
            raise UserError(f"'{prompts}' has {len(named)} prompts for {len(samples)} codes in "
                             f"'{path}'; give the _prompts.txt written beside the codes")
        scores = named_factors_kept(probe_predict(probe, samples), named, load_meta(data_dir))
        print("the probe's reading of the codes against the factors the prompts name (share "
              "kept): " + ', '.join(f"{k} {v:.3f}" for k, v in scores.items()))
        return scores
    train = load_codes(codes_dir, 'train', contract=contract)
    reference = train[np.random.default_rng(0).permutation(len(train))[:n_reference]]
    sets = {'samples': samples}
    if os.path.exists(dump_path(codes_dir, 'val')):
        sets['held-out'] = load_codes(codes_dir, 'val', contract=contract)[:len(samples)]
    return {f"tv_{name.replace(' x ', '_')}": tvs['samples']
            for name, tvs in code_histograms(probe, reference, sets).items()}


def main(cfg):
    if cfg['images']:
        return score_images(cfg['images'], cfg['data_dir'], cfg['split'])
    if cfg['samples'] and cfg['codes_dir']:
        return score_samples(cfg['samples'], cfg['codes_dir'], cfg['data_dir'], cfg['prompts'],
                             allow_mix=cfg['allow_mix'])
    if cfg['codes_dir']:
        return score_codes(cfg['codes_dir'], cfg['data_dir'], allow_mix=cfg['allow_mix'])
    raise UserError("score.py needs --images, --samples with --codes_dir, or --codes_dir "
                    "(python data/shapes/score.py --help)")


if __name__ == '__main__':
    command_line(CONFIG, sys.argv[1:], main, __file__)
