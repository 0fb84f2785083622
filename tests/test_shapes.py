"""Claims about the synthetic shapes dataset (data/shapes/prepare.py), its attribute reader, and
the scores built on it (data/shapes/score.py)."""
import os
import re
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data.shapes.prepare as shapes  # noqa: E402
import data.shapes.score as score  # noqa: E402

CAPTION = re.compile(r"^a (\w+) (\w+) (\w+) on a (\w+) background, (top left|top right|bottom left|"
                     r"bottom right|top|bottom|left|right|center)$")


@pytest.fixture(scope='module')
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('shapes')
    shapes.make_dataset(str(out), image_size=32, n_train=1000, n_val=1000, n_ood=300, seed=0)
    return str(out)


def load_all(data_dir):
    return {split: shapes.load_split(data_dir, split) for split in shapes.SPLITS}


def pairs(factors):
    return {(int(s), int(c)) for s, c in factors[:, :2]}


def test_same_seed_same_data_and_other_seed_other_images(tmp_path):
    for name, seed in [('a', 1), ('b', 1), ('c', 2)]:
        shapes.make_dataset(str(tmp_path / name), image_size=32, n_train=50, n_val=20, n_ood=20,
                            seed=seed)
    a, b, c = (load_all(str(tmp_path / name)) for name in 'abc')
    for split in shapes.SPLITS:
        for key in ['images', 'factors', 'pos']:
            np.testing.assert_array_equal(a[split][key], b[split][key])
        assert a[split]['captions'] == b[split]['captions']
        assert not np.array_equal(a[split]['images'], c[split]['images'])


def test_held_out_pairs_only_in_ood(dataset_dir):
    data = load_all(dataset_dir)
    held_out = {tuple(p) for p in data['train']['meta']['held_out']}
    n_pairs = len(shapes.SHAPES) * len(shapes.COLORS)
    assert 4 <= len(held_out) <= 5, f"about a quarter of the {n_pairs} pairs, got {len(held_out)}"
    assert not pairs(data['train']['factors']) & held_out
    assert not pairs(data['val']['factors']) & held_out
    assert pairs(data['ood']['factors']) == held_out
    train = data['train']['factors']
    assert set(train[:, 0]) == set(range(len(shapes.SHAPES)))
    assert set(train[:, 1]) == set(range(len(shapes.COLORS)))


def test_another_choice_of_held_out_pairs_moves_them_from_train_to_ood(tmp_path):
    pairs_ = shapes.parse_held_out('circle:red,square:green,triangle:blue,circle:magenta')
    shapes.make_dataset(str(tmp_path), image_size=32, n_train=400, n_val=50, n_ood=100, seed=0,
                        held_out_pairs=pairs_)
    data = load_all(str(tmp_path))
    held_out = {tuple(p) for p in pairs_}
    assert {tuple(p) for p in data['ood']['meta']['held_out']} == held_out
    assert held_out != {tuple(p) for p in shapes.HELD_OUT}
    assert pairs(data['ood']['factors']) == held_out
    assert not pairs(data['train']['factors']) & held_out
    assert not pairs(data['val']['factors']) & held_out
    assert (0, 2) in pairs(data['train']['factors'])        # the default's blue circle is seen now
    for bad, message in [('circle:pink', 'not shape:color'), ('circle:red,circle:red', 'twice'),
                         (','.join(f'{s}:red' for s in shapes.SHAPES), 'no pair in training')]:
        with pytest.raises(ValueError, match=message):
            shapes.parse_held_out(bad)


def test_files_have_the_promised_layout(dataset_dir):
    val = shapes.load_split(dataset_dir, 'val')
    assert val['images'].dtype == np.uint8 and val['images'].shape == (1000, 32, 32, 3)
    assert val['factors'].dtype == np.int64 and val['factors'].shape == (1000, 4)
    assert val['pos'].dtype == np.float32 and val['pos'].shape == (1000, 2)
    assert ((val['pos'] > 0) & (val['pos'] < 1)).all()
    assert val['meta']['splits'] == {'train': 1000, 'val': 1000, 'ood': 300}


def test_captions_name_the_factors_of_their_row(dataset_dir):
    for split, data in load_all(dataset_dir).items():
        meta = data['meta']
        for caption, row, pos in zip(data['captions'], data['factors'], data['pos']):
            match = CAPTION.match(caption)
            assert match, f"{split}: caption '{caption}' does not parse"
            size_word, color, shape, background, where = match.groups()
            assert [meta['shape'].index(shape), meta['color'].index(color),
                    meta['background'].index(background),
                    meta['size'].index(size_word)] == row.tolist()
            assert where == shapes.position_word(*pos)


def check_reader(data, min_accuracy, max_pos_err):
    read = shapes.read_attributes(data['images'], data['meta'])
    assert read['valid'].mean() >= min_accuracy
    for column, factor in enumerate(shapes.FACTORS):
        accuracy = (read[factor] == data['factors'][:, column]).mean()
        assert accuracy >= min_accuracy, f"{factor}: {accuracy:.4f}"
    position_error = np.abs(np.stack([read['x'], read['y']], 1) - data['pos'])[read['valid']]
    assert np.median(position_error) < max_pos_err / 2
    assert np.quantile(position_error, 0.99) < max_pos_err


def test_reader_recovers_factors_of_val(tmp_path):
    # the 2,000 val images of prepare.py's defaults (each split has its own random stream, so the
    # small train and ood splits leave val as data/shapes has it): every factor, size included
    shapes.make_dataset(str(tmp_path), image_size=32, n_train=10, n_val=2000, n_ood=10, seed=0)
    check_reader(shapes.load_split(str(tmp_path), 'val'), 0.99, 0.05)


def test_reader_recovers_factors_at_64(tmp_path):
    shapes.make_dataset(str(tmp_path), image_size=64, n_train=10, n_val=200, n_ood=10, seed=3)
    check_reader(shapes.load_split(str(tmp_path), 'val'), 0.99, 0.05)


def test_reader_rejects_blank_two_shapes_and_noise():
    meta = shapes.make_meta(32, 0, {})
    gray = shapes.BACKGROUNDS.index('gray')
    small = shapes.SIZES.index('small')
    blank = np.full((32, 32, 3), shapes.BACKGROUND_RGB[gray], dtype=np.uint8)
    # two small shapes in opposite corners on the same background, far apart
    first = shapes.render(32, [0, 0, gray, small], [0.22, 0.22])
    second = shapes.render(32, [1, 2, gray, small], [0.78, 0.78])
    two_shapes = np.where((second != blank).any(-1, keepdims=True), second, first)
    noise = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    images = np.concatenate([blank[None], two_shapes[None], noise])
    read = shapes.read_attributes(images, meta)
    assert not read['valid'].any()
    assert (read['shape'] == -1).all() and np.isnan(read['x']).all()
    # and each half of the two-shape image alone is read as valid, so the rejection is real
    assert shapes.read_attributes(np.stack([first, second]), meta)['valid'].all()


def test_load_split_on_missing_dir_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='prepare.py') as error:
        shapes.load_split(str(tmp_path / 'nowhere'), 'train')
    assert re.search(r'(meta\.json|train_\w+\.(npy|txt))', str(error.value))


def test_the_scores_give_the_dataset_itself_full_marks_and_a_shuffle_none(dataset_dir):
    val = shapes.load_split(dataset_dir, 'val')['images'][:300]
    assert min(score.reconstruction_scores(dataset_dir, 'val', val).values()) > 0.98
    shuffled = score.reconstruction_scores(dataset_dir, 'val', val[::-1])
    assert shuffled['shape_and_color'] < 0.3
    train = shapes.load_split(dataset_dir, 'train')['images']
    tvs = score.histogram_scores(dataset_dir, train)
    assert tvs['valid'] > 0.98 and max(v for k, v in tvs.items() if k.startswith('tv_')) < 0.02
    assert score.read_builtin(os.path.dirname(dataset_dir), val) == (None, None)   # not the data


def test_the_joint_histogram_and_coverage_see_what_matching_marginals_hide():
    meta = dict(shape=['a', 'b'], color=['x', 'y'], background=['k'], size=['s'],
                held_out=[[1, 0]])
    train = np.array([[s, c, 0, 0] for s in (0, 1) for c in (0, 1)] * 25)   # 4 cells, equally
    read = lambda rows: dict(zip(score.FACTORS, np.array(rows).T), valid=np.ones(len(rows), bool))
    same = score.joint_scores(read([[s, c, 0, 0] for s in (0, 1) for c in (0, 1)] * 5), train,
                              meta)
    assert same == dict(tv_joint=0.0, coverage=1.0, unseen_pair=0.25)
    # the same marginals (half each shape, half each color), but only the diagonal cells
    diagonal = score.joint_scores(read([[0, 0, 0, 0], [1, 1, 0, 0]] * 10), train, meta)
    assert diagonal == dict(tv_joint=0.5, coverage=0.5, unseen_pair=0.0)
    collapsed = score.joint_scores(read([[1, 0, 0, 0]] * 20), train, meta)
    assert collapsed == dict(tv_joint=0.75, coverage=0.25, unseen_pair=1.0)


def test_the_nearest_distance_is_zero_for_copies_and_the_shift_for_shifted_images():
    rng = np.random.default_rng(0)
    train = rng.integers(20, 230, (50, 8, 8, 3)).astype(np.uint8)
    picked = train[[3, 17, 41]]
    np.testing.assert_allclose(score.nearest_distances(picked, train, chunk=16), 0, atol=1e-2)
    np.testing.assert_allclose(score.nearest_distances(picked + 10, train, chunk=16), 10, rtol=1e-3)
    new = rng.integers(0, 256, (7, 8, 8, 3)).astype(np.uint8)
    brute = np.sqrt(((new[:, None].astype(float) - train[None]) ** 2).mean((2, 3, 4))).min(1)
    np.testing.assert_allclose(score.nearest_distances(new, train, chunk=16), brute, rtol=1e-4)


def test_held_out_pair_sources_give_the_shape_of_one_and_the_color_of_the_other(dataset_dir):
    meta = score.load_meta(dataset_dir)
    val = np.load(os.path.join(dataset_dir, 'val_factors.npy'))
    held_out = {tuple(p) for p in meta['held_out']}
    groups = score.held_out_pair_groups(val, meta, 40, k=3, seed=1)
    assert len(groups) == 40 and all(len(g) == 3 for g in groups)
    assert all((val[a, 0], val[b, 1]) in held_out and val[b, 0] != val[a, 0] for a, b, _ in groups)
    assert {(val[a, 0], val[b, 1]) for a, b, _ in groups} == held_out       # each pair in turn
    assert groups == score.held_out_pair_groups(val, meta, 40, k=3, seed=1)

