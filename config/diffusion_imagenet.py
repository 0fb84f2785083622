# The paper's image generator: DiT-XL/2 on SD-VAE latents of ImageNet 256, conditioned on DLC512.
#
# 1. latents, once (any number of GPUs; 1.28M images plus their mirror images):
#    torchrun --nproc_per_node=8 diffusion.py config/diffusion_imagenet.py --mode=extract --split=train --out_dir=out-imagenet-latents
# 2. training, 8 GPUs per node (add --nnodes/--node_rank/--rdzv_endpoint for more nodes):
#    torchrun --nproc_per_node=8 diffusion.py config/diffusion_imagenet.py
# 3. reconstructions of val codes:
#    python diffusion.py config/diffusion_imagenet.py --mode=recon --split=val --cfg_scale=1.5
out_dir = 'out-imagenet-dit'
data_dir = 'data/imagenet'
codes_dir = 'out-imagenet-tokenizer'      # tokenizer.pt + codes_train.npy from tokenizer.py --mode=dump
latents_dir = 'out-imagenet-latents'
vae_path = 'weights/sd-vae-ft-ema/diffusion_pytorch_model.safetensors'
model = 'DiT-XL/2'
image_size = 256
cond = 'dlc'
objective = 'eps'
learn_sigma = True
batch_size = 256
micro_batch_size = 32
learning_rate = 1e-4
ema_decay = 0.9999
max_iters = 400000
compile = True
sampler = 'ddpm'
num_sampling_steps = 250
log_interval = 100
ckpt_interval = 10000
sample_interval = 10000
