# TinyLLaVA Qwen2.5-3B + SigLIP-so400m, base recipe (Table 1 row SigLIP / Qwen2.5-3B).
#
#   accelerate launch --config_file configs/accelerate/zero3.yaml train.py --config configs/siglip_qwen25_3b_base.py
#   (4 GPUs: add --num_processes 4 after the yaml; the micro batch stays, accumulation doubles)
#
# gpus: 4 8
# hardware: 8x A100 40/80 GB with ZeRO-3 (the original's qwen2 scripts use 8 GPUs); 4 GPUs work with more accumulation.
# time: ~8 h on 8x A100 (~2.5 h pretrain + ~5.5 h finetune), ~2x on 4. A FLOP estimate at ~35% MFU, not measured.
# expected (TinyLLaVA Factory README, Table 1 row SigLIP / Qwen2.5-3B / base):
#   VQAv2 79.4 | GQA 62.5 | SQA-I 74.1 | TextVQA 58.3 |
#   MM-Vet 34.8 | POPE 87.4 | MME 1438.7 | MMMU-val 39.9
# batch (global = per GPU x GPUs x accumulation; recipes.py sets the globals and the learning rates):
#   finetune 128 = 4 x 8 x 4     4 GPUs: 128 = 4 x 4 x 8; the original: 128 = 4 x 8 x 4
#   pretrain 256 = 4 x 8 x 8     4 GPUs: 256 = 4 x 4 x 16; the original: 256 = 16 x 8 x 2
# stages (recipes.py "base"): pretrain = connector only, lr 1e-3, "pretrain" template (LLaVA plain) on LCS-558K;
#   finetune = LLM + connector, lr 2e-5, qwen2_base template on LLaVA mix665k. 1 epoch each, cosine, 3% warmup,
#   no weight decay.
# max_length 2048 (the default), as the original's scripts. Base (not Instruct) model: template qwen2_base,
# EOS <|endoftext|>.

llm = "Qwen/Qwen2.5-3B"
vision_tower = "google/siglip-so400m-patch14-384"
connector = "mlp2x_gelu"
template = "qwen2_base"
recipe = "base"
micro_batch_size = 4        # per GPU, both stages; see the batch lines above
bf16 = True                 # as the original's qwen2 scripts (the only ones in bf16; the rest used fp16)
gradient_checkpointing = True
num_workers = 8             # the original's dataloader_num_workers
save_every = 1000           # resumable checkpoints (--resume); they hold the optimizer state
out_dir = "out/siglip_qwen25_3b_base"

# data: LLaVA-1.5's files (LLaVA README, "Train"); edit these paths to where yours are
data_pretrain = "data/llava/blip_laion_cc_sbu_558k.json"        # LCS-558K captions
images_pretrain = "data/llava/llava_pretrain/images"
data_finetune = "data/llava/llava_v1_5_mix665k.json"            # LLaVA-1.5 instruction mix
images_finetune = "data/llava/finetune_images"                  # holds coco/ gqa/ ocr_vqa/ textvqa/ vg/
