# The built-in prior: a tiny DDiT on the DLCs of the built-in tokenizer (L = 32, V = 32), on a
# 2-core CPU. Run config/tokenizer_shapes.py and its probe first (the probe writes the dumps).
# python prior.py config/prior_shapes.py && python prior.py config/prior_shapes.py --mode=eval
# python prior.py config/prior_shapes.py --mode=sample
out_dir = 'out-shapes-prior'
codes_dir = 'out-shapes'
device = 'cpu'
model = 'tiny'                  # 4 blocks, width 128
dropout = 0.0
batch_size = 128
micro_batch_size = 128
max_iters = 1600                # about 9 minutes at about 12k tok/s on 2 CPU cores
learning_rate = 1e-3
warmup_iters = 100
ema_decay = 0.999
eval_interval = 400
n_eval = 2000
log_interval = 100
ckpt_interval = 400
num_steps = 128                 # 2,000 codes in about 5 minutes on 2 CPU cores
n_samples = 2000
sample_batch_size = 500
