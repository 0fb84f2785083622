"""Claims about the contract between the components (codes.py): a code dump and its sidecar are
all a consumer needs, a dump that disagrees with its sidecar is refused with the file and the fix
named, and dumps written before the sidecar still load, without reading a checkpoint's tensors."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import codes as C
import diffusion as D
import prior as P
import sample as S
from data.shapes.prepare import write_oracle_codes
from test_diffusion import tiny_cfg as dit_cfg
from test_prior import tiny_cfg as prior_cfg


@pytest.fixture(scope='module')
def oracle_dir(shapes_dir, tmp_path_factory):
    """The test dataset's oracle codes: a dump with a sidecar and no tokenizer checkpoint."""
    out = tmp_path_factory.mktemp('oracle')
    write_oracle_codes(shapes_dir, str(out))
    return str(out)


def test_the_oracle_dump_is_the_factors_with_a_sidecar(shapes_dir, oracle_dir):
    contract = C.read_contract(oracle_dir)
    assert (contract['L'], contract['V'], contract['image_size']) == (4, 6, 32)
    for split in ('train', 'val', 'ood'):
        factors = np.load(os.path.join(shapes_dir, f'{split}_factors.npy'))
        codes = C.load_codes(oracle_dir, split, len(factors))
        assert codes.dtype == np.uint16 and np.array_equal(codes, factors)
        assert contract['splits'][split] == len(factors)
    assert not os.path.exists(os.path.join(oracle_dir, 'tokenizer.pt'))


def test_a_dit_and_a_prior_train_from_a_dump_whose_tokenizer_is_absent(shapes_dir, oracle_dir,
                                                                     tmp_path):
    D.train(dit_cfg(shapes_dir, oracle_dir, tmp_path / 'dit', max_iters=2))
    dit = torch.load(tmp_path / 'dit' / 'diffusion.pt', weights_only=True)
    assert (dit['L'], dit['V'], dit['iter_num']) == (4, 6, 2)
    P.train(prior_cfg(oracle_dir, tmp_path / 'prior', max_iters=2))
    prior = torch.load(tmp_path / 'prior' / 'prior.pt', weights_only=True)
    assert (prior['L'], prior['V']) == (4, 6)


def test_sample_py_reconstructs_and_composes_from_a_dump_alone(shapes_dir, oracle_dir, tmp_path):
    D.train(dit_cfg(shapes_dir, oracle_dir, tmp_path / 'dit', max_iters=2))
    cfg = dict(S.CONFIG, out_dir=str(tmp_path / 'samples'), device='cpu', n_samples=8,
               batch_size=4, diffusion_dir=str(tmp_path / 'dit'), tokenizer_dir=oracle_dir,
               data_dir=shapes_dir, split='val', dit_sampler='ddpm', dit_steps=3)
    S.main(dict(cfg, mode='recon'))
    val = np.load(os.path.join(shapes_dir, 'val_factors.npy'))
    assert np.array_equal(np.load(tmp_path / 'samples' / 'recon_codes.npy'), val[:8])
    S.main(dict(cfg, mode='compose', sources='0+1,2+3,4+5,6+7'))
    composed = np.load(tmp_path / 'samples' / 'compose_codes.npy')
    for i, code in enumerate(composed):                  # every token from one of the sources
        a, b = val[2 * (i % 4)], val[2 * (i % 4) + 1]
        assert ((code == a) | (code == b)).all(), (code, a, b)
    (tmp_path / 'cat.png').write_bytes(b'')
    with pytest.raises(ValueError, match='image files in --sources need a tokenizer'):
        S.main(dict(cfg, mode='compose', sources=f"0+{tmp_path / 'cat.png'}",
                    out_dir=str(tmp_path / 'x')))


def test_a_sidecar_that_disagrees_with_its_dump_is_refused_with_the_file_and_the_fix(
        shapes_dir, oracle_dir, tmp_path):
    bad = tmp_path / 'bad'
    shutil.copytree(oracle_dir, bad)
    with open(bad / 'codes.json') as f:
        sidecar = json.load(f)
    with open(bad / 'codes.json', 'w') as f:
        json.dump(dict(sidecar, L=5), f)
    with pytest.raises(ValueError, match=r'codes_train.npy.*\(\d+, 4\).*L=5') as err:
        D.train(dit_cfg(shapes_dir, str(bad), tmp_path / 'out'))
    assert 'python tokenizer.py --mode=dump' in str(err.value)
    with open(bad / 'codes.json', 'w') as f:                 # a split size of another run
        json.dump(dict(sidecar, splits=dict(sidecar['splits'], train=7)), f)
    with pytest.raises(ValueError, match=r'codes_train.npy.*codes.json records 7') as err:
        P.train(prior_cfg(str(bad), tmp_path / 'out'))
    assert 'python tokenizer.py --mode=dump' in str(err.value)
    assert not (tmp_path / 'out' / 'prior.pt').exists()
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither codes.json nor tokenizer.pt"):
        C.read_contract(str(empty))


def test_a_model_is_refused_codes_of_another_contract(oracle_dir):
    with pytest.raises(ValueError, match=r'L=4, V=6.*the DiT x was trained on L=32, V=8'):
        C.check_fits(C.read_contract(oracle_dir), 32, 8, oracle_dir, 'the DiT x')


def test_a_dump_without_a_sidecar_reads_its_tokenizer_memory_mapped(tmp_path, capsys,
                                                                    monkeypatch):
    big = torch.zeros(1000, 1000)                       # stands in for the weights
    torch.save(dict(model={'w': big}, L=4, V=8, image_size=32), tmp_path / 'tokenizer.pt')
    np.save(tmp_path / 'codes_val.npy', np.ones((3, 4), np.uint16))
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, 'load', lambda *a, **k: loads.append(k) or real_load(*a, **k))
    assert C.load_codes(str(tmp_path), 'val', 3).shape == (3, 4)
    assert loads and all(k.get('mmap') and k.get('weights_only') for k in loads)
    assert 'no codes.json' in capsys.readouterr().out


def test_a_new_contract_in_the_same_folder_forgets_the_old_splits(tmp_path):
    C.write_codes(tmp_path, 'train', np.zeros((5, 4)), 4, 8, 32, 'first')
    C.write_codes(tmp_path, 'val', np.zeros((2, 4)), 4, 8, 32, 'first')
    assert C.read_contract(tmp_path)['splits'] == dict(train=5, val=2)
    C.write_codes(tmp_path, 'val', np.zeros((2, 6)), 6, 8, 32, 'second')
    assert C.read_contract(tmp_path)['splits'] == dict(val=2)
    with pytest.raises(ValueError, match='token 8 >= V=8'):
        C.write_codes(tmp_path, 'val', np.full((2, 6), 8), 6, 8, 32, 'second')
