# The paper's prior for ImageNet 256: SEDD-medium DDiT (24 x 1024, 16 heads) on DLC512 (V = 256),
# AdamW 3e-4 (constant after a linear warmup of 2500), clip 1, EMA 0.9999, batch 512, 1.5M
# iterations
# (the fork's sedd/configs/config_sem_L512_hf.yaml: n_iters 1,500,001; config.yaml: 1,300,001).
# Sampling: 1,024 analytic steps to t = 1e-5, no corrector. On 8 GPUs:
# torchrun --nproc_per_node=8 prior.py config/prior_imagenet.py
# torchrun --nproc_per_node=8 prior.py config/prior_imagenet.py --mode=sample --n_samples=50000
out_dir = 'out-imagenet-prior'
auto_resume = True                        # a relaunched or restarted job continues from out_dir
codes_dir = 'out-imagenet-tokenizer'
model = 'medium'
dropout = 0.1
batch_size = 512
micro_batch_size = 64
max_iters = 1500000
learning_rate = 3e-4
warmup_iters = 2500
ema_decay = 0.9999
compile = True
eval_interval = 5000
n_eval = 10000
num_steps = 1024
sample_eps = 1e-5
sample_batch_size = 250
