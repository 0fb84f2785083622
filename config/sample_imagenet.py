# The ImageNet 256 pipeline: 50,000 unconditional samples (prior -> DLC512 -> DiT-XL/2 on SD-VAE
# latents) for FID, on 8 GPUs; then python eval_fid.py --samples=out-imagenet-samples/uncond.npz
# --ref=weights/VIRTUAL_imagenet256_labeled.npz (the ADM reference batch).
# torchrun --nproc_per_node=8 sample.py config/sample_imagenet.py
# The paper's run scripts/gen_50k_sedd-1024_cfg-1.7.sh: the prior's analytic sampler, 1,024 steps to
# t = 1e-5, no corrector; the DiT's DDPM sampler, 256 steps, guidance 1.7 (on every eps channel),
# no clipping. Its other run, 4,096 steps with the paper's corrector:
# config/sample_imagenet_corrector.py.
# Composition (--mode=compose) as the paper's dit/sample_comp_imgs.py: guidance 4.0 (the pipeline's
# default; its --cfg-scale reaches only the file names), 250 DDPM steps: --dit_steps=250.
# Baseline: --mode=class --class_dit=weights/DiT-XL-2-256x256.pt --cfg_scale=1.5 --dit_steps=250
# (FID 2.27 in the DiT paper).
mode = 'uncond'
out_dir = 'out-imagenet-samples'
n_samples = 50000
diffusion_dir = 'out-imagenet-dit'
tokenizer_dir = 'out-imagenet-tokenizer'
prior_dir = 'out-imagenet-prior'
vae_path = 'weights/sd-vae-ft-ema/diffusion_pytorch_model.safetensors'
dit_sampler = 'ddpm'
dit_steps = 256
cfg_scale = 1.7
compose_cfg_scale = 4.0
clip_denoised = False
prior_sampler = 'analytic'
prior_steps = 1024
prior_sample_eps = 1e-5
remask_eta = 0.0                # no corrector (the paper's run has none)
batch_size = 64
