# The paper's other unconditional ImageNet 256 run (scripts/gen_50k_sedd-4096-remask.sh): the
# prior's analytic sampler, 4,096 steps to t = 1e-5, with the paper's corrector at eta 0.01 (for
# t in (0.3, 0.55), run_sample.py's --t0 and --t1 defaults); the DiT's DDPM sampler, 256 steps,
# no guidance (cfg 1.0), no clipping. 50,000 samples for FID, on 8 GPUs:
# torchrun --nproc_per_node=8 sample.py config/sample_imagenet_corrector.py
# then python eval_fid.py --samples=out-imagenet-samples-corrector/uncond.npz \
#     --ref=weights/VIRTUAL_imagenet256_labeled.npz
mode = 'uncond'
out_dir = 'out-imagenet-samples-corrector'
n_samples = 50000
diffusion_dir = 'out-imagenet-dit'
tokenizer_dir = 'out-imagenet-tokenizer'
prior_dir = 'out-imagenet-prior'
vae_path = 'weights/sd-vae-ft-ema/diffusion_pytorch_model.safetensors'
dit_sampler = 'ddpm'
dit_steps = 256
cfg_scale = 1.0
clip_denoised = False
prior_sampler = 'analytic'
prior_steps = 4096
prior_sample_eps = 1e-5
prior_corrector = 'paper'
remask_eta = 0.01
batch_size = 64
compose_cfg_scale = 4.0                   # composition: the paper's pipeline default
