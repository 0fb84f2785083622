# The paper's image generator: DiT-XL/2 on SD-VAE latents of ImageNet 256, conditioned on DLC512.
# The training recipe is the paper's fork's (dit/train_diffusion.py,
# dit/train_scripts/launch_dit_L512.sh):
# AdamW at a constant 1e-4, no weight decay, batch 256, EMA 0.9999 from the first step, no gradient
# clipping, the whole code dropped with probability 0.1, 100 epochs.
#
# 1. latents, once (any number of GPUs; 1.28M images plus their mirror images):
#    torchrun --nproc_per_node=8 diffusion.py config/diffusion_imagenet.py --mode=extract \
#        --split=train --out_dir=out-imagenet-latents
# 2. training, 8 GPUs per node (add --nnodes/--node_rank/--rdzv_endpoint for more nodes):
#    torchrun --nproc_per_node=8 diffusion.py config/diffusion_imagenet.py
# 3. reconstructions of val codes:
#    python diffusion.py config/diffusion_imagenet.py --mode=recon --split=val --cfg_scale=1.5
out_dir = 'out-imagenet-dit'
auto_resume = True                        # a relaunched or restarted job continues from out_dir
data_dir = 'data/imagenet'
codes_dir = 'out-imagenet-tokenizer'      # codes_train.npy + codes.json (tokenizer.py --mode=dump)
latents_dir = 'out-imagenet-latents'
vae_path = 'weights/sd-vae-ft-ema/diffusion_pytorch_model.safetensors'
model = 'DiT-XL/2'
image_size = 256
cond = 'dlc'
objective = 'eps'
learn_sigma = True
class_dropout_prob = 0.1
batch_size = 256
micro_batch_size = 32
learning_rate = 1e-4
weight_decay = 0.0
ema_decay = 0.9999
ema_warmup = False                        # DiT's EMA: 0.9999 from step 0 (the warm-up: no change)
grad_clip = 0.0                           # DiT does not clip gradients
max_iters = 500400                        # 100 epochs of 1,281,167 images at batch 256 (5,004 each)
compile = True
sampler = 'ddpm'
num_sampling_steps = 250
log_interval = 100
ckpt_interval = 10000
sample_interval = 10000
