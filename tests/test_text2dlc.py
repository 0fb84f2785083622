"""Claims about text to DLC (text2dlc.py): encodings round-trip and travel in the checkpoint, a
pretrained text model is extended without touching its text rows, the loss is LLaDA's masked
cross-entropy, generation writes only codes and never touches the prompt, a briefly trained
model follows its captions, and training is the same on any number of processes and on resume."""
import base64
import os

import numpy as np
import pytest
import torch

from codes import write_codes
from conftest import run_script
from test_prior import sedd_small_state_dict
from test_vae import write_safetensors
import prior as P
import text2dlc as X


# -- text encodings ---------------------------------------------------------------------------

TEXTS = ['a small red triangle on a gray background, top left', 'a blue circle', '',
         'héllo, wörld! 42', 'an unknown wording']


def roundtrip(spec):
    enc = X.encoding_from_spec(spec)
    for text in TEXTS:
        assert enc.decode(enc.encode_ordinary(text)) == text
    return enc


def test_the_built_in_encodings_round_trip_text_and_words_take_one_token_each(tmp_path):
    byte_enc = roundtrip(X.encoding_spec('bytes'))
    assert byte_enc.n_vocab == 257 and byte_enc.eot_token == 256
    spec = X.encoding_spec('words', ['a small red triangle, top left', 'a red square'])
    words = roundtrip(spec)
    assert len(words.encode_ordinary('a small red triangle')) == 4       # bytes: 20
    assert len(words.encode_ordinary('a red square, top left')) == 6
    # the spec is plain data: it travels in a weights_only checkpoint and rebuilds the same encoding
    torch.save(dict(encoding=spec), tmp_path / 'ckpt.pt')
    back = X.encoding_from_spec(torch.load(tmp_path / 'ckpt.pt', weights_only=True)['encoding'])
    assert back.encode_ordinary(TEXTS[0]) == words.encode_ordinary(TEXTS[0])
    assert back.n_vocab == words.n_vocab


def test_a_local_tiktoken_ranks_file_is_a_byte_level_bpe_that_round_trips(tmp_path):
    # a small ranks file in the .tiktoken format: every byte, then merges (of two ranked parts)
    ranks = {bytes([i]): i for i in range(256)}
    for merge in [b'th', b' t', b'he', b' the', b're', b' re', b'ed', b' red', b'in', b'ing']:
        ranks[merge] = len(ranks)
    path = tmp_path / 'tiny.tiktoken'
    path.write_text(''.join(f"{base64.b64encode(b).decode()} {r}\n" for b, r in ranks.items()))
    enc = roundtrip(X.encoding_spec(str(path)))
    assert enc.n_vocab == len(ranks) + 1 and enc.eot_token == len(ranks)   # <|endoftext|>: last
    assert enc.encode_ordinary(' the red') == [ranks[b' the'], ranks[b' red']]
    broken = tmp_path / 'broken.tiktoken'
    broken.write_text('not a ranks line\n')
    with pytest.raises(ValueError, match='broken.tiktoken'):
        X.encoding_spec(str(broken))
    with pytest.raises(FileNotFoundError, match='nowhere.tiktoken.*r50k_base.tiktoken'):
        X.encoding_spec(str(tmp_path / 'nowhere.tiktoken'))


# -- a pretrained text model, extended --------------------------------------------------------

def test_extending_sedd_small_keeps_every_text_row_and_the_mask_and_adds_codes_and_sep(tmp_path):
    n_text, V, L, T = 50257, 16, 8, 8
    state = sedd_small_state_dict()
    torch.save({'model': {'module.' + k: v for k, v in state.items()}}, tmp_path / 'checkpoint.pth')
    model = P.SEDD(vocab_size=n_text + V + 1, seq_len=L + 1 + T, **P.PRIOR_MODELS['small'])
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    new = X.extend_pretrained(model, X.read_pretrained(str(tmp_path / 'checkpoint.pth')), n_text, V)
    got = model.state_dict()
    grown = ['vocab_embed.embedding', 'output_layer.linear.weight', 'output_layer.linear.bias']
    for key in grown:
        assert got[key].shape[0] == state[key].shape[0] + V + 1         # V codes and the separator
        assert torch.equal(got[key][:n_text], state[key][:n_text])      # text rows, bit for bit
        assert torch.equal(got[key][-1], state[key][-1])                # SEDD's mask is the mask
        assert torch.equal(got[key][n_text:n_text + V + 1], fresh[key][n_text:n_text + V + 1])
    for key, value in state.items():
        if key not in grown:
            assert torch.equal(got[key], value), key
    assert torch.equal(got['pos_embed'], fresh['pos_embed']) and any('pos_embed' in n for n in new)
    # the same file as .safetensors (the Hugging Face layout) and as a bare .bin state dict
    write_safetensors(tmp_path / 'model.safetensors', state)
    torch.save(state, tmp_path / 'pytorch_model.bin')
    for name in ['model.safetensors', 'pytorch_model.bin']:
        again = X.read_pretrained(str(tmp_path / name))
        assert set(again) == set(state), name
        assert all(torch.equal(again[k], v) for k, v in state.items()), name
    # a checkpoint of another vocabulary is refused, naming both sizes
    with pytest.raises(ValueError, match='50257 text tokens.*has 300'):
        other = P.SEDD(vocab_size=300 + V + 1, seq_len=L + 1 + T, **P.PRIOR_MODELS['small'])
        X.extend_pretrained(other, state, 300, V, 'sedd-small')
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        X.read_pretrained(str(tmp_path / 'nowhere.pth'))
    # with caption_adaln the pooled caption's projection is new too, and said to be
    pooled = X.CaptionSEDD(vocab_size=n_text + V + 1, seq_len=L + 1 + T, caption_start=L + 1,
                           caption_pad=50256, **P.PRIOR_MODELS['small'])
    new = X.extend_pretrained(pooled, state, n_text, V)
    assert 'caption_map.weight' in new and 'caption_map.bias' in new
    assert torch.equal(pooled.state_dict()['blocks.0.attn_qkv.weight'],
                       state['blocks.0.attn_qkv.weight'])


# -- the loss ---------------------------------------------------------------------------------

def tiny_model(vocab, seq_len):
    torch.manual_seed(0)
    model = P.SEDD(vocab_size=vocab, seq_len=seq_len, n_blocks=1, hidden_size=32, n_heads=2,
                   cond_dim=16, dropout=0.0)
    for p in model.parameters():                                    # away from the zero init
        p.data.add_(0.1 * torch.randn_like(p))
    return model


def test_the_loss_is_the_masked_cross_entropy_weighted_by_one_over_the_mask_probability():
    n_text, V, L = 10, 4, 3
    mask_id = n_text + V + 1
    model = tiny_model(mask_id, L + 1 + 4)
    codes = torch.tensor([[0, 3, 1], [2, 2, 0]])
    caps, lens = torch.tensor([[5, 6, 9, 9], [7, 9, 9, 9]]), torch.tensor([2, 1])
    x0, pad = X.sequences(codes, caps, lens, n_text, V)
    assert x0[0].tolist() == [10, 13, 11, 14, 5, 6, 9, 9] and pad[1].tolist() == [0] * 5 + [1] * 3
    t = torch.tensor([0.3, 0.8])
    u = torch.rand(x0.shape, generator=torch.Generator().manual_seed(1))
    u[:, -1] = 0.0                                          # pads: would be masked if allowed
    got, count = X.masked_cross_entropy(model, x0, ~pad, t, u, mask_id, 1e-3)
    p = 0.999 * t + 1e-3
    masked = (u < p[:, None]) & ~pad
    assert masked.any(1).all() and not (masked & pad).any()
    x_t = torch.where(masked, mask_id, x0)
    out = model(x_t, -torch.log1p(-p))
    for b in range(2):
        want = sum(-torch.log_softmax(out[b, i, :mask_id], -1)[x0[b, i]] / p[b]
                   for i in range(x0.shape[1]) if masked[b, i])
        torch.testing.assert_close(got[b], want)
    assert count.tolist() == masked.sum(1).tolist()


def test_caption_adaln_gives_every_block_the_mean_embedding_of_the_visible_caption_words():
    n_text, V, L, T = 10, 4, 3, 5
    mask_id, pad_id = n_text + V + 1, 9
    model = X.CaptionSEDD(vocab_size=mask_id, seq_len=L + 1 + T, n_blocks=2, hidden_size=32,
                          n_heads=2, cond_dim=16, dropout=0.0, caption_start=L + 1,
                          caption_pad=pad_id)
    seen = []
    model.caption_map.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x = torch.tensor([[14, 11, 15, 14, 5, 15, 6, 9, 9],       # words 5 and 6; one masked, pads
                      [15, 15, 15, 14, 9, 9, 9, 9, 9]])       # the empty caption
    model(x, torch.ones(2))
    emb = model.vocab_embed.embedding
    torch.testing.assert_close(seen[0][0], (emb[5] + emb[6]) / 2)
    assert torch.equal(seen[0][1], torch.zeros(32))
    # it reaches the blocks: with attention unable to carry the caption (its keys zeroed), the
    # code positions still change with the words, and SEDD's network (off) does not see them
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    plain = P.SEDD(vocab_size=mask_id, seq_len=L + 1 + T, n_blocks=2, hidden_size=32, n_heads=2,
                   cond_dim=16, dropout=0.0)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if 'caption_map' not in k})
    other = x.clone()
    other[0, L + 1] = 7
    for net, differs in [(model, True), (plain, False)]:
        with torch.no_grad():
            for b in net.blocks:
                b.attn_qkv.weight[32:64] = 0                  # keys 0: uniform attention ...
                b.attn_qkv.weight[64:] = 0                    # ... over values of 0
            out = net(torch.cat([x[:1], other[:1]]), torch.ones(2))[:, :L]
        assert (not torch.allclose(out[0], out[1])) == differs
    # a checkpoint rebuilds it from model_args
    args = dict(vocab_size=mask_id, seq_len=L + 1 + T, n_blocks=2, hidden_size=32, n_heads=2,
                cond_dim=16, dropout=0.0, caption_start=L + 1, caption_pad=pad_id)
    again = P.model_from_checkpoint(dict(model_args=args, ema=model.state_dict()), 'ema',
                                    X.CaptionSEDD)
    with torch.no_grad():
        torch.testing.assert_close(again(x, torch.ones(2)), model(x, torch.ones(2)))


def test_the_learning_rate_warms_up_then_follows_a_cosine_to_min_lr():
    c = dict(X.CONFIG, learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    lrs = [X.learning_rate_at(it, c) for it in range(111)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(5.5e-4) and lrs[110] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert X.learning_rate_at(60, dict(c, lr_decay=False)) == 1e-3


# -- generation -------------------------------------------------------------------------------

def test_generation_writes_only_code_tokens_and_never_touches_the_prompt():
    spec = X.encoding_spec('bytes')
    enc = X.encoding_from_spec(spec)
    L, V, T = 6, 5, 12
    n_text = enc.n_vocab
    model = tiny_model(n_text + V + 1, L + 1 + T)
    ckpt = dict(L=L, V=V, n_text=n_text, caption_len=T, noise_eps=1e-3)
    prompts = ['a red square', 'a much longer prompt than twelve bytes', '']
    caps, lens = X.encode_captions(enc, prompts, T)
    want = torch.cat([torch.full((3, 1), n_text + V), caps], 1)
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    for sampler, cfg_scale in [('random_order', 1.0), ('confidence', 1.0), ('analytic', 3.0),
                               ('euler', 1.0)]:
        seen.clear()
        codes = X.generate(model, enc, ckpt, prompts, [0, 1, 2], 'cpu', sampler, 4, 0.2, cfg_scale,
                           progress=False)
        assert codes.shape == (3, L) and codes.min() >= 0 and codes.max() < V
        conditional = [x for x in seen if (x[:, L + 1:] != enc.eot_token).any()]
        assert conditional and all(torch.equal(x[:, L:], want) for x in conditional)
        is_code = lambda x: (x[:, :L] >= n_text) & (x[:, :L] < n_text + V)
        assert all(((x[:, :L] == n_text + V + 1) | is_code(x)).all()    # codes or the mask
                   for x in seen)
        if cfg_scale != 1.0:                                    # the unconditional pass: empty
            assert any((x[:, L + 1:] == enc.eot_token).all() for x in seen)


# -- training on toy pairs whose captions decide the codes -------------------------------------

WORDS = ['red', 'green', 'blue', 'gold']


def toy_pairs(n, seed):
    """L = 4, V = 8: the caption 'red blue' (or 'the red one and ...') decides [a, b, a + b, 7]."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 4, n), rng.integers(0, 4, n)
    codes = np.stack([a, b + 4, (a + b) % 8, np.full(n, 7)], 1).astype(np.uint16)
    captions = [f"{WORDS[i]} {WORDS[j]}\tthe {WORDS[i]} one and the {WORDS[j]} one"
                for i, j in zip(a, b)]
    return codes, captions


@pytest.fixture(scope='module')
def toy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('toy_pairs')
    for split, n, seed in [('train', 2048, 0), ('val', 256, 1)]:
        codes, captions = toy_pairs(n, seed)
        write_codes(out, split, codes, 4, 8, 32, 'toy pairs')      # the dump and its sidecar
        (out / f'{split}_captions.txt').write_text('\n'.join(captions) + '\n')
    return str(out)


def tiny_cfg(toy_dir, out_dir, **kw):
    cfg = dict(X.CONFIG, codes_dir=toy_dir, data_dir=toy_dir, out_dir=str(out_dir), device='cpu',
               model='tiny', text_encoding='words', caption_len=8, dropout=0.0, batch_size=16,
               micro_batch_size=8, max_iters=4, learning_rate=1e-3, lr_decay=False, warmup_iters=2,
               ema_decay=0.9, eval_interval=0, log_interval=1, ckpt_interval=2, n_eval=64,
               sample_batch_size=64)
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize('caption_adaln', [False, True])
def test_a_briefly_trained_model_draws_the_codes_its_prompts_describe(toy_dir, tmp_path,
                                                                      caption_adaln):
    cfg = tiny_cfg(toy_dir, tmp_path, batch_size=64, micro_batch_size=64, max_iters=250,
                   noise_caption=False, caption_dropout=0.1, ema_decay=0.98, log_interval=50,
                   eval_interval=250, ckpt_interval=250, caption_adaln=caption_adaln)
    _, _, history = X.train(cfg)
    assert history[-1]['val_code_bits'] < 0.5 * history[0]['train_loss']
    prompts = [f"{WORDS[i]} {WORDS[j]}" for i in range(4) for j in range(4)]
    codes, _ = X.sample_mode(dict(cfg, mode='sample', prompts='|'.join(prompts), n_samples=64))
    want = np.array([[i, j + 4, (i + j) % 8, 7] for i in range(4) for j in range(4)] * 4)
    assert codes.shape == (64, 4) and codes.dtype == np.uint16
    assert (codes == want).all(1).mean() > 0.8                             # chance: 1 / 4096
    written = (tmp_path / 'text_codes_prompts.txt').read_text().splitlines()
    assert written[:16] == prompts and len(written) == 64


def test_t_min_draws_every_training_noise_level_from_t_min_to_one(toy_dir, tmp_path, monkeypatch):
    seen = []

    def recording(model, x0, noisable, t, *args, **kw):
        seen.append(t.clone())
        return loss(model, x0, noisable, t, *args, **kw)
    loss = X.masked_cross_entropy
    monkeypatch.setattr(X, 'masked_cross_entropy', recording)
    for t_min in [0.0, 0.6]:
        seen.clear()
        X.train(tiny_cfg(toy_dir, tmp_path / str(t_min), max_iters=20, t_min=t_min))
        t = torch.cat(seen)
        assert len(t) == 20 * 16 and t.max() < 1
        if t_min:
            assert t.min() >= t_min and t.mean() > 0.7         # U(0.6, 1): mean 0.8
        else:
            assert t.min() < 0.1 and t.mean() < 0.6            # U(0, 1): the paper's


def test_t_one_share_masks_every_code_of_that_share_of_the_sequences(toy_dir, tmp_path,
                                                                     monkeypatch):
    seen = []

    def recording(model, x0, noisable, t, u, mask_id, eps, *args, **kw):
        x_t, masked, p = X.noise(x0, noisable, t, u, mask_id, eps)
        seen.append((t.clone(), masked.sum(1) == noisable.sum(1), noisable.sum(1)))
        return loss(model, x0, noisable, t, u, mask_id, eps, *args, **kw)
    loss = X.masked_cross_entropy
    monkeypatch.setattr(X, 'masked_cross_entropy', recording)
    cfg = tiny_cfg(toy_dir, tmp_path, max_iters=40, t_min=0.25, t_one_share=0.5,
                   noise_caption=False)
    X.train(cfg)
    t, all_masked, n_codes = (torch.cat(v) for v in zip(*seen))
    one = t == 1 - cfg['noise_eps']                   # the sampler's first noise level
    assert 0.35 < one.float().mean() < 0.65 and (n_codes == 4).all()
    assert all_masked[one].float().mean() > 0.99      # p = 0.999: every code masked, nearly always
    assert t[~one].min() >= 0.25 and all_masked[~one].float().mean() < 0.5
    assert torch.isfinite(torch.tensor([h['train_loss'] for h in
                                        torch.load(tmp_path / 'text2dlc.pt')['history']])).all()
    seen.clear()                                      # the curriculum: from every row to none
    X.train(dict(cfg, out_dir=str(tmp_path / 'decay'), t_one_share=1.0, t_one_share_end=0.0))
    t = torch.stack([s[0] for s in seen])             # (40 iterations x 2 micro-batches, 8)
    one = (t == 1 - cfg['noise_eps']).float().reshape(40, -1).mean(1)
    assert one[0] == 1.0 and one[-4:].max() < 0.5 and one[:20].mean() > one[20:].mean()
    with pytest.raises(ValueError, match='t_one_share=1.5'):
        X.train(dict(cfg, t_one_share=1.5))


def as_args(cfg):
    return [f'--{k}={v!r}' if isinstance(v, (str, tuple)) else f'--{k}={v}'
            for k, v in cfg.items() if v != X.CONFIG[k]]


def test_two_processes_take_the_same_step_as_one_with_accumulation(toy_dir, tmp_path):
    for name, nproc in [('one', 1), ('two', 2)]:
        cfg = tiny_cfg(toy_dir, tmp_path / name, max_iters=2, noise_caption=True,
                       caption_dropout=0.3, dropout=0.1)
        run_script('text2dlc.py', as_args(cfg), nproc)
    a = torch.load(tmp_path / 'one' / 'text2dlc.pt', weights_only=True)
    b = torch.load(tmp_path / 'two' / 'text2dlc.pt', weights_only=True)
    assert (a['world_size'], b['world_size']) == (1, 2)    # one run of two processes, split
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], rtol=1e-5, atol=1e-6, msg=k)
    assert max((a['model'][k] - a['ema'][k]).abs().max().item() for k in a['model']) > 0
    assert a['encoding'] == b['encoding']
    assert X.encoding_from_spec(a['encoding']).decode([0x61]) == 'a'


def test_stop_and_resume_equals_an_uninterrupted_run(toy_dir, tmp_path):
    X.train(tiny_cfg(toy_dir, tmp_path / 'a', max_iters=6, dropout=0.1, caption_dropout=0.2))
    split = tiny_cfg(toy_dir, tmp_path / 'b', max_iters=6, run_iters=3, dropout=0.1,
                     caption_dropout=0.2)
    X.train(split)
    X.train(dict(split, init_from='resume', run_iters=-1))
    a = torch.load(tmp_path / 'a' / 'text2dlc.pt', weights_only=True)
    b = torch.load(tmp_path / 'b' / 'text2dlc.pt', weights_only=True)
    assert a['iter_num'] == b['iter_num'] == 6
    for part in ['model', 'ema']:
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    for k, state in a['optimizer']['state'].items():
        assert all(torch.equal(v, b['optimizer']['state'][k][j]) for j, v in state.items()), k


def test_captions_or_codes_that_do_not_fit_are_refused_with_the_file_named(toy_dir, tmp_path):
    bad = tmp_path / 'bad'
    bad.mkdir()
    codes, captions = toy_pairs(64, 0)
    write_codes(bad, 'train', codes, 4, 8, 32, 'toy pairs')
    (bad / 'train_captions.txt').write_text('\n'.join(captions[:60]) + '\n')
    with pytest.raises(ValueError,
                       match=r'train_captions.txt.*60 lines.*codes_train.npy.*64 codes'):
        X.train(tiny_cfg(str(bad), tmp_path / 'out'))
    (bad / 'train_captions.txt').write_text('\n\n')
    with pytest.raises(ValueError, match=r'train_captions.txt.*is empty'):
        X.train(tiny_cfg(str(bad), tmp_path / 'out'))
    (bad / 'train_captions.txt').write_text('\n'.join(captions) + '\n')
    np.save(bad / 'codes_train.npy', codes[:, :3])
    with pytest.raises(ValueError, match=r'codes_train.npy.*L=4'):
        X.train(tiny_cfg(str(bad), tmp_path / 'out'))
    with pytest.raises(FileNotFoundError, match=r'nowhere_train.txt'):
        missing = str(tmp_path / 'nowhere_{split}.txt')
        X.train(tiny_cfg(toy_dir, tmp_path / 'out', captions_path=missing))
    assert not (tmp_path / 'out' / 'text2dlc.pt').exists()


def test_a_captions_file_without_split_in_its_path_is_the_train_splits_alone(toy_dir, tmp_path,
                                                                             capsys):
    # the dump has a val split too; one file of train captions must not be read as val's
    captions = tmp_path / 'captions.txt'
    captions.write_text(open(os.path.join(toy_dir, 'train_captions.txt')).read())
    X.train(tiny_cfg(toy_dir, tmp_path / 'out', captions_path=str(captions), max_iters=1,
                     eval_interval=1))
    assert 'no {split}' in capsys.readouterr().out
    assert (tmp_path / 'out' / 'text2dlc.pt').exists()


def test_a_mistyped_prompts_file_is_named_not_taken_for_a_prompt(tmp_path):
    (tmp_path / 'prompts.txt').write_text('a red square\n42\n')
    assert X.read_prompts(str(tmp_path / 'prompts.txt')) == ['a red square', '42']
    assert X.read_prompts('a red square|42') == ['a red square', '42']
    with pytest.raises(FileNotFoundError, match='promts.txt'):
        X.read_prompts(str(tmp_path / 'promts.txt'))


def test_the_default_encoding_is_a_local_file_and_nothing_is_downloaded():
    assert os.path.splitext(X.CONFIG['text_encoding'])[1] == '.tiktoken'
    with pytest.raises(FileNotFoundError, match=X.R50K_URL):
        X.encoding_spec('/nowhere/r50k_base.tiktoken')


def test_bench_reports_text2dlc_throughput():
    import subprocess
    import sys
    result = subprocess.run([sys.executable, 'bench.py', '--component=text2dlc',
                             '--prior_model=tiny', '--L=8', '--V=8', '--n_text=300',
                             '--caption_len=8', '--batch_size=4', '--steps=1', '--warmup=1'],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'text2dlc tiny batch 4' in result.stdout and 'tok/s' in result.stdout
