# The built-in prior: a tiny DDiT on the DLCs of the built-in tokenizer (L = 32, V = 32), on a
# 2-core CPU. Run config/tokenizer_shapes.py and its --mode=dump first (it writes the dumps).
# python prior.py config/prior_shapes.py && python prior.py config/prior_shapes.py --mode=eval
# python prior.py config/prior_shapes.py --mode=sample
out_dir = 'out-shapes-prior'
codes_dir = 'out-shapes'
device = 'cpu'
model = 'tiny'                  # 4 blocks, width 128
dropout = 0.0
batch_size = 32                 # small batches, many steps: the ELBO falls faster per CPU-second
micro_batch_size = 32
max_iters = 3000                # about 5 minutes on one CPU core: the DiT draws its samples
                                # valid in 0.920 at ELBO 0.319, 0.840 at 0.365 (1,400 iterations)
learning_rate = 5e-3
warmup_iters = 50
cooldown_frac = 0.5             # the lr falls linearly to 0 over the second half
ema_decay = 0.999
eval_interval = 3000            # the held-out ELBO once, at the end
n_eval = 2000
log_interval = 100
ckpt_interval = 1000
num_steps = 128                 # 2,000 codes in minutes on 2 CPU cores
n_samples = 2000
sample_batch_size = 500
