"""
eval_fid.py: FID, sFID, Inception Score, precision and recall of a set of images, computed the
way the ADM evaluation suite (openai/guided-diffusion, evaluations/evaluator.py) computes them.

The network is the Inception-v3 that FID has used since 2017 (the TensorFlow graph
inception-2015-12-05), here as PyTorch modules whose state_dict matches pytorch-fid's port of
its weights, pt_inception-2015-12-05-6726825d.pth (1008 classes; the "FID" variants of the
blocks: average pools that do not count padding, and max pooling in the last block).

    pool features  2048-d, after the global average pool        -> FID, precision, recall
    spatial        the first 7 channels of mixed_6/conv (the 1x1 branch of the 6d block,
                   17 x 17), flattened channel-last (H, W, C) as TF's NHWC tensor is,
                   to 2023-d (ADM's mu_s / sigma_s are in this order) -> sFID
    logits         pool features @ the final layer's weights (no bias, as ADM) -> Inception Score

FID = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), in float64; the trace of the square
root is taken from the eigenvalues of S_1^(1/2) S_2 S_1^(1/2), which is symmetric, so no
imaginary parts appear. IS = exp(E_x KL(p(y|x) || p(y))), averaged over splits of 5000.
Precision (recall): the share of sample (reference) features inside the union of balls around
the reference (sample) features, each ball reaching its k = 3rd nearest neighbour. Distances
are taken pr_block rows at a time, as ADM's ManifoldEstimator does, so memory stays bounded.

Images go in as uint8 (N, H, W, 3), from an .npz (arr_0, as sample.py writes) or a folder.
A folder (of real images, say: photos of any sizes) is read in ADM's view of a reference batch,
guided-diffusion's center_crop_arr: halved while the short side is at least twice image_size,
resized bicubic so that it is image_size, and the central square kept; image_size is the samples'
own (their .npz's) unless set. Which view was used is printed.
Resizing to 299: 'tf' reproduces TF1's bilinear resize (no half-pixel offset) and the graph's
(x - 128) / 128, as the ADM suite sees images; 'torch' is F.interpolate's bilinear on x / 255
then 2x - 1, as pytorch-fid does. The network runs in float32 with TF32 off.

    python eval_fid.py --samples=samples.npz --ref=weights/VIRTUAL_imagenet256_labeled.npz
    python eval_fid.py --samples=samples.npz --ref=path/to/real_images --save_ref=ref.npz
"""
import os
import sys

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import MissingFile, UserError, command_line
from images import image_files, load_image

# -----------------------------------------------------------------------------
samples = ''                    # .npz (arr_0 uint8 NHWC) or a folder of images
ref = ''                        # ADM reference .npz (arr_0, mu, sigma, mu_s, sigma_s) or images
save_ref = ''                   # write the statistics computed from `ref` here (ADM format)
image_size = 0                  # folders: center crop and resize to this size (ADM's view);
                                # 0: the size of the samples' .npz (256 if they are a folder too)
inception_path = 'weights/pt_inception-2015-12-05-6726825d.pth'
resize = 'tf'                   # 'tf' (as the ADM suite) | 'torch' (as pytorch-fid)
batch_size = 100
k = 3                           # precision / recall neighbourhood
is_split = 5000
pr_block = 10000                # precision / recall: distance matrix rows held at once (ADM's)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
CONFIG = {k_: globals()[k_] for k_ in ['samples', 'ref', 'save_ref', 'image_size',
                                       'inception_path', 'resize',
                                       'batch_size', 'k', 'is_split', 'pr_block', 'device']}
WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
               'pt_inception-2015-12-05-6726825d.pth')


# -----------------------------------------------------------------------------
# The FID Inception-v3, with torchvision's / pytorch-fid's parameter names

class BatchNorm(nn.Module):
    """Inference-only batch norm (eps 1e-3, TF's) with the usual parameter names."""
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))
        self.register_buffer('running_mean', torch.zeros(n))
        self.register_buffer('running_var', torch.ones(n))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, 1e-3)


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = BatchNorm(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):                    # TF's 3x3 average pool: padding does not count
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):        # Mixed_5b/c/d, 35 x 35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], 1)


class InceptionB(nn.Module):        # Mixed_6a: 35 -> 17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), dbl, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):        # Mixed_6b..6e, 17 x 17, factorized 7 x 7
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f'branch7x7dbl_{i}')(dbl)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        return torch.cat([self.branch1x1(x), b7, dbl, self.branch_pool(avg_pool(x))], 1)


class InceptionD(nn.Module):        # Mixed_7a: 17 -> 8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        a = self.branch3x3_2(self.branch3x3_1(x))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):        # Mixed_7b/c, 8 x 8; the FID graph max-pools in the last one
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool(x) if self.pool == 'avg' else F.max_pool2d(x, 3, stride=1, padding=1)
        branches = (self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                    self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled))
        return torch.cat(branches, 1)


class FIDInception(nn.Module):
    """x (N, 3, 299, 299) in [-1, 1] -> dict(pool (N, 2048), spatial (N, 2023), logits (N, 1008))"""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, 'avg')
        self.Mixed_7c = InceptionE(2048, 'max')
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ('5b', '5c', '5d', '6a', '6b', '6c'):
            x = getattr(self, f'Mixed_{name}')(x)
        # TF's mixed_6/conv is NHWC: ADM flattens (17, 17, 7), so channels vary fastest
        spatial = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean(dim=(2, 3))
        return dict(pool=pool, spatial=spatial, logits=pool @ self.fc.weight.t())


def load_inception(path, device):
    if not os.path.exists(path):
        raise MissingFile(f"Inception weights '{path}' not found; download them from "
                                f"{WEIGHTS_URL} and set --inception_path to the file")
    state = torch.load(path, map_location='cpu', weights_only=True)
    state = {k_: v for k_, v in state.items() if not k_.endswith('num_batches_tracked')}  # unused
    model = FIDInception()
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# Images in, features out

def read_images(path, size=256):
    """uint8 (N, H, W, 3) from an .npz (arr_0), or from a folder of images (any depth, sorted
    relative paths, as images.py lists them) in ADM's view at size x size."""
    if not os.path.exists(path):
        raise MissingFile(f"images '{path}' not found")
    if os.path.isdir(path):
        files = [f for _, f in image_files(path)]
        if not files:
            raise UserError(f"no images in folder '{path}'")
        print(f"{path}: {len(files)} images in ADM's view (center_crop_arr: center crop, "
              f"resized to {size} x {size})")
        return np.stack([load_image(f, size) for f in files])
    images = np.load(path)['arr_0']
    check_images(images, path)
    return images


def check_images(images, name):
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"'{name}' holds {images.dtype} images of shape {images.shape}; expected "
                         "uint8 (N, H, W, 3), as sample.py writes (arr_0)")


def tf_bilinear_resize(x, size):
    """TF1's resize_bilinear (align_corners=False, no half-pixel centers): output pixel i reads
    input position i * in / out, interpolating between its floor and the next pixel."""
    def axis_weights(n_in):
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = (src - lo).float()
        return lo, hi, frac
    lo, hi, frac = axis_weights(x.shape[2])
    x = x[:, :, lo] * (1 - frac)[:, None] + x[:, :, hi] * frac[:, None]
    lo, hi, frac = axis_weights(x.shape[3])
    return x[..., lo] * (1 - frac) + x[..., hi] * frac


def preprocess(images, how):
    """uint8 NHWC -> float32 (N, 3, 299, 299) in the range the network expects."""
    x = images.permute(0, 3, 1, 2).float()
    if how == 'tf':
        return (tf_bilinear_resize(x, 299) - 128) / 128
    if how == 'torch':
        return 2 * F.interpolate(x / 255, size=(299, 299), mode='bilinear', align_corners=False) - 1
    raise UserError(f"--resize={how} is not 'tf' or 'torch'")


@torch.no_grad()
def features(model, images, cfg):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {'pool': [], 'spatial': [], 'logits': []}
    for start in range(0, len(images), cfg['batch_size']):
        batch = torch.from_numpy(images[start:start + cfg['batch_size']]).to(cfg['device'])
        for key, value in model(preprocess(batch, cfg['resize'])).items():
            out[key].append(value.double().cpu().numpy())
    return {key: np.concatenate(value) for key, value in out.items()}


# -----------------------------------------------------------------------------
# Metrics

def statistics(feats):
    if len(feats) < 2:
        raise UserError(f"{len(feats)} images: a covariance needs at least 2 (FID is biased below "
                         f"{feats.shape[1]}: use 10,000 or more)")
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64. The last trace is the
    sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a symmetric matrix."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = scipy.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    eig = scipy.linalg.eigvalsh((middle + middle.T) / 2)
    trace_root = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def inception_score(logits, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) per split of split_size images, averaged (ADM's)."""
    logits = logits - logits.max(1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        kl = part * (np.log(part + 1e-30) - np.log(part.mean(0, keepdims=True) + 1e-30))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def squared_distances(a, b, a_norms, b_norms):
    """|a_i - b_j|^2 as one (len(a), len(b)) array, built in place so that no copy of it is made.
    Squared, as ADM compares them: no square root can turn two distances into a tie."""
    d = a @ b.T
    d *= -2
    d += a_norms[:, None]
    d += b_norms[None]
    return np.maximum(d, 0, out=d)


def sq_norms(feats):
    return np.einsum('ij,ij->i', feats, feats)              # without a (N, D) temporary


def knn_radii(feats, k, block=10000):
    """Squared distance from each point to its k-th nearest other point: entry k of its sorted
    row of distances, the point itself being entry 0 (ADM's manifold_radii). A duplicate of the
    point counts as a neighbour at distance 0, as in ADM."""
    if len(feats) <= k:
        raise UserError(f"{len(feats)} images: precision and recall with k={k} need more than {k}")
    norms = sq_norms(feats)
    radii = np.empty(len(feats))
    for start in range(0, len(feats), block):
        d = squared_distances(feats[start:start + block], feats, norms[start:start + block], norms)
        d.partition(k, axis=1)                                # in place: no second block
        radii[start:start + block] = d[:, k]
        del d                                                 # freed before the next block is made
    return radii


def precision_recall(ref_feats, sample_feats, k=3, block=10000):
    """Improved precision and recall (Kynkaanniemi et al. 2019), as the ADM suite computes them:
    a point is inside a ball when its squared distance is <= the ball's squared radius. Only
    `block` rows of distances (samples x all references) exist at a time."""
    ref_radii, sample_radii = knn_radii(ref_feats, k, block), knn_radii(sample_feats, k, block)
    ref_norms, sample_norms = sq_norms(ref_feats), sq_norms(sample_feats)
    precise = np.zeros(len(sample_feats), dtype=bool)       # sample inside some reference ball
    recalled = np.zeros(len(ref_feats), dtype=bool)         # reference inside some sample ball
    for start in range(0, len(sample_feats), block):
        rows = slice(start, start + block)
        d = squared_distances(sample_feats[rows], ref_feats, sample_norms[rows], ref_norms)
        precise[rows] = (d <= ref_radii[None]).any(1)
        recalled |= (d <= sample_radii[rows, None]).any(0)
        del d
    return float(precise.mean()), float(recalled.mean())


# -----------------------------------------------------------------------------

def reference_statistics(cfg, model, size):
    """The reference batch: an ADM .npz with precomputed statistics, or images to compute them
    (a folder read in ADM's view at `size`)."""
    path, names = cfg['ref'], ('mu', 'sigma', 'mu_s', 'sigma_s')
    if path.endswith('.npz') and os.path.exists(path):
        data = np.load(path)
        if set(names) <= set(data.files):
            images = data['arr_0'] if 'arr_0' in data.files else None
            pool = features(model, images, cfg)['pool'] if images is not None else None
            return {k_: data[k_] for k_ in names}, pool
    images = read_images(path, size)
    feats = features(model, images, cfg)
    stats = dict(zip(names, statistics(feats['pool']) + statistics(feats['spatial'])))
    if cfg['save_ref']:
        np.savez(cfg['save_ref'], arr_0=images, **stats)
        print(f"wrote {cfg['save_ref']} (reference images and statistics, ADM format)")
    return stats, feats['pool']


def evaluate(cfg):
    model = load_inception(cfg['inception_path'], cfg['device'])
    size = cfg['image_size'] or 256
    sample_images = read_images(cfg['samples'], size)
    size = cfg['image_size'] or sample_images.shape[1]
    feats = features(model, sample_images, cfg)
    ref, ref_pool = reference_statistics(cfg, model, size)
    scores = dict(fid=frechet_distance(*statistics(feats['pool']), ref['mu'], ref['sigma']),
                  sfid=frechet_distance(*statistics(feats['spatial']), ref['mu_s'], ref['sigma_s']),
                  inception_score=inception_score(feats['logits'], cfg['is_split']))
    if ref_pool is not None:
        scores['precision'], scores['recall'] = precision_recall(ref_pool, feats['pool'], cfg['k'],
                                                                 cfg['pr_block'])
    if len(sample_images) < 10000:
        print(f"note: {len(sample_images)} samples; published FIDs use 50,000 (10,000 at least)")
    for name, value in scores.items():
        print(f"{name:<16} {value:.4f}")
    return scores


def main(cfg):
    if not cfg['samples'] or not cfg['ref']:
        raise UserError("eval_fid.py needs --samples=<npz or folder> and --ref=<ADM reference npz "
                        "or images> (python eval_fid.py --help)")
    return evaluate(cfg)


if __name__ == '__main__':
    command_line(CONFIG, sys.argv[1:], main, __file__)
