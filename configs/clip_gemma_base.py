# TinyLLaVA Gemma-2B-it + CLIP-L/336, base recipe.
#
#   accelerate launch --config_file configs/accelerate/zero3.yaml train.py --config configs/clip_gemma_base.py
#   (4 GPUs: add --num_processes 4 after the yaml; the micro batch stays, accumulation doubles)
#
# gpus: 4 8
# hardware: 4-8x A100 40/80 GB with ZeRO-3, as the original. Gemma is gated: accept its license on the Hub first.
# time: ~6.5 h on 8x A100, ~2x on 4. A FLOP estimate at ~30% MFU, not measured.
# expected: not reported in our notes. The original README's Table 1 has 14 rows (with CLIP variants);
#   shared/reference/tinyllava_factory.md lists 11, not this one.
#   Compare with configs/siglip_gemma_base.py (SigLIP: MME 1339.0).
# batch (global = per GPU x GPUs x accumulation; recipes.py sets the globals and the learning rates):
#   finetune 128 = 2 x 8 x 8     4 GPUs: 128 = 2 x 4 x 16; the original: 128 = 2 x 4 x 16
#   pretrain 256 = 2 x 8 x 16     4 GPUs: 256 = 2 x 4 x 32; the original: 256 = 8 x 4 x 8
#     (micro batch 2 is the original's finetune one, kept for pretrain; its pretrain ran 8 per GPU, so
#     --pretrain.micro_batch_size=8 is faster if it fits. Gemma's 256K vocabulary makes the logits large.)
# stages (recipes.py "base"): pretrain = connector only, lr 1e-3, "pretrain" template (LLaVA plain) on LCS-558K;
#   finetune = LLM + connector, lr 2e-5, gemma template on LLaVA mix665k. 1 epoch each, cosine, 3% warmup,
#   no weight decay.
# CLIP-L/336: 576 image tokens. max_length 2048 (the default), as the original's scripts.

llm = "google/gemma-2b-it"
vision_tower = "openai/clip-vit-large-patch14-336"
connector = "mlp2x_gelu"
template = "gemma"
recipe = "base"
micro_batch_size = 2        # per GPU, both stages; see the batch lines above
bf16 = True                 # the original: fp16; bf16 needs no loss scaling (V100/T4: --bf16=false --fp16=true)
gradient_checkpointing = True
num_workers = 8             # the original's dataloader_num_workers
save_every = 1000           # resumable checkpoints (--resume); they hold the optimizer state
out_dir = "out/clip_gemma_base"

# data: LLaVA-1.5's files (LLaVA README, "Train"); edit these paths to where yours are
data_pretrain = "data/llava/blip_laion_cc_sbu_558k.json"        # LCS-558K captions
images_pretrain = "data/llava/llava_pretrain/images"
data_finetune = "data/llava/llava_v1_5_mix665k.json"            # LLaVA-1.5 instruction mix
images_finetune = "data/llava/finetune_images"                  # holds coco/ gqa/ ocr_vqa/ textvqa/ vg/
