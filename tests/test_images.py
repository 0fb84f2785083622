"""Claims about images.py, the one definition of a split of images that every stage reads: an
array, a folder of class subfolders or a flat folder (ImageNet's official val), in the sorted
order of relative paths, with labels from the subfolders or a labels file. A user's mistake in
a folder is a UserError: one line naming the file, exit status 2."""
import numpy as np
import pytest
from PIL import Image

import diffusion as D
import tokenizer as T
from configurator import MissingFile, UserError, command_line
from images import EXTENSIONS, ImageFolder, load_image


def save(path, h, w, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)).save(path)


def test_a_flat_val_folder_like_imagenets_is_a_split_with_the_train_classes_from_a_labels_file(
        tmp_path):
    save(tmp_path / 'train' / 'n02' / 'a.JPEG', 40, 50)
    save(tmp_path / 'train' / 'n01' / 'b.png', 30, 30)
    for i, (h, w) in enumerate([(37, 61), (80, 40), (33, 33)]):
        save(tmp_path / 'val' / f'ILSVRC2012_val_{3 - i:08d}.JPEG', h, w, seed=i)
    (tmp_path / 'val' / 'LOC_synset_mapping.txt').write_text('not an image\n')
    val = T.open_split(str(tmp_path), 'val', 32)        # was: "no images under .../val"
    assert [f.rsplit('/', 1)[1] for f in val.files] == \
        [f'ILSVRC2012_val_{i:08d}.JPEG' for i in (1, 2, 3)]
    assert val.labels is None and val[0].shape == (32, 32, 3)
    assert len(D.read_images(str(tmp_path), 'val', 32)) == 3
    (tmp_path / 'val_labels.txt').write_text('n02\nn01\n1\n')          # names or indices
    assert list(ImageFolder(str(tmp_path), 'val', 32).labels) == [1, 0, 1]
    train = ImageFolder(str(tmp_path), 'train', 32)
    assert train.classes == ['n01', 'n02'] and list(train.labels) == [0, 1]
    (tmp_path / 'val_labels.txt').write_text('n02\n')
    with pytest.raises(UserError, match='val_labels.txt.*1 lines for 3 images'):
        ImageFolder(str(tmp_path), 'val', 32)


def test_images_are_found_at_any_depth_by_extension_in_any_case_in_sorted_relative_path_order(
        tmp_path):
    save(tmp_path / 'train' / 'b' / 'deep' / 'x.PNG', 20, 20)
    save(tmp_path / 'train' / 'b' / 'a.webp', 20, 20)
    save(tmp_path / 'train' / 'a' / 'z.jpeg', 20, 20)
    (tmp_path / 'train' / 'a' / 'notes.txt').write_text('skipped')
    folder = ImageFolder(str(tmp_path), 'train', 16)
    assert [f.split('train/')[1] for f in folder.files] == ['a/z.jpeg', 'b/a.webp', 'b/deep/x.PNG']
    assert list(folder.labels) == [0, 1, 1] and '.jpg' in EXTENSIONS


def test_a_folder_with_images_at_its_top_and_in_subfolders_is_refused_in_one_line(tmp_path,
                                                                                   capfd):
    save(tmp_path / 'train' / 'a' / '0.png', 20, 20)
    save(tmp_path / 'train' / 'stray.png', 20, 20)
    with pytest.raises(UserError, match='stray.png'):
        ImageFolder(str(tmp_path), 'train', 16)
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as status:
        command_line(T.CONFIG, [f'--data_dir={tmp_path}', f'--out_dir={out}', '--device=cpu'],
                     T.main, T.__file__)
    err = capfd.readouterr().err.strip().splitlines()
    assert status.value.code == 2 and len(err) == 1 and err[0].startswith('error: ')
    assert 'stray.png' in err[0] and not out.exists()


def test_a_split_folder_without_images_is_a_missing_file(tmp_path):
    (tmp_path / 'val').mkdir()
    (tmp_path / 'val' / 'README.txt').write_text('no images here')
    with pytest.raises(MissingFile, match="no images under '.*val'"):
        ImageFolder(str(tmp_path), 'val', 16)
    with pytest.raises(MissingFile, match="no split 'train'"):
        T.open_split(str(tmp_path), 'train', 16)


def test_an_array_takes_precedence_over_a_folder_of_the_same_split(tmp_path):
    save(tmp_path / 'val' / '0.png', 20, 20)
    np.save(tmp_path / 'val_images.npy', np.zeros((5, 16, 16, 3), np.uint8))
    assert len(T.open_split(str(tmp_path), 'val', 16)) == 5


def test_a_class_conditional_dit_reads_a_flat_splits_labels_and_says_when_there_are_none(
        tmp_path):
    for i in range(2):
        save(tmp_path / 'val' / f'{i}.png', 20, 30, seed=i)
    cfg = dict(D.CONFIG, data_dir=str(tmp_path), cond='class', num_classes=3, image_size=16)
    with pytest.raises(MissingFile, match='val_labels.txt'):
        D.read_conditions(cfg, 'val', 2)
    (tmp_path / 'val_labels.txt').write_text('2\n0\n')
    assert list(D.read_conditions(cfg, 'val', 2)[0]) == [2, 0]


def test_an_unreadable_image_is_named(tmp_path):
    (tmp_path / 'val').mkdir()
    (tmp_path / 'val' / 'broken.jpg').write_bytes(b'not a jpeg')
    with pytest.raises(UserError, match='broken.jpg'):
        load_image(str(tmp_path / 'val' / 'broken.jpg'), 16)
