# TinyLLaVA-Phi-2-SigLIP, base pretrain then LoRA finetune (Table 1 row SigLIP-so400m / phi-2 / base&lora).
#
#   accelerate launch --config_file configs/accelerate/zero2.yaml train.py --config configs/phi2_siglip_lora.py
#   (4 GPUs: add --num_processes 4 after the yaml; the micro batch stays, accumulation doubles)
#
# gpus: 4 8
# hardware: 4-8x A100 40/80 GB with ZeRO-2, as the original's finetune_lora.sh (LoRA leaves the frozen weights
#   unsharded: no need for ZeRO-3). 24-48 GB cards: --micro_batch_size=4 or 2.
# time: ~6 h on 8x A100 (~2.5 h pretrain + ~3.5 h LoRA finetune), ~2x on 4. A FLOP estimate at ~35% MFU, not measured.
# expected (TinyLLaVA Factory README, Table 1 row SigLIP-so400m / phi-2 / base&lora):
#   VQAv2 77.6 | GQA 59.7 | SQA-I 71.6 | TextVQA 53.8 |
#   MM-Vet 33.3 | POPE 87.9 | MME 1413.2 | MMMU-val 35.6
#   (full finetune, configs/phi2_siglip_base.py: MME 1462.4)
# batch (global = per GPU x GPUs x accumulation; recipes.py sets the globals and the learning rates):
#   finetune 128 = 8 x 8 x 2     4 GPUs: 128 = 8 x 4 x 4; the original: 128 = 8 x 4 x 4 (finetune_lora.sh)
#   pretrain 256 = 8 x 8 x 4     4 GPUs: 256 = 8 x 4 x 8; the original: 256 = 32 x 4 x 2 (pretrain.sh, ZeRO-3)
# stages (recipes.py "lora"): pretrain = connector only, lr 1e-3, "pretrain" template on LCS-558K;
#   finetune = LoRA r 128, alpha 256, dropout 0.05 on every Linear of the LLM except the head + the connector in
#   full, lr 2e-4, phi template on LLaVA mix665k. The final save writes the model with the adapters merged and
#   the adapter alone in 2_finetune/adapter_llm/.
# The original turned group_by_modality_length off for LoRA; grouping only changes batch composition and speed
#   here (--group_by_length=false for the original's order).

llm = "microsoft/phi-2"
vision_tower = "google/siglip-so400m-patch14-384"
connector = "mlp2x_gelu"
template = "phi"
recipe = "lora"
micro_batch_size = 8        # per GPU, both stages; see the batch lines above
max_length = 3072           # the original's finetune_lora.sh
bf16 = True                 # the original: fp16; bf16 needs no loss scaling (V100/T4: --bf16=false --fp16=true)
gradient_checkpointing = True
num_workers = 8             # the original's dataloader_num_workers
save_every = 1000           # resumable checkpoints (--resume)
out_dir = "out/phi2_siglip_lora"

# data: LLaVA-1.5's files (LLaVA README, "Train"); edit these paths to where yours are
data_pretrain = "data/llava/blip_laion_cc_sbu_558k.json"        # LCS-558K captions
images_pretrain = "data/llava/llava_pretrain/images"
data_finetune = "data/llava/llava_v1_5_mix665k.json"            # LLaVA-1.5 instruction mix
images_finetune = "data/llava/finetune_images"                  # holds coco/ gqa/ ocr_vqa/ textvqa/ vg/
