"""
images.py: a split of images as every stage reads it, so that row i of a code dump, of a latent
file and of a captions file are the same image i.

A split is, in this order of precedence:

    <data_dir>/<split>_images.npy     uint8 (N, H, W, 3), as data/shapes/prepare.py writes
    <data_dir>/<split>/<class>/...    a folder with class subfolders (ImageNet's train)
    <data_dir>/<split>/<image>        a flat folder of images (ImageNet's official val, or any
                                      images without classes)

Images are the files whose names end in one of EXTENSIONS (any case), found at any depth below
the split's folder; item i is the i-th in the sorted order of their paths relative to it ('/'
between folders). A folder with images both at its top and in subfolders is refused: it would be
ambiguous whether the subfolders are classes.

Class labels (a class-conditional DiT, the tokenizer's probe), as indices into the classes, which
are the sorted subfolder names of <data_dir>/train when that is a folder (so val and train agree),
else of the split's own folder:
  - class subfolders: an image's label is the subfolder it is in;
  - a flat folder: <data_dir>/<split>_labels.txt, a line per item in the order above, each a class
    name (e.g. an ImageNet wnid) or an index; without that file the split has no labels.

Each image is read in ADM's view (center_crop_arr): halved with a box filter while its short side
is at least twice the size, resized bicubic so the short side is the size, then its central square.
A user's mistake here (no images, a folder mixing both layouts, an unreadable image, a labels
file that does not fit) is a configurator.UserError, one line naming the file and the fix.
"""
import os

import numpy as np
import torch
from PIL import Image

from configurator import MissingFile, UserError

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.ppm')


def image_files(folder):
    """The images below a folder, sorted by relative path: [(relative path, absolute path)]."""
    found = []
    for dirpath, dirnames, names in os.walk(folder):
        dirnames.sort()
        for name in names:
            if name.lower().endswith(EXTENSIONS):
                path = os.path.join(dirpath, name)
                found.append((os.path.relpath(path, folder).replace(os.sep, '/'), path))
    return sorted(found)


def class_names(data_dir, split):
    """The sorted subfolders of <data_dir>/train when it is a folder, else of the split's."""
    for folder in (os.path.join(data_dir, 'train'), os.path.join(data_dir, split)):
        if os.path.isdir(folder):
            names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
            if names:
                return names
    return []


def read_labels_file(path, classes, n):
    """A line per item: a class name or an index -> (n,) int64."""
    with open(path, encoding='utf-8') as f:
        lines = [line.strip() for line in f.read().splitlines()]
    if len(lines) != n:
        raise UserError(f"labels '{path}' has {len(lines)} lines for {n} images; it needs a "
                        "line per image, in the sorted order of their paths")
    index = {name: i for i, name in enumerate(classes)}
    labels = []
    for line_no, line in enumerate(lines, 1):
        if line in index:
            labels.append(index[line])
        elif line.isdigit():
            labels.append(int(line))
        else:
            raise UserError(f"labels '{path}' line {line_no}: '{line}' is neither a class folder "
                            "name of the train split nor an index")
    return np.array(labels, dtype=np.int64)


class ImageFolder(torch.utils.data.Dataset):
    """A split's folder of images: item i is uint8 (size, size, 3) in ADM's view; `labels` is
    (N,) int64 or None (a flat folder without a labels file)."""
    def __init__(self, data_dir, split, size):
        self.root, self.size = os.path.join(data_dir, split), size
        found = image_files(self.root)
        if not found:
            raise MissingFile(f"no images under '{self.root}' (files ending in "
                              f"{', '.join(EXTENSIONS)})")
        nested = {rel.split('/')[0] for rel, _ in found if '/' in rel}
        if nested and len(nested) != len({rel.split('/')[0] for rel, _ in found}):
            flat = next(rel for rel, _ in found if '/' not in rel)
            raise UserError(f"'{self.root}' holds images both at its top ('{flat}') and in "
                            "subfolders: put every image in a class subfolder, or none")
        self.files = [path for _, path in found]
        self.classes = class_names(data_dir, split)
        self.labels = None
        if nested:
            index = {name: i for i, name in enumerate(self.classes)}
            unknown = sorted(nested - set(index))
            if unknown:
                raise UserError(f"class folders {unknown[:3]} of '{self.root}' are not among the "
                                f"train split's classes in '{data_dir}/train'")
            self.labels = np.array([index[rel.split('/')[0]] for rel, _ in found], dtype=np.int64)
        elif os.path.exists(os.path.join(data_dir, f'{split}_labels.txt')):
            self.labels = read_labels_file(os.path.join(data_dir, f'{split}_labels.txt'),
                                           self.classes, len(self.files))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return torch.from_numpy(load_image(self.files[i], self.size))


def load_image(path, size):
    """One image file -> uint8 (size, size, 3) by ADM's center_crop_arr."""
    try:
        with Image.open(path) as im:
            im = im.convert('RGB')
            while min(im.size) >= 2 * size:
                im = im.resize((im.width // 2, im.height // 2), Image.BOX)
            s = size / min(im.size)
            im = im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size))).copy()
    except Exception as e:
        raise UserError(f"cannot read image '{path}' ({e}); remove or replace it (or restore it "
                        "from the dataset's archive)") from None


def array_path(data_dir, split):
    return os.path.join(data_dir, f'{split}_images.npy')


def has_split(data_dir, split):
    return os.path.exists(array_path(data_dir, split)) or \
        os.path.isdir(os.path.join(data_dir, split))


def missing_split(data_dir, split):
    return MissingFile(
        f"no split '{split}' in '{data_dir}': expected {array_path(data_dir, split)} (python "
        f"data/shapes/prepare.py writes the built-in ones) or a folder {data_dir}/{split}/ of "
        "images (class subfolders, or flat)")
