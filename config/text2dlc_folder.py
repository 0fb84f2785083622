# A starting text model for your own captioned images, on one GPU: the ImageNet recipe
# (config/text2dlc_imagenet.py) on SEDD-small, its quality not measured here. Captions:
# data/folder/{train,val}_captions.txt, a line per item of codes_<split>.npy in the dump's order
# (the sorted relative paths of the split's images), tab-separated alternatives on a line.
#
#   python text2dlc.py config/text2dlc_folder.py
#   python text2dlc.py config/text2dlc_folder.py --mode=sample --prompts='a red car|a dog'
out_dir = 'out-folder-text2dlc'
auto_resume = True                        # a relaunched or restarted job continues from out_dir
init_from = 'weights/sedd-small/model.safetensors'
codes_dir = 'out-folder-tokenizer'
captions_path = 'data/folder/{split}_captions.txt'
text_encoding = 'weights/r50k_base.tiktoken'    # GPT-2's ranks: exactly tiktoken's 'gpt2'
model = 'small'
caption_len = 64
batch_size = 128
micro_batch_size = 32
max_iters = 50000
compile = True
eval_interval = 5000
n_eval = 1000
