# A starting prior for your own folder of images, on one GPU: the ImageNet recipe
# (config/prior_imagenet.py) scaled down, its quality not measured here. SEDD's small DDiT
# (12 x 768) on config/tokenizer_folder.py's DLC128, AdamW 3e-4 after 2,500 warm-up iterations,
# EMA 0.9999, dropout 0.1, batch 256, 200,000 iterations; 128 analytic sampling steps.
#
#   python prior.py config/prior_folder.py
#   python prior.py config/prior_folder.py --mode=sample --n_samples=10000
out_dir = 'out-folder-prior'
auto_resume = True                        # a relaunched or restarted job continues from out_dir
codes_dir = 'out-folder-tokenizer'
model = 'small'
dropout = 0.1
batch_size = 256
micro_batch_size = 128
max_iters = 200000
learning_rate = 3e-4
warmup_iters = 2500
ema_decay = 0.9999
compile = True
eval_interval = 5000
n_eval = 2000
num_steps = 128
sample_batch_size = 250
