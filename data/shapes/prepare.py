"""
A built-in synthetic compositional image dataset ("shapes"), and a reader that recovers its
factors from any image, generated ones included (score.py turns its readings into scores).

Every image shows one flat-colored shape on a flat background. Its factors:
    shape       circle, square, triangle (axis aligned, upright triangle)
    color       red, green, blue, yellow, magenta, cyan   (the shape's color)
    background  black, white, gray
    size        small, large   (bounding-box side as a fraction of the image side)
    position    continuous center, uniform, the shape fully inside with a 1 px margin
and one caption that names them: "a small red triangle on a gray background, top left".
Users name fewer: a second caption file holds, per image, the full caption and three partial
ones that leave factors out ("a red triangle", "a small shape, top left"), tab-separated.

A fixed set of (shape, color) pairs is held out: it never appears in train or val, and
the ood split holds only those pairs, so a model can be tested on compositions it has
never seen made of parts it has seen.

Shapes are drawn with PIL at 4x resolution and box-downsampled, so edge pixels hold the
exact area coverage (anti-aliasing without ringing). Everything is deterministic from the
seed, and each split has its own random stream, so changing n_train leaves val unchanged.

Written to out_dir:
    {split}_images.npy    uint8   (N, H, W, 3)
    {split}_factors.npy   int64   (N, 4)  shape, color, background, size (indices into meta)
    {split}_pos.npy       float32 (N, 2)  center x, y as fractions of the image side
    {split}_captions.txt  one caption per line, in row order
    {split}_captions_varied.txt  per line: the full caption, then N_PARTIAL partial ones, by tabs
    meta.json             names, palettes, held-out pairs, split sizes

The oracle code: each image's true factors as a code of L = 4 tokens (shape, color, background,
size) from V = 6, a perfectly factorized code that every downstream script accepts like a
tokenizer's dump (codes.py). It is the control that DLCs are read against: what the DiT, the
prior and the text model do when the code holds each factor at a position of its own.
    python data/shapes/prepare.py --oracle_codes=out-oracle   # codes_<split>.npy, codes.json

Run from the repository root (relative paths are taken from the current folder, as in every
script):
    python data/shapes/prepare.py [--size=64] [--n_train=30000] [--seed=0] ...
"""
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == '__main__':              # run as a script: the repository's modules
    sys.path.insert(0, REPO_ROOT)
from configurator import MissingFile, UserError  # noqa: E402

# -----------------------------------------------------------------------------
# config (override with --key=value)
size = 32                       # image side in pixels: 32 or 64
n_train = 30000
n_val = 2000
n_ood = 2000
seed = 0
out_dir = 'data/shapes'
held_out = 'circle:blue,square:yellow,triangle:red,triangle:cyan'
                                # the (shape, color) pairs only ood shows; the default: one pair
                                # per shape (so ood tests every shape) and no color twice (so
                                # every color keeps at least two shapes in train), 4 of the 18
oracle_codes = ''               # instead of making the data: write the oracle codes of the data
                                # in out_dir to this folder
# -----------------------------------------------------------------------------
CONFIG = {k: globals()[k] for k in
          ['size', 'n_train', 'n_val', 'n_ood', 'seed', 'out_dir', 'held_out', 'oracle_codes']}

FACTORS = ['shape', 'color', 'background', 'size']
SHAPES = ['circle', 'square', 'triangle']
COLORS = ['red', 'green', 'blue', 'yellow', 'magenta', 'cyan']
COLOR_RGB = [[230, 30, 30], [30, 190, 30], [30, 60, 230], [240, 220, 30], [220, 30, 220],
             [30, 210, 220]]
BACKGROUNDS = ['black', 'white', 'gray']
BACKGROUND_RGB = [[0, 0, 0], [255, 255, 255], [128, 128, 128]]
SIZES = ['small', 'large']
SIZE_FRAC = [0.34, 0.55]  # bounding-box side / image side; far enough apart to read back
SPLITS = ['train', 'val', 'ood']
# 3x3 grid of the center: rows top..bottom, columns left..right
POSITION_WORDS = [['top left', 'top', 'top right'],
                  ['left', 'center', 'right'],
                  ['bottom left', 'bottom', 'bottom right']]
SUPERSAMPLE = 4  # draw at this many times the resolution, then box-downsample
CAPTION_PARTS = ['size', 'color', 'shape', 'background', 'position']
N_PARTIAL = 3    # partial captions per image in {split}_captions_varied.txt


def parse_held_out(text):
    """'circle:blue,square:yellow' -> [[0, 2], [1, 3]], checked: known names, no pair twice, and
    every shape and every color still seen in training with some other partner."""
    pairs = []
    for item in text.split(','):
        shape, _, color = item.strip().partition(':')
        if shape not in SHAPES or color not in COLORS:
            raise UserError(f"held_out: '{item}' is not shape:color with a shape of {SHAPES} "
                             f"and a color of {COLORS}")
        pairs.append([SHAPES.index(shape), COLORS.index(color)])
    if len({tuple(p) for p in pairs}) != len(pairs):
        raise UserError(f"held_out: '{text}' names a pair twice")
    seen = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLORS)) if [s, c] not in pairs]
    if {s for s, _ in seen} != set(range(len(SHAPES))) or \
            {c for _, c in seen} != set(range(len(COLORS))):
        raise UserError(f"held_out: '{text}' leaves a shape or a color with no pair in training")
    return pairs


HELD_OUT = parse_held_out(held_out)


def make_meta(image_size, seed, splits, held_out=HELD_OUT):
    return {
        'image_size': image_size, 'seed': seed, 'factors': FACTORS,
        'shape': SHAPES, 'color': COLORS, 'color_rgb': COLOR_RGB,
        'background': BACKGROUNDS, 'background_rgb': BACKGROUND_RGB,
        'size': SIZES, 'size_frac': SIZE_FRAC, 'held_out': held_out, 'splits': splits,
    }


def position_word(x, y):
    """Name the cell of a 3x3 grid that holds the center (x, y), given as fractions."""
    col = min(int(x * 3), 2)
    row = min(int(y * 3), 2)
    return POSITION_WORDS[row][col]


def describe(factors_row, pos_row, meta, parts=CAPTION_PARTS):
    """The caption of one image: 'a small red triangle on a gray background, top left', naming
    only the factors in `parts` ('a red triangle'; 'a small shape, top left' without the shape)."""
    shape, color, background, size_idx = (int(v) for v in factors_row)
    words = ['a'] + [meta['size'][size_idx]] * ('size' in parts) \
        + [meta['color'][color]] * ('color' in parts)
    words.append(meta['shape'][shape] if 'shape' in parts else 'shape')
    if 'background' in parts:
        words += ['on', 'a', meta['background'][background], 'background']
    caption = ' '.join(words)
    return caption + f", {position_word(*pos_row)}" if 'position' in parts else caption


def partial_parts(rng):
    """A random non-empty subset of CAPTION_PARTS, each part kept with probability 1/2."""
    while True:
        keep = rng.random(len(CAPTION_PARTS)) < 0.5
        if keep.any():
            return [p for p, k in zip(CAPTION_PARTS, keep) if k]


def parse_caption(caption, meta):
    """The factors a caption names, the inverse of describe: {'shape': 2, 'color': 0, ...}, with
    only the factors whose words it holds (any wording that uses the dataset's words)."""
    words = caption.lower().replace(',', ' ').split()
    named = {}
    for factor in ['shape', 'color', 'background', 'size']:
        for j, name in enumerate(meta[factor]):
            if name not in words:
                continue
            at = words.index(name)
            is_background = at + 1 < len(words) and words[at + 1] == 'background'
            if (factor == 'background') == is_background:   # 'a white square on a black background'
                named[factor] = j
    return named


def render(image_size, factors_row, pos_row):
    """Draw one image as uint8 (H, W, 3) from its factors and its center (x, y fractions)."""
    shape, color, background, size_idx = (int(v) for v in factors_row)
    scale = image_size * SUPERSAMPLE
    half = SIZE_FRAC[size_idx] * scale / 2
    cx, cy = pos_row[0] * scale, pos_row[1] * scale
    # integer corners of the box [x0, x1) x [y0, y1) at high resolution; PIL's boxes are
    # inclusive of their end coordinate, hence the -1 below
    x0, y0, x1, y1 = (int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))
    image = Image.new('RGB', (scale, scale), tuple(BACKGROUND_RGB[background]))
    draw = ImageDraw.Draw(image)
    fill = tuple(COLOR_RGB[color])
    if SHAPES[shape] == 'circle':
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif SHAPES[shape] == 'square':
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    return np.asarray(image.reduce(SUPERSAMPLE))  # reduce() is an exact box filter


def sample_factors(rng, n, pairs, image_size):
    """n rows of factors with (shape, color) uniform over `pairs`, the rest uniform."""
    pairs = np.asarray(pairs, dtype=np.int64)
    factors = np.empty((n, 4), dtype=np.int64)
    factors[:, :2] = pairs[rng.integers(len(pairs), size=n)]
    factors[:, 2] = rng.integers(len(BACKGROUNDS), size=n)
    factors[:, 3] = rng.integers(len(SIZES), size=n)
    # the center ranges over where the whole bounding box stays 1 px inside the image
    half = np.asarray(SIZE_FRAC)[factors[:, 3]] / 2
    low = half + 1 / image_size
    pos = low[:, None] + rng.random((n, 2)) * (1 - 2 * low)[:, None]
    return factors, pos.astype(np.float32)


def make_dataset(out_dir, image_size=32, n_train=30000, n_val=2000, n_ood=2000, seed=0,
                 held_out_pairs=HELD_OUT):
    """Generate all splits into out_dir (relative to the current folder); the ood
    split holds held_out_pairs, [[shape, color], ...], and train and val the others."""
    os.makedirs(out_dir, exist_ok=True)
    held_out = {tuple(p) for p in held_out_pairs}
    seen_pairs = [[s, c] for s in range(len(SHAPES)) for c in range(len(COLORS))
                  if (s, c) not in held_out]
    counts = {'train': n_train, 'val': n_val, 'ood': n_ood}
    meta = make_meta(image_size, seed, counts, [list(p) for p in held_out_pairs])
    for split_id, split in enumerate(SPLITS):
        # one stream per split: the size of one split never changes the content of another
        rng = np.random.default_rng([seed, split_id])
        pairs = held_out_pairs if split == 'ood' else seen_pairs
        factors, pos = sample_factors(rng, counts[split], pairs, image_size)
        images = np.empty((counts[split], image_size, image_size, 3), dtype=np.uint8)
        for i in range(counts[split]):
            images[i] = render(image_size, factors[i], pos[i])
        captions = [describe(f, p, meta) for f, p in zip(factors, pos)]
        # their own stream, so that the images and full captions do not depend on them
        caption_rng = np.random.default_rng([seed, split_id, 1])
        varied = ['\t'.join([c] + [describe(f, p, meta, partial_parts(caption_rng))
                                   for _ in range(N_PARTIAL)])
                  for c, f, p in zip(captions, factors, pos)]
        np.save(os.path.join(out_dir, f'{split}_images.npy'), images)
        np.save(os.path.join(out_dir, f'{split}_factors.npy'), factors)
        np.save(os.path.join(out_dir, f'{split}_pos.npy'), pos)
        with open(os.path.join(out_dir, f'{split}_captions.txt'), 'w') as f:
            f.write('\n'.join(captions) + '\n' if captions else '')
        with open(os.path.join(out_dir, f'{split}_captions_varied.txt'), 'w') as f:
            f.write('\n'.join(varied) + '\n' if varied else '')
        print(f"{split}: {len(images)} images {image_size}x{image_size}, {len(pairs)} "
              f"(shape, color) pairs, {images.nbytes / 1e6:.1f} MB -> {out_dir}")
    with open(os.path.join(out_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    return meta


def write_oracle_codes(data_dir, codes_dir):
    """Every split's factors as codes (N, 4) in codes_dir, with the sidecar (codes.py)."""
    from codes import fingerprint_images, write_codes
    source = f'oracle: the factors of {data_dir}'
    with open(os.path.join(data_dir, 'meta.json')) as f:
        meta = json.load(f)
    V = max(len(meta[name]) for name in FACTORS)
    identity = f"oracle-{fingerprint_images(data_dir, 'train')}"   # the data's own codes
    for split in meta['splits']:
        factors = np.load(os.path.join(data_dir, f'{split}_factors.npy'))
        write_codes(codes_dir, split, factors, len(FACTORS), V, meta['image_size'], source,
                    identity, fingerprint_images(data_dir, split))
        print(f"{split}: {len(factors)} oracle codes (shape, color, background, size), L=4 V={V} "
              f"-> {codes_dir}")


def load_split(data_dir, split):
    """Load one split as a dict: images, factors, pos, captions (list of str), meta."""
    names = {'meta': 'meta.json', 'images': f'{split}_images.npy',
             'factors': f'{split}_factors.npy', 'pos': f'{split}_pos.npy',
             'captions': f'{split}_captions.txt'}
    paths = {key: os.path.join(data_dir, name) for key, name in names.items()}
    for path in paths.values():
        if not os.path.exists(path):
            raise MissingFile(f"{path} not found: run python data/shapes/prepare.py "
                                    f"(with --out_dir={data_dir} if it is not the default)")
    with open(paths['meta']) as f:
        meta = json.load(f)
    with open(paths['captions']) as f:
        captions = f.read().splitlines()
    data = {'images': np.load(paths['images']), 'factors': np.load(paths['factors']),
            'pos': np.load(paths['pos']), 'captions': captions, 'meta': meta}
    lengths = {key: len(data[key]) for key in ['images', 'factors', 'pos', 'captions']}
    if len(set(lengths.values())) != 1:
        raise UserError(f"{data_dir} split '{split}' is inconsistent, rows per file: {lengths}; "
                         f"regenerate it with python data/shapes/prepare.py")
    return data


# -----------------------------------------------------------------------------
# attribute reader: recover the factors of any image by plain image analysis

BACKGROUND_TOL = 60.0   # RGB distance: a border pixel this close to the background is clean
MIN_CLEAN_BORDER = 0.9  # fraction of border pixels that must be clean
FOREGROUND_DIST = 60.0  # RGB distance from the background that makes a pixel foreground
COLOR_TOL = 60.0        # RGB distance: interior median to the nearest shape color
MIN_PURE_INTERIOR = 0.75  # fraction of interior pixels that must be within COLOR_TOL of it
SPECK_FRAC = 0.004      # components smaller than this fraction of the image are specks
# fill ratio area / bbox area: square 1, circle pi/4 = 0.785, triangle 0.5; cut in between
TRIANGLE_MAX_FILL = 0.64
CIRCLE_MAX_FILL = 0.9
FILL_RANGE = (0.35, 1.15)  # anything outside is no clean shape
SIDE_RANGE = (0.2, 0.75)   # plausible bounding-box sides, as fractions of the image side


def nearest(colors, palette):
    """Index of the nearest palette entry for each color (..., 3), and its distance."""
    dist = np.linalg.norm(colors[..., None, :] - palette, axis=-1)
    return dist.argmin(-1), dist.min(-1)


def read_attributes(images, meta):
    """
    Read the factors of uint8 images (N, H, W, 3) back: a dict of (N,) arrays shape, color,
    background, size (int indices into meta's lists, -1 where unknown), x, y (the bounding
    box center as fractions of the image side, nan where unknown) and valid (bool).

    valid means the image is one clean dataset-like picture: a clean background of a
    palette color, exactly one significant foreground blob (specks of a few pixels are
    ignored) whose interior is a palette shape color, with a plausible fill ratio and size.
    background is filled in whenever the border is clean, even if the rest is invalid;
    the other fields are filled in only where valid.
    """
    images = np.asarray(images)
    assert images.ndim == 4 and images.shape[-1] == 3, f"expected (N, H, W, 3), got {images.shape}"
    n, height, width, _ = images.shape
    pixels = images.astype(np.float32)
    color_rgb = np.asarray(meta['color_rgb'], dtype=np.float32)
    background_rgb = np.asarray(meta['background_rgb'], dtype=np.float32)
    size_frac = meta.get('size_frac', SIZE_FRAC)
    size_cut = (size_frac[0] + size_frac[1]) / 2

    out = {key: np.full(n, -1, dtype=np.int64) for key in FACTORS}
    out['x'] = np.full(n, np.nan, dtype=np.float32)
    out['y'] = np.full(n, np.nan, dtype=np.float32)
    out['valid'] = np.zeros(n, dtype=bool)

    # background: the palette entry nearest the median border color, if the border is clean
    border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, 1:-1, 0], pixels[:, 1:-1, -1]],
                            axis=1)
    background, background_dist = nearest(np.median(border, axis=1), background_rgb)
    bg_rgb = background_rgb[background]  # (N, 3)
    clean = (np.linalg.norm(border - bg_rgb[:, None], axis=-1) < BACKGROUND_TOL).mean(1)
    border_ok = (background_dist < BACKGROUND_TOL) & (clean >= MIN_CLEAN_BORDER)
    out['background'][border_ok] = background[border_ok]

    offset = pixels - bg_rgb[:, None, None]  # (N, H, W, 3), color relative to the background
    foreground = np.linalg.norm(offset, axis=-1) > FOREGROUND_DIST
    min_speck = max(4, SPECK_FRAC * height * width)
    eight_connected = np.ones((3, 3), dtype=bool)
    for i in np.flatnonzero(border_ok):
        labels, n_labels = ndimage.label(foreground[i], structure=eight_connected)
        blob_sizes = np.bincount(labels.ravel())[1:]
        significant = np.flatnonzero(blob_sizes >= min_speck)
        if len(significant) != 1:
            continue
        blob = labels == significant[0] + 1
        # the interior is free of anti-aliased edge pixels; a thin blob has none, use it all
        interior = ndimage.binary_erosion(blob)
        interior_pixels = pixels[i][interior if interior.any() else blob]
        color, color_dist = nearest(np.median(interior_pixels, axis=0), color_rgb)
        purity = (np.linalg.norm(interior_pixels - color_rgb[color], axis=-1) < COLOR_TOL).mean()
        if color_dist >= COLOR_TOL or purity < MIN_PURE_INTERIOR:
            continue
        # soft coverage: each pixel's position on the line from background to shape color,
        # taken over the blob plus one pixel so the faint anti-aliased rim counts too
        direction = color_rgb[color] - bg_rgb[i]
        coverage = np.clip(offset[i] @ direction / (direction @ direction), 0, 1)
        coverage *= ndimage.binary_dilation(blob, structure=eight_connected)
        # every shape is full across its middle row / column, so the per-column (per-row)
        # maximum coverage traces the bounding box, with partial edge pixels counted exactly
        column_profile, row_profile = coverage.max(0), coverage.max(1)
        box_width, box_height = column_profile.sum(), row_profile.sum()
        fill = coverage.sum() / (box_width * box_height)
        side = np.sqrt(box_width * box_height) / np.sqrt(height * width)
        if not (FILL_RANGE[0] <= fill <= FILL_RANGE[1] and SIDE_RANGE[0] <= side <= SIDE_RANGE[1]):
            continue
        shape = 'triangle' if fill < TRIANGLE_MAX_FILL else \
            'circle' if fill < CIRCLE_MAX_FILL else 'square'
        out['shape'][i] = meta['shape'].index(shape)
        out['color'][i] = color
        out['size'][i] = int(side >= size_cut)
        out['x'][i] = (column_profile @ (np.arange(width) + 0.5)) / box_width / width
        out['y'][i] = (row_profile @ (np.arange(height) + 0.5)) / box_height / height
        out['valid'][i] = True
    return out


def main(cfg):
    from configurator import check_counts
    check_counts(cfg, 'n_train', 'n_val', 'n_ood')
    check_counts(cfg, 'size', minimum=16)
    if cfg['oracle_codes']:
        return write_oracle_codes(cfg['out_dir'], cfg['oracle_codes'])
    make_dataset(cfg['out_dir'], cfg['size'], cfg['n_train'], cfg['n_val'], cfg['n_ood'],
                 cfg['seed'], parse_held_out(cfg['held_out']))


if __name__ == '__main__':
    from configurator import command_line
    command_line(CONFIG, sys.argv[1:], main, __file__)
