# The built-in image generator: a tiny DiT on 32 x 32 pixels of data/shapes, conditioned on the
# DLCs of the built-in tokenizer (run config/tokenizer_shapes.py and its probe first: the probe
# writes out-shapes/codes_{train,val}.npy).
# python diffusion.py config/diffusion_shapes.py && python diffusion.py config/diffusion_shapes.py --mode=recon
out_dir = 'out-shapes-dit'
data_dir = 'data/shapes'
codes_dir = 'out-shapes'
device = 'cpu'
model = 'DiT-Ti/4'              # depth 4, width 128, patch 4: 64 tokens per image
image_size = 32
cond = 'dlc'
objective = 'flow'              # learns far faster than eps prediction at this scale (README)
hflip = True
batch_size = 128
micro_batch_size = 128
max_iters = 2700              # about 30 minutes at about 205 img/s on 2 CPU cores
learning_rate = 1e-3
warmup_iters = 100
ema_decay = 0.999
sampler = 'euler'
num_sampling_steps = 25
cfg_scale = 3.0
clip_denoised = True
sample_interval = 900
n_grid = 16
log_interval = 50
ckpt_interval = 250
n_recon = 500
