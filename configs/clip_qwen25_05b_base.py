# TinyLLaVA Qwen2.5-0.5B + CLIP-L/336, base recipe.
#
#   accelerate launch --config_file configs/accelerate/zero3.yaml train.py --config configs/clip_qwen25_05b_base.py
#   (4 GPUs: add --num_processes 4 after the yaml; the micro batch stays, accumulation doubles)
#
# gpus: 1 4 8
# hardware: 8 GPUs as the original's qwen2 scripts; ~0.8B in all, so ddp.yaml or one 40-80 GB GPU also works
#   (1 GPU: 128 = 4 x 1 x 32, 256 = 4 x 1 x 64).
# time: ~2 h on 8x A100. A FLOP estimate at ~20% MFU, not measured.
# expected: not reported in our notes. The original README's Table 1 has 14 rows (with CLIP variants);
#   shared/reference/tinyllava_factory.md lists 11, not this one.
#   Compare with configs/siglip_qwen25_05b_base.py (SigLIP: MME 1253.0).
# batch (global = per GPU x GPUs x accumulation; recipes.py sets the globals and the learning rates):
#   finetune 128 = 4 x 8 x 4     4 GPUs: 128 = 4 x 4 x 8; the original: 128 = 4 x 8 x 4
#   pretrain 256 = 4 x 8 x 8     4 GPUs: 256 = 4 x 4 x 16; the original: 256 = 16 x 8 x 2
# stages (recipes.py "base"): pretrain = connector only, lr 1e-3, "pretrain" template (LLaVA plain) on LCS-558K;
#   finetune = LLM + connector, lr 2e-5, qwen2_base template on LLaVA mix665k. 1 epoch each, cosine, 3% warmup,
#   no weight decay.
# CLIP-L/336: 576 image tokens. max_length 2048 (the default), as the original's scripts.

llm = "Qwen/Qwen2.5-0.5B"
vision_tower = "openai/clip-vit-large-patch14-336"
connector = "mlp2x_gelu"
template = "qwen2_base"
recipe = "base"
micro_batch_size = 4        # per GPU, both stages; see the batch lines above
bf16 = True                 # as the original's qwen2 scripts (the only ones in bf16; the rest used fp16)
gradient_checkpointing = True
num_workers = 8             # the original's dataloader_num_workers
save_every = 1000           # resumable checkpoints (--resume); they hold the optimizer state
out_dir = "out/clip_qwen25_05b_base"

# data: LLaVA-1.5's files (LLaVA README, "Train"); edit these paths to where yours are
data_pretrain = "data/llava/blip_laion_cc_sbu_558k.json"        # LCS-558K captions
images_pretrain = "data/llava/llava_pretrain/images"
data_finetune = "data/llava/llava_v1_5_mix665k.json"            # LLaVA-1.5 instruction mix
images_finetune = "data/llava/finetune_images"                  # holds coco/ gqa/ ocr_vqa/ textvqa/ vg/
