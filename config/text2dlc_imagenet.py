# The paper's text-to-DLC recipe on ImageNet's DLC512 codes, on a GPT-2-vocabulary SEDD-medium
# (the paper fine-tunes LLaDA-8B on LAION-400M; README "Where this implementation departs").
# lr 1e-5, cosine, 5 warm-up steps, batch 128, the whole sequence masked: text2dlc.py's defaults.
#
# Captions: a text file per split, data/imagenet/{train,val}_captions.txt, one caption per line
# for each item of codes_<split>.npy, in the dump's order (the sorted relative paths of the split's
# images, images.py); tab-separated captions on a line are alternatives, one drawn per step.
# Local files only (docs/details.md, "External files"): GPT-2's ranks and SEDD-medium's weights.
#
#   torchrun --nproc_per_node=8 text2dlc.py config/text2dlc_imagenet.py
#   python text2dlc.py config/text2dlc_imagenet.py --mode=sample --prompts='a goldfish|a tabby cat'
out_dir = 'out-imagenet-text2dlc'
auto_resume = True                        # a relaunched or restarted job continues from out_dir
init_from = 'weights/sedd-medium/model.safetensors'
codes_dir = 'out-imagenet-tokenizer'      # codes_{train,val}.npy + codes.json (tokenizer dumps)
captions_path = 'data/imagenet/{split}_captions.txt'
text_encoding = 'weights/r50k_base.tiktoken'    # GPT-2's ranks: exactly tiktoken's 'gpt2'
model = 'medium'
caption_len = 128
batch_size = 128
micro_batch_size = 16
compile = True
eval_interval = 5000
n_eval = 1024
ckpt_interval = 5000
