# The built-in pipeline on data/shapes, scored by the attribute reader, with the checkpoints of
# the README's built-in commands: the tokenizer in out-shapes, the DiT in out-shapes-dit, the prior
# in out-shapes-prior, the text model in out-shapes-text2dlc (make demo passes its own folders).
# python sample.py config/sample_shapes.py --mode=recon,uncond,compose,text
# class and plain also need a class-conditional DiT (--class_dit) or one trained with cond='none'
# (--plain_dit): python diffusion.py config/diffusion_shapes.py --cond=class --num_classes=18
#   --out_dir=out-shapes-dit-class
out_dir = 'out-shapes-samples'
device = 'cpu'
n_samples = 200
diffusion_dir = 'out-shapes-dit'
class_dit = 'out-shapes-dit-class/diffusion.pt'
tokenizer_dir = 'out-shapes'
prior_dir = 'out-shapes-prior'
text2dlc_dir = 'out-shapes-text2dlc'
prompts = 'data/shapes/val_captions.txt'   # text: sample i prompted with val image i's caption
data_dir = 'data/shapes'
split = 'val'
dit_sampler = 'euler'           # the built-in DiT is a flow model (config/diffusion_shapes.py)
dit_steps = 25
cfg_scale = 3.0
guidance_interval = (0.1, 1.0)  # as config/diffusion_shapes.py: unguided last steps
clip_denoised = True
prior_steps = 128
# the 14 (shape, color) classes of the training split; the 4 held-out pairs (2, 9, 12, 17) have
# no training images, so the class-conditional DiT has never seen them
labels = '0,1,3,4,5,6,7,8,10,11,13,14,15,16'
batch_size = 50
text_cfg_scale = 2.0            # guidance on the prompt (config/text2dlc_shapes.py's cfg_scale)
