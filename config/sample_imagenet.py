# The ImageNet 256 pipeline: 50,000 unconditional samples (prior -> DLC512 -> DiT-XL/2 on SD-VAE
# latents) for FID, on 8 GPUs; then python eval_fid.py --samples=out-imagenet-samples/uncond.npz
# --ref=VIRTUAL_imagenet256_labeled.npz (the ADM reference batch).
# torchrun --nproc_per_node=8 sample.py config/sample_imagenet.py
# Baseline: --mode=class --class_dit=weights/DiT-XL-2-256x256.pt --cfg_scale=1.5 (FID 2.27 in the DiT paper).
mode = 'uncond'
out_dir = 'out-imagenet-samples'
n_samples = 50000
diffusion_dir = 'out-imagenet-dit'
tokenizer_dir = 'out-imagenet-tokenizer'
prior_dir = 'out-imagenet-prior'
vae_path = 'weights/sd-vae-ft-ema/diffusion_pytorch_model.safetensors'
dit_sampler = 'ddpm'
dit_steps = 250
prior_steps = 1024
batch_size = 64
