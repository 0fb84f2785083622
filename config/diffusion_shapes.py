# The built-in image generator: a tiny DiT on 32 x 32 pixels of data/shapes, conditioned on the
# DLCs of the built-in tokenizer (run config/tokenizer_shapes.py and its --mode=dump first: it
# writes out-shapes/codes_{train,val,ood}.npy). Why each setting: docs/choices.md, diffusion.py.
# python diffusion.py config/diffusion_shapes.py
# python diffusion.py config/diffusion_shapes.py --mode=recon
out_dir = 'out-shapes-dit'
data_dir = 'data/shapes'
codes_dir = 'out-shapes'
device = 'cpu'
model = 'DiT-Ti/8'              # depth 4, width 128, patch 8: 16 tokens, 2.5x patch 4's img/CPU-s
head_hidden = 512               # each 8 x 8 patch drawn through a hidden layer (not in DiT)
mlp_ratio = 2.0                 # blocks' MLPs at twice the width, not 4x: 0.79 of the step's time
image_size = 32
cond = 'dlc'
objective = 'flow'              # learns far faster than eps prediction here
flow_output = 'x0'              # predict the clean image: flat backgrounds come easily
flow_t_mean = 0.8               # t = sigmoid(N(0.8, 0.8)): most draws at high noise (shapes form)
flow_t_std = 0.8
hflip = True
batch_size = 32                 # small batches, many steps: better per CPU-minute than 128
micro_batch_size = 32
max_iters = 13000               # about 11 minutes on one CPU core (docs/choices.md: time to quality)
learning_rate = 2e-3            # with the hidden layer, better than 1e-3 (docs/choices.md)
warmup_iters = 100
cooldown_frac = 0.3             # the lr falls linearly to 0 over the last 3,900 iterations
cond_lr_mult = 30.0             # the code tables at 30 x the lr: each row is 1/32 of the embedding
ema_decay = 0.999
sampler = 'euler'
num_sampling_steps = 25
cfg_scale = 3.0
guidance_interval = (0.1, 1.0)  # no guidance in the last 2 of the 25 steps: it amplifies texture
clip_denoised = True
sample_interval = 6500
n_grid = 16
log_interval = 50
ckpt_interval = 2000
n_recon = 500
