# The paper's tokenizer: DINOv2 ViT-L/14 with 4 registers + SEM, fine-tuned on ImageNet-1k
# with DINOv2's recipe (DINO + iBOT + KoLeo, multi-crop), DLC512 = 512 tokens of 256.
#
#   torchrun --nproc_per_node=8 tokenizer.py config/tokenizer_imagenet.py
#   python tokenizer.py config/tokenizer_imagenet.py --mode=dump --dump_split=train,val
#   python tokenizer.py config/tokenizer_imagenet.py --mode=probe
#   # or the paper's own encoder, from its DINOv2 fork's eval/<iteration>/teacher_checkpoint.pth:
#   python tokenizer.py config/tokenizer_imagenet.py --mode=import \
#       --init_from=<teacher_checkpoint.pth>
#
# The other shapes of the paper (L * V = 2^17): --L=32 --V=4096 (DLC32), --L=128 --V=1024.
# Everything not set here is the recipe, from the defaults at the top of tokenizer.py.
out_dir = 'out-imagenet-tokenizer'
init_from = 'weights/dinov2_vitl14_reg4_pretrain.pth'
auto_resume = True                        # a relaunched or restarted job continues from out_dir
data_dir = 'data/imagenet'          # data/imagenet/{train,val}/<wnid>/*.JPEG
patch_size = 14
embed_dim = 1024
depth = 24
num_heads = 16
image_size = 224
L = 512
V = 256
ssl_loss = 'dino'
batch_size = 256
max_iters = 125000
compile = True
num_workers = 10
log_interval = 100
ckpt_interval = 2500
