# TinyLLaVA Phi-2 + CLIP-L/336, base recipe (Table 1 row CLIP-L/336 / phi-2 / base).
#
#   accelerate launch --config_file configs/accelerate/zero3.yaml train.py --config configs/clip_phi2_base.py
#   (4 GPUs: add --num_processes 4 after the yaml; the micro batch stays, accumulation doubles)
#
# gpus: 4 8
# hardware: 4-8x A100 40/80 GB with ZeRO-3, as the original. OOM on 40 GB: --micro_batch_size=4.
# time: ~6 h on 8x A100 (~2 h pretrain + ~4 h finetune), ~2x on 4. A FLOP estimate at ~35% MFU, not measured.
# expected (TinyLLaVA Factory README, Table 1 row CLIP-L/336 / phi-2 / base):
#   VQAv2 76.8 | GQA 59.4 | SQA-I 71.2 | TextVQA 53.4 |
#   MM-Vet 31.7 | POPE 86.8 | MME 1448.6 | MMMU-val 36.3
#   (SigLIP instead: configs/phi2_siglip_base.py, MME 1462.4)
# batch (global = per GPU x GPUs x accumulation; recipes.py sets the globals and the learning rates):
#   finetune 128 = 8 x 8 x 2     4 GPUs: 128 = 8 x 4 x 4; the original: 128 = 8 x 4 x 4 (finetune.sh)
#   pretrain 256 = 8 x 8 x 4     4 GPUs: 256 = 8 x 4 x 8; the original: 256 = 32 x 4 x 2 (pretrain.sh)
#     (same micro batch in both stages, more accumulation in pretrain; the LLM is frozen there, so a
#     larger --pretrain.micro_batch_size=... is faster if it fits)
# stages (recipes.py "base"): pretrain = connector only, lr 1e-3, "pretrain" template (LLaVA plain) on LCS-558K;
#   finetune = LLM + connector, lr 2e-5, phi template on LLaVA mix665k. 1 epoch each, cosine, 3% warmup,
#   no weight decay.
# CLIP-L/336: 576 image tokens (24x24 patches, CLS dropped), vs 729 for SigLIP-so400m/384.

llm = "microsoft/phi-2"
vision_tower = "openai/clip-vit-large-patch14-336"
connector = "mlp2x_gelu"
template = "phi"
recipe = "base"
micro_batch_size = 8        # per GPU, both stages; see the batch lines above
# train_phi.sh had MODEL_MAX_LENGTH=3072 until commit 04139fd (2025-04) set 2048, so the published phi-2
# numbers were most likely trained with 3072.
max_length = 3072
bf16 = True                 # the original: fp16; bf16 needs no loss scaling (V100/T4: --bf16=false --fp16=true)
gradient_checkpointing = True
num_workers = 8             # the original's dataloader_num_workers
save_every = 1000           # resumable checkpoints (--resume); they hold the optimizer state
out_dir = "out/clip_phi2_base"

# data: LLaVA-1.5's files (LLaVA README, "Train"); edit these paths to where yours are
data_pretrain = "data/llava/blip_laion_cc_sbu_558k.json"        # LCS-558K captions
images_pretrain = "data/llava/llava_pretrain/images"
data_finetune = "data/llava/llava_v1_5_mix665k.json"            # LLaVA-1.5 instruction mix
images_finetune = "data/llava/finetune_images"                  # holds coco/ gqa/ ocr_vqa/ textvqa/ vg/
