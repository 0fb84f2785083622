# A starting tokenizer for your own folder of images, on one GPU: the ImageNet recipe
# (config/tokenizer_imagenet.py) scaled down, its quality not measured here. ViT-S/14 with 4
# registers from DINOv2's weights at 112 px (an 8 x 8 grid), DLC128 = 128 tokens of 256, DINOv2's
# loss with 16,384 prototypes, batch 128, 25,000 iterations; everything else is tokenizer.py's
# defaults (the paper's recipe). Layout (images.py): data/folder/train/<class>/* or a flat
# data/folder/train/*, data/folder/val/* (either layout); README "Your own images".
#
#   python tokenizer.py config/tokenizer_folder.py
#   python tokenizer.py config/tokenizer_folder.py --mode=dump --dump_split=train,val
out_dir = 'out-folder-tokenizer'
init_from = 'weights/dinov2_vits14_reg4_pretrain.pth'
auto_resume = True                        # a relaunched or restarted job continues from out_dir
data_dir = 'data/folder'
patch_size = 14
embed_dim = 384
depth = 12
num_heads = 6
image_size = 112
local_crop_size = 56                      # 224 : 98 in the recipe
L = 128
V = 256
ssl_loss = 'dino'
n_prototypes = 16384
batch_size = 128
max_iters = 25000
compile = True
ckpt_interval = 2500
