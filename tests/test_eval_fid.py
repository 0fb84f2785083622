"""Claims about eval_fid.py: the FID Inception loads pytorch-fid's weights file strictly and gives
the features each metric needs; the metrics match closed forms and known answers."""
import numpy as np
import pytest
import scipy.linalg
import torch

import eval_fid as E


# -- the network -----------------------------------------------------------------------------

def conv(name, cin, cout, kh=1, kw=None):
    kw = kh if kw is None else kw
    bn = ('weight', 'bias', 'running_mean', 'running_var')
    return {f'{name}.conv.weight': (cout, cin, kh, kw), **{f'{name}.bn.{p}': (cout,) for p in bn}}


def fid_inception_key_shapes():
    """pt_inception-2015-12-05's keys and shapes, written from the Inception-v3 architecture."""
    s = {}
    for name, cin, cout, k in [('Conv2d_1a_3x3', 3, 32, 3), ('Conv2d_2a_3x3', 32, 32, 3),
                               ('Conv2d_2b_3x3', 32, 64, 3), ('Conv2d_3b_1x1', 64, 80, 1),
                               ('Conv2d_4a_3x3', 80, 192, 3)]:
        s.update(conv(name, cin, cout, k))
    for block, cin, pool in [('Mixed_5b', 192, 32), ('Mixed_5c', 256, 64), ('Mixed_5d', 288, 64)]:
        for branch, i, o, k in [('branch1x1', cin, 64, 1), ('branch5x5_1', cin, 48, 1),
                                ('branch5x5_2', 48, 64, 5),
                                ('branch3x3dbl_1', cin, 64, 1), ('branch3x3dbl_2', 64, 96, 3),
                                ('branch3x3dbl_3', 96, 96, 3), ('branch_pool', cin, pool, 1)]:
            s.update(conv(f'{block}.{branch}', i, o, k))
    for branch, i, o, k in [('branch3x3', 288, 384, 3), ('branch3x3dbl_1', 288, 64, 1),
                            ('branch3x3dbl_2', 64, 96, 3), ('branch3x3dbl_3', 96, 96, 3)]:
        s.update(conv(f'Mixed_6a.{branch}', i, o, k))
    for block, c in [('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)]:
        for branch, i, o, kh, kw in [('branch1x1', 768, 192, 1, 1),
                                     ('branch7x7_1', 768, c, 1, 1), ('branch7x7_2', c, c, 1, 7),
                                     ('branch7x7_3', c, 192, 7, 1),
                                     ('branch7x7dbl_1', 768, c, 1, 1),
                                     ('branch7x7dbl_2', c, c, 7, 1),
                                     ('branch7x7dbl_3', c, c, 1, 7),
                                     ('branch7x7dbl_4', c, c, 7, 1),
                                     ('branch7x7dbl_5', c, 192, 1, 7),
                                     ('branch_pool', 768, 192, 1, 1)]:
            s.update(conv(f'{block}.{branch}', i, o, kh, kw))
    for branch, i, o, kh, kw in [('branch3x3_1', 768, 192, 1, 1),
                                 ('branch3x3_2', 192, 320, 3, 3),
                                 ('branch7x7x3_1', 768, 192, 1, 1),
                                 ('branch7x7x3_2', 192, 192, 1, 7),
                                 ('branch7x7x3_3', 192, 192, 7, 1),
                                 ('branch7x7x3_4', 192, 192, 3, 3)]:
        s.update(conv(f'Mixed_7a.{branch}', i, o, kh, kw))
    for block, cin in [('Mixed_7b', 1280), ('Mixed_7c', 2048)]:
        for branch, i, o, kh, kw in [('branch1x1', cin, 320, 1, 1),
                                     ('branch3x3_1', cin, 384, 1, 1),
                                     ('branch3x3_2a', 384, 384, 1, 3),
                                     ('branch3x3_2b', 384, 384, 3, 1),
                                     ('branch3x3dbl_1', cin, 448, 1, 1),
                                     ('branch3x3dbl_2', 448, 384, 3, 3),
                                     ('branch3x3dbl_3a', 384, 384, 1, 3),
                                     ('branch3x3dbl_3b', 384, 384, 3, 1),
                                     ('branch_pool', cin, 192, 1, 1)]:
            s.update(conv(f'{block}.{branch}', i, o, kh, kw))
    s['fc.weight'], s['fc.bias'] = (1008, 2048), (1008,)
    return s


def test_the_fid_inception_weights_load_strictly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    shapes = fid_inception_key_shapes()
    state = {k: torch.rand(shape, generator=gen) + 0.5 for k, shape in shapes.items()}
    # with num_batches_tracked, as torchvision saves them
    on_disk = dict(state, **{k.replace('running_var', 'num_batches_tracked'): torch.tensor(0)
                             for k in state if k.endswith('running_var')})
    torch.save(on_disk, tmp_path / 'pt_inception.pth')
    model = E.load_inception(str(tmp_path / 'pt_inception.pth'), 'cpu')
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    del on_disk['Mixed_6d.branch7x7_2.conv.weight']
    torch.save(on_disk, tmp_path / 'broken.pth')
    with pytest.raises(RuntimeError, match='Mixed_6d.branch7x7_2.conv.weight'):
        E.load_inception(str(tmp_path / 'broken.pth'), 'cpu')
    with pytest.raises(FileNotFoundError, match='pytorch-fid/releases'):
        E.load_inception(str(tmp_path / 'missing.pth'), 'cpu')


def test_the_network_gives_the_pool_spatial_and_logit_features():
    torch.manual_seed(0)
    model = E.FIDInception().eval()
    images = torch.randint(0, 256, (2, 64, 48, 3), dtype=torch.uint8)
    with torch.no_grad():
        x = E.preprocess(images, 'tf')
        assert x.shape == (2, 3, 299, 299) and x.min() >= -1 and x.max() <= 127 / 128
        out = model(x)
    assert out['pool'].shape == (2, 2048) and out['spatial'].shape == (2, 2023)
    assert out['logits'].shape == (2, 1008)
    assert torch.allclose(out['logits'], out['pool'] @ model.fc.weight.t())   # no bias, as ADM
    assert E.preprocess(images, 'torch').shape == (2, 3, 299, 299)


def test_spatial_features_are_the_6d_1x1_branch_flattened_channel_last():
    # ADM takes mixed_6/conv[..., :7] of an NHWC tensor and reshapes it: (17, 17, 7) order, which
    # is the order of the mu_s / sigma_s in its reference batches
    torch.manual_seed(0)
    model = E.FIDInception().eval()
    seen = []
    model.Mixed_6d.branch1x1.register_forward_hook(lambda module, inputs, out: seen.append(out))
    with torch.no_grad():
        spatial = model(torch.rand(2, 3, 299, 299) * 2 - 1)['spatial']
    branch = seen[0]                                                   # (2, 192, 17, 17)
    assert branch.shape == (2, 192, 17, 17) and branch[:, :7].std() > 0
    assert torch.equal(spatial, branch[:, :7].permute(0, 2, 3, 1).reshape(2, 17 * 17 * 7))
    assert torch.equal(spatial[:, :7], branch[:, :7, 0, 0])      # the 7 channels of pixel (0, 0)


def test_tf_bilinear_resize_has_no_half_pixel_offset():
    x = torch.tensor([[[[0.0, 10.0]]]])                               # (1, 1, 1, 2)
    wide = E.tf_bilinear_resize(x.expand(1, 1, 2, 2), 4)
    assert torch.allclose(wide[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))


# -- the metrics ------------------------------------------------------------------------------

def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 2, size=5), rng.uniform(0.1, 2, size=5)
    # diagonal covariances
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    d = E.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert d == pytest.approx(expected, rel=1e-10)
    # full covariances: against scipy's matrix square root
    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = m1 @ m1.T, m2 @ m2.T
    root = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root)
    assert E.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # identical, rank-deficient covariances (fewer samples than dimensions): zero, and a real float
    feats = rng.normal(size=(20, 64))
    mu, sigma = E.statistics(feats)
    d = E.frechet_distance(mu, sigma, mu, sigma)
    assert isinstance(d, float) and abs(d) < 1e-6 * np.trace(sigma)


def test_precision_and_recall_on_point_clouds_with_known_answers():
    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 20.0])  # 2 modes
    assert E.precision_recall(ref, ref.copy()) == (1.0, 1.0)
    assert E.precision_recall(ref, ref + 100.0) == (0.0, 0.0)
    # samples from one mode only (mode dropping): all precise, half the recall
    assert E.precision_recall(ref, ref[:200] + 0.01) == (1.0, 0.5)
    with pytest.raises(ValueError, match='need more than 3'):
        E.precision_recall(ref, ref[:3])


def test_knn_radii_and_ball_membership_follow_adm_definitions():
    # radius: entry k of the point's sorted row of distances, itself being entry 0 (ADM's
    # manifold_radii); squared, as ADM compares squared distances
    line = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    assert np.array_equal(E.knn_radii(line, 2), np.array([3, 2, 3, 4, 7]) ** 2.0)
    # a duplicate is a neighbour
    assert np.array_equal(E.knn_radii(np.array([[0.0], [0.0], [5.0]]), 1), [0.0, 0.0, 25.0])
    # a point exactly on a ball's surface is inside it (<=): sample 5 is 2 from reference 3, whose
    # radius is 2; reference 3 is 2 from sample 5, whose radius (to sample 7) is 2
    ref, samples = np.array([[0.0], [1.0], [3.0]]), np.array([[5.0], [7.0], [100.0], [101.0]])
    assert E.precision_recall(ref, samples, k=1) == (0.25, pytest.approx(1 / 3))


def brute_force_precision_recall(ref, samples, k):
    d = np.sqrt(((samples[:, None] - ref[None]) ** 2).sum(-1))                    # (samples, refs)
    ref_r = np.sort(np.sqrt(((ref[:, None] - ref[None]) ** 2).sum(-1)), 1)[:, k]
    sample_r = np.sort(np.sqrt(((samples[:, None] - samples[None]) ** 2).sum(-1)), 1)[:, k]
    return (d <= ref_r[None]).any(1).mean(), (d <= sample_r[:, None]).any(0).mean(), ref_r


def test_precision_recall_in_row_blocks_equals_the_whole_matrix():
    rng = np.random.default_rng(1)
    ref, samples = rng.normal(size=(53, 6)), rng.normal(size=(37, 6)) * 0.9 + 0.7
    precision, recall, ref_r = brute_force_precision_recall(ref, samples, 3)
    assert 0.2 < precision < 0.9 and 0.2 < recall < 0.9            # neither trivially 0 nor 1
    for block in (5, 16, 1000):                     # 53 = 10 x 5 + 3, 37 = 7 x 5 + 2, one block
        assert np.allclose(np.sqrt(E.knn_radii(ref, 3, block)), ref_r, rtol=1e-12)
        assert E.precision_recall(ref, samples, 3, block) == (precision, recall)


def test_precision_recall_holds_one_block_of_rows_at_a_time():
    import tracemalloc
    rng = np.random.default_rng(0)
    n, block = 2000, 200
    ref, samples = rng.normal(size=(n, 16)), rng.normal(size=(n, 16))
    tracemalloc.start()
    try:
        E.precision_recall(ref, samples, 3, block)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_block = block * n * (8 + 1)                 # float64 distances and their <= mask
    assert peak < 1.5 * one_block < n * n * 8       # one block, not two, nor the whole matrix


def test_inception_score_on_known_logits():
    assert E.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0)
    confident = np.full((100, 10), -1e4)
    confident[np.arange(100), np.arange(100) % 10] = 0.0              # 10 classes, evenly, surely
    assert E.inception_score(confident) == pytest.approx(10.0, rel=1e-6)


def test_bad_inputs_are_refused_with_the_reason(tmp_path):
    np.savez(tmp_path / 'floats.npz', arr_0=np.zeros((4, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match='float32.*expected uint8'):
        E.read_images(str(tmp_path / 'floats.npz'))
    np.savez(tmp_path / 'gray.npz', arr_0=np.zeros((4, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r'shape \(4, 8, 8\).*\(N, H, W, 3\)'):
        E.read_images(str(tmp_path / 'gray.npz'))
    with pytest.raises(ValueError, match='at least 2'):
        E.statistics(np.zeros((1, 2048)))
    with pytest.raises(FileNotFoundError, match='nothing.npz'):
        E.read_images(str(tmp_path / 'nothing.npz'))


def test_a_folder_of_real_photos_of_any_size_is_read_in_adms_view_at_the_samples_size(
        tmp_path, capsys):
    from PIL import Image
    from images import load_image
    rng = np.random.default_rng(0)
    (tmp_path / 'real' / 'sub').mkdir(parents=True)
    paths = [tmp_path / 'real' / name for name in ('a.jpg', 'b.png', 'sub/c.JPEG')]
    for path, (h, w) in zip(paths, [(300, 200), (48, 90), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    images = E.read_images(str(tmp_path / 'real'), 64)          # was: "differ in size"
    assert images.shape == (3, 64, 64, 3)
    for image, path in zip(images, paths):                        # ADM's center_crop_arr
        np.testing.assert_array_equal(image, load_image(str(path), 64))
    assert "ADM's view" in capsys.readouterr().out


def test_end_to_end_from_images_to_scores_with_a_saved_reference(tmp_path):
    from PIL import Image
    gen = torch.Generator().manual_seed(0)
    def init(k, shape):                       # He-scaled convolutions keep activations finite
        if k.endswith('conv.weight') or k == 'fc.weight':
            return torch.randn(shape, generator=gen) * (2 / np.prod(shape[1:])) ** 0.5
        return torch.ones(shape) if k.endswith(('bn.weight', 'running_var')) else torch.zeros(shape)
    state = {k: init(k, shape) for k, shape in fid_inception_key_shapes().items()}
    torch.save(state, tmp_path / 'inception.pth')
    rng = np.random.default_rng(0)
    np.savez(tmp_path / 'samples.npz', arr_0=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    (tmp_path / 'real').mkdir()
    for i in range(8):                      # photos of other sizes: read at the samples' 32 px
        image = rng.integers(0, 256, (32 + 9 * i, 70 - 4 * i, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / 'real' / f'{i}.{("png", "jpg")[i % 2]}')
    cfg = dict(E.CONFIG, samples=str(tmp_path / 'samples.npz'), ref=str(tmp_path / 'real'),
               device='cpu', inception_path=str(tmp_path / 'inception.pth'),
               save_ref=str(tmp_path / 'ref.npz'), batch_size=4, pr_block=3)
    first = E.evaluate(cfg)
    assert set(first) == {'fid', 'sfid', 'inception_score', 'precision', 'recall'}
    saved = np.load(tmp_path / 'ref.npz')
    assert saved['mu'].shape == (2048,) and saved['sigma_s'].shape == (2023, 2023)
    assert saved['arr_0'].shape == (8, 32, 32, 3)
    # the ADM-format reference it saved gives the same scores
    again = E.evaluate(dict(cfg, ref=str(tmp_path / 'ref.npz'), save_ref=''))
    assert again == pytest.approx(first)
