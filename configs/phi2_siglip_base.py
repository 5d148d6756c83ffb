# TinyLLaVA-Phi-2-SigLIP, base recipe: the paper's main model (phi-2 2.7B + SigLIP-so400m/384 + 2-layer MLP, 3.1B).
#
#   accelerate launch --config_file configs/accelerate/zero3.yaml train.py --config configs/phi2_siglip_base.py
#   accelerate launch train.py --config configs/phi2_siglip_base.py          # with your own `accelerate config` default
#   (4 GPUs: add --num_processes 4 after the yaml; the micro batch stays, accumulation doubles)
#
# gpus: 4 8
# hardware: 4-8x A100 40/80 GB with ZeRO-3, as the original (the maintainers trained this model on 8x A100-40G).
#   On 40 GB cards and OOM: --micro_batch_size=4 (accumulation doubles, same global batch).
# time: ~7 h on 8x A100 (~2.5 h pretrain + ~4.5 h finetune), ~2x on 4. A FLOP estimate at ~35% MFU, not measured.
# expected (TinyLLaVA Factory README, Table 1 row SigLIP-so400m / phi-2 / base):
#   VQAv2 79.2 | GQA 61.6 | SQA-I 71.9 | TextVQA 57.4 | MM-Vet 35.0 | POPE 87.2 | MME 1462.4 | MMMU-val 38.2
#   (maintainers: ~1 point gaps on TextVQA / MMMU / MM-Vet are normal between runs, issue #82)
# batch (global = per GPU x GPUs x accumulation; recipes.py sets the globals and the learning rates):
#   finetune 128 = 8 x 8 x 2     4 GPUs: 128 = 8 x 4 x 4, the original's finetune.sh
#   pretrain 256 = 8 x 8 x 4     4 GPUs: 256 = 8 x 4 x 8; the original's pretrain.sh: 256 = 32 x 4 x 2. Same math,
#     smaller micro batch; the LLM is frozen there, so --pretrain.micro_batch_size=32 is faster if it fits.
# stages (recipes.py "base"): pretrain = connector only, lr 1e-3, "pretrain" template (LLaVA plain) on LCS-558K;
#   finetune = LLM + connector, lr 2e-5, phi template on LLaVA mix665k. 1 epoch each, cosine, 3% warmup, no decay.

llm = "microsoft/phi-2"
vision_tower = "google/siglip-so400m-patch14-384"
connector = "mlp2x_gelu"
template = "phi"
recipe = "base"
micro_batch_size = 8        # per GPU, both stages; see the batch lines above
# train_phi.sh had MODEL_MAX_LENGTH=3072 until commit 04139fd (2025-04) set 2048, so the published numbers were most
# likely trained with 3072 (the released 3.1B's config says 3072).
max_length = 3072
bf16 = True                 # the original: fp16; bf16 needs no loss scaling (V100/T4: --bf16=false --fp16=true)
gradient_checkpointing = True
num_workers = 8             # the original's dataloader_num_workers
save_every = 1000           # resumable checkpoints (--resume); they hold the optimizer state: tens of GB for a 3B model
out_dir = "out/phi2_siglip_base"

# data: LLaVA-1.5's files (LLaVA README, "Train"); edit these paths to where yours are
data_pretrain = "data/llava/blip_laion_cc_sbu_558k.json"        # LCS-558K captions
images_pretrain = "data/llava/llava_pretrain/images"
data_finetune = "data/llava/llava_v1_5_mix665k.json"            # LLaVA-1.5 instruction mix
images_finetune = "data/llava/finetune_images"                  # holds coco/ gqa/ ocr_vqa/ textvqa/ vg/
