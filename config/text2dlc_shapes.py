# The built-in text model: a tiny DDiT over [DLC][sep][caption] on the built-in tokenizer's codes
# (L = 32, V = 32) and the captions of data/shapes, on a 2-core CPU. Run config/tokenizer_shapes.py
# and its --mode=dump first (it writes out-shapes/codes_{train,val,ood}.npy).
# python text2dlc.py config/text2dlc_shapes.py
# python text2dlc.py config/text2dlc_shapes.py --mode=sample --prompts='a red square|a blue circle'
out_dir = 'out-shapes-text2dlc'
codes_dir = 'out-shapes'
data_dir = 'data/shapes'
# each line: the full caption, then three that leave factors out ('a red square'), one drawn per
# step
captions_path = 'data/shapes/{split}_captions_varied.txt'
device = 'cpu'
text_encoding = 'words'         # one token a word or comma: captions of at most 11 tokens
caption_len = 16                # padded to 16: at 12, short prompts kept 0.44 against 0.53
model = 'tiny'                  # 4 blocks, width 128
dropout = 0.0
caption_adaln = True            # the caption's mean word embedding also goes to every block's
                                # adaLN, so the shape word is used (docs/choices.md)
noise_caption = False
caption_dropout = 0.1
t_min = 0.25                    # noise levels t ~ U(0.25, 1), not U(0, 1): the codes fit sooner
t_one_share = 1.0               # and a share of the sequences at t = 1, every code masked: all of
t_one_share_end = 0.0           # them at first, none at the end, so the shape word is learned
                                # (docs/choices.md)
batch_size = 32
micro_batch_size = 32
max_iters = 5000                # about 14 minutes on one CPU core: 3,000 fall short (docs/choices.md)
learning_rate = 1e-3
min_lr = 1e-5
warmup_iters = 100
ema_decay = 0.999
eval_interval = 5000            # the held-out loss once, at the end
n_eval = 1000
log_interval = 100
ckpt_interval = 1000
sampler = 'random_order'
temperature = 0.2
cfg_scale = 2.0                 # guidance on the prompt: short prompts kept more often
