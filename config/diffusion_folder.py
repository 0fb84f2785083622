# A starting DiT for your own folder of images, on one GPU: the ImageNet recipe
# (config/diffusion_imagenet.py) scaled down to 64 px, its quality not measured here. DiT-B/2 on
# SD-VAE latents (64 px -> 8 x 8 x 4) conditioned on config/tokenizer_folder.py's DLC128;
# eps with learned variance, AdamW 1e-4, EMA 0.9999, the code dropped with probability 0.1, batch
# 256, 100,000 iterations.
#
#   python diffusion.py config/diffusion_folder.py --mode=extract --split=train \
#       --out_dir=out-folder-latents
#   python diffusion.py config/diffusion_folder.py
#   python diffusion.py config/diffusion_folder.py --mode=recon --split=val
#   python diffusion.py config/diffusion_folder.py --mode=decode \
#       --codes_path=out-folder-prior/samples.npy
out_dir = 'out-folder-dit'
auto_resume = True                        # a relaunched or restarted job continues from out_dir
data_dir = 'data/folder'
codes_dir = 'out-folder-tokenizer'
latents_dir = 'out-folder-latents'
vae_path = 'weights/sd-vae-ft-ema/diffusion_pytorch_model.safetensors'
model = 'DiT-B/2'
image_size = 64
cond = 'dlc'
objective = 'eps'
learn_sigma = True
class_dropout_prob = 0.1
batch_size = 256
micro_batch_size = 128
learning_rate = 1e-4
weight_decay = 0.0
ema_decay = 0.9999
ema_warmup = False
grad_clip = 0.0
max_iters = 100000
compile = True
sampler = 'ddpm'
num_sampling_steps = 250
ckpt_interval = 5000
sample_interval = 5000
