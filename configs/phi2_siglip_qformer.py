# TinyLLaVA Phi-2 + SigLIP-so400m with a Q-Former connector (BLIP-2 style, 128 learned queries), base recipe.
# An ablation of configs/phi2_siglip_base.py: only the connector differs.
#
#   accelerate launch --config_file configs/accelerate/zero3.yaml train.py --config configs/phi2_siglip_qformer.py
#   (4 GPUs: add --num_processes 4 after the yaml; the micro batch stays, accumulation doubles)
#
# gpus: 4 8
# hardware: 4-8x A100 40/80 GB with ZeRO-3, as configs/phi2_siglip_base.py.
# time: ~2.5 h on 8x A100 (the LLM sees 128 image tokens instead of 729: ~2.5-4x fewer tokens), ~2x on 4.
#   A FLOP estimate at ~35% MFU, not measured.
# expected: not reported (the original ships the Q-Former connector but no script or numbers for it); the
#   mlp2x_gelu baseline is configs/phi2_siglip_base.py (MME 1462.4).
# batch (global = per GPU x GPUs x accumulation; recipes.py sets the globals and the learning rates):
#   finetune 128 = 8 x 8 x 2     4 GPUs: 128 = 8 x 4 x 4 (as phi2_siglip_base.py)
#   pretrain 256 = 8 x 8 x 4     4 GPUs: 256 = 8 x 4 x 8
# stages (recipes.py "base"): pretrain = connector only, lr 1e-3 (here that trains the whole Q-Former from random
#   init, as the original: no BERT weights are loaded); finetune = LLM + connector, lr 2e-5, phi template.
# The Q-Former: BERT-base shape (hidden 768, 12 layers, 12 heads, cross-attention to the image every 2nd layer),
#   query tokens only, then Linear(768, LLM width); see connectors.py.

llm = "microsoft/phi-2"
vision_tower = "google/siglip-so400m-patch14-384"
connector = "qformer"
num_queries = 128           # image tokens per image; the original's default (ModelArguments.num_queries)
template = "phi"
recipe = "base"
micro_batch_size = 8        # per GPU, both stages; see the batch lines above
max_length = 3072           # as configs/phi2_siglip_base.py, so that only the connector differs
bf16 = True                 # the original: fp16; bf16 needs no loss scaling (V100/T4: --bf16=false --fp16=true)
gradient_checkpointing = True
num_workers = 8             # the original's dataloader_num_workers
save_every = 1000           # resumable checkpoints (--resume)
out_dir = "out/phi2_siglip_qformer"

# data: LLaVA-1.5's files (LLaVA README, "Train"); edit these paths to where yours are
data_pretrain = "data/llava/blip_laion_cc_sbu_558k.json"        # LCS-558K captions
images_pretrain = "data/llava/llava_pretrain/images"
data_finetune = "data/llava/llava_v1_5_mix665k.json"            # LLaVA-1.5 instruction mix
images_finetune = "data/llava/finetune_images"                  # holds coco/ gqa/ ocr_vqa/ textvqa/ vg/
