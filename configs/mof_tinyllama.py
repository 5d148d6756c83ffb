# TinyLLaVA MoF: TinyLlama-1.1B-Chat + CLIP-L/14 and DINOv2-L side by side (Interleaved-MoF, Tong et al. 2024),
# base recipe; the original's train_mof.sh.
#
#   accelerate launch --config_file configs/accelerate/zero3.yaml train.py --config configs/mof_tinyllama.py
#   (4 GPUs: add --num_processes 4 after the yaml; the micro batch stays, accumulation doubles)
#
# gpus: 4 8
# hardware: 4-8x A100/H100 (40 or 80 GB) with ZeRO-3 as the original; ddp.yaml also fits on 80 GB cards.
# time: ~3 h on 8x A100, ~2x on 4. A FLOP estimate at ~25% MFU, not measured.
# expected: not reported in our notes (no MoF row in the original's Table 1; issue #68 only says DINOv2 alone is
#   a little worse than CLIP on SQA/GQA). Compare with configs/clip_tinyllama_base.py / siglip_tinyllama_base.py.
# batch (global = per GPU x GPUs x accumulation; recipes.py sets the globals and the learning rates):
#   finetune 128 = 8 x 8 x 2     4 GPUs: 128 = 8 x 4 x 4; the original: 128 = 8 x 4 x 4 (finetune.sh)
#   pretrain 256 = 8 x 8 x 4     4 GPUs: 256 = 8 x 4 x 8; the original: 256 = 32 x 4 x 2 (pretrain.sh)
# stages (recipes.py "base"): pretrain = connector only, lr 1e-3, "pretrain" template (LLaVA plain) on LCS-558K;
#   finetune = LLM + connector, lr 2e-5, llama template on LLaVA mix665k. 1 epoch each, cosine, 3% warmup, no decay.
# Both towers see CLIP's preprocessed 224x224 image; each gives 256 patch tokens (CLS dropped) and mof_mlp maps them
# with two MLPs and interleaves them: 512 image tokens. Both towers stay frozen. max_length 2048 (the default).

llm = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
vision_tower = "openai/clip-vit-large-patch14"      # 224 px, as train_mof.sh (not the 336 px CLIP of Table 1)
vision_tower2 = "facebook/dinov2-large"             # same width as CLIP-L (1024), which mof_mlp requires
connector = "mof_mlp"
template = "llama"
recipe = "base"
micro_batch_size = 8        # per GPU, both stages; see the batch lines above
bf16 = True                 # the original: fp16; bf16 needs no loss scaling (V100/T4: --bf16=false --fp16=true)
gradient_checkpointing = True
num_workers = 8             # the original's dataloader_num_workers
save_every = 1000           # resumable checkpoints (--resume)
out_dir = "out/mof_tinyllama"

# data: LLaVA-1.5's files (LLaVA README, "Train"); edit these paths to where yours are
data_pretrain = "data/llava/blip_laion_cc_sbu_558k.json"        # LCS-558K captions
images_pretrain = "data/llava/llava_pretrain/images"
data_finetune = "data/llava/llava_v1_5_mix665k.json"            # LLaVA-1.5 instruction mix
images_finetune = "data/llava/finetune_images"                  # holds coco/ gqa/ ocr_vqa/ textvqa/ vg/
