# The built-in tokenizer: a tiny ViT + SEM on data/shapes (32 x 32), on a 2-core CPU.
# python tokenizer.py config/tokenizer_shapes.py
out_dir = 'out-shapes'
data_dir = 'data/shapes'
device = 'cpu'
patch_size = 8
embed_dim = 128
depth = 4
num_heads = 4
image_size = 32
drop_path_rate = 0.0
layerscale_init = 0.1
L = 32
V = 32
# The paper trains at tau = 1. Here a lower temperature makes what the loss sees closer to the
# argmax code, and the probe reads more shape (docs/choices.md).
tau = 0.2
ssl_loss = 'infonce'
infonce_temp = 0.1
head_hidden_dim = 512
head_bottleneck_dim = 128
# Augmentations must keep the factors the codes have to capture: no color jitter, grayscale
# or solarization (color is a factor), mild crops (size is a factor; a small crop would cut
# the shape off), horizontal flips only (an upside-down triangle is not in the data).
global_crop_scale = (0.6, 1.0)
n_local_crops = 0
color_jitter_prob = 0.0
grayscale_prob = 0.0
blur_prob = (0.0, 0.0, 0.0)
solarize_prob = (0.0, 0.0, 0.0)
batch_size = 256
max_iters = 50                  # a third of a minute's training: the probe reads as much shape as
warmup_iters = 10               # at 150 (longer runs lose shape, docs/choices.md)
learning_rate = 2e-3
min_lr = 1e-5
weight_decay = 0.05
weight_decay_end = 0.05
layer_decay = 1.0
grad_clip = 3.0
log_interval = 20
ckpt_interval = 100
dump_batch_size = 1000
dump_split = 'train,val,ood'    # --mode=dump: every split of the built-in data
