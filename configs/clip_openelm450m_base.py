# TinyLLaVA OpenELM-450M-Instruct + CLIP-L/336, base recipe.
#
#   accelerate launch --config_file configs/accelerate/zero3.yaml train.py --config configs/clip_openelm450m_base.py
#   (4 GPUs: add --num_processes 4 after the yaml; the micro batch stays, accumulation doubles)
#
# gpus: 4 8
# hardware: 4-8x A100/H100 40/80 GB. Needs Hub access and remote code.
# time: ~2 h on 8x A100. A FLOP estimate at ~20% MFU, not measured.
# expected: not reported in our notes. The original README's Table 1 has 14 rows (with CLIP variants);
#   shared/reference/tinyllava_factory.md lists 11, not this one.
#   Compare with configs/siglip_openelm450m_base.py (SigLIP: MME 1118.8).
# batch (global = per GPU x GPUs x accumulation; recipes.py sets the globals and the learning rates):
#   finetune 128 = 16 x 8 x 1     4 GPUs: 128 = 16 x 4 x 2; the original: 128 = 16 x 4 x 2
#   pretrain 256 = 16 x 8 x 2     4 GPUs: 256 = 16 x 4 x 4; the original: 256 = 64 x 2 x 2
#     (same micro batch in both stages; the original pretrained with 64 per GPU, so
#     --pretrain.micro_batch_size=32 is faster if it fits)
# stages (recipes.py "base"): pretrain = connector only, lr 1e-3, "pretrain" template (LLaVA plain) on LCS-558K;
#   finetune = LLM + connector, lr 2e-5, llama template on LLaVA mix665k. 1 epoch each, cosine, 3% warmup,
#   no weight decay.
# CLIP-L/336: 576 image tokens.
# OpenELM is not in transformers: its model code comes from the Hub (trust_remote_code runs it), so this needs
# Hub access and trust in apple/OpenELM-*. The tokenizer is Llama-2's, gated (accept Meta's license first).
# The original used no FlashAttention for OpenELM. max_length 2048 (the default), as the original's scripts.
# Untested here (no OpenELM code offline); see configs/README.md, known issues.

llm = "apple/OpenELM-450M-Instruct"
tokenizer = "meta-llama/Llama-2-7b-hf"   # as the original (--tokenizer_name_or_path)
trust_remote_code = True
vision_tower = "openai/clip-vit-large-patch14-336"
connector = "mlp2x_gelu"
template = "llama"
recipe = "base"
micro_batch_size = 16        # per GPU, both stages; see the batch lines above
bf16 = True                 # the original: fp16; bf16 needs no loss scaling (V100/T4: --bf16=false --fp16=true)
gradient_checkpointing = True
num_workers = 8             # the original's dataloader_num_workers
save_every = 1000           # resumable checkpoints (--resume); they hold the optimizer state
out_dir = "out/clip_openelm450m_base"

# data: LLaVA-1.5's files (LLaVA README, "Train"); edit these paths to where yours are
data_pretrain = "data/llava/blip_laion_cc_sbu_558k.json"        # LCS-558K captions
images_pretrain = "data/llava/llava_pretrain/images"
data_finetune = "data/llava/llava_v1_5_mix665k.json"            # LLaVA-1.5 instruction mix
images_finetune = "data/llava/finetune_images"                  # holds coco/ gqa/ ocr_vqa/ textvqa/ vg/
