# The pipeline on your own folder of images (config/*_folder.py), on one GPU: 10,000 images per
# mode, DiT-B/2's 250 DDPM steps at guidance 1.5, the prior's 128 analytic steps; then FID against
# the real val images (read in ADM's view at 64 px):
#
#   python sample.py config/sample_folder.py --mode=recon,uncond
#   python eval_fid.py --samples=out-folder-samples/uncond.npz --ref=data/folder/val \
#       --inception_path=weights/pt_inception-2015-12-05-6726825d.pth
mode = 'uncond'
out_dir = 'out-folder-samples'
n_samples = 10000
diffusion_dir = 'out-folder-dit'
tokenizer_dir = 'out-folder-tokenizer'
prior_dir = 'out-folder-prior'
text2dlc_dir = 'out-folder-text2dlc'
vae_path = 'weights/sd-vae-ft-ema/diffusion_pytorch_model.safetensors'
data_dir = 'data/folder'
split = 'val'
dit_sampler = 'ddpm'
dit_steps = 250
cfg_scale = 1.5
prior_steps = 128
batch_size = 64
