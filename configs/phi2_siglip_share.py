# TinyLLaVA-Phi-2-SigLIP-3.1B, share recipe: the released model (tinyllava/TinyLLaVA-Phi-2-SigLIP-3.1B).
# Three stages: LLaVA pretrain, then a ShareGPT4V caption stage that trains the LLM, then ShareGPT4V's SFT mix.
#
#   accelerate launch --config_file configs/accelerate/zero3.yaml train.py --config configs/phi2_siglip_share.py
#   (4 GPUs: add --num_processes 4 after the yaml; the micro batch stays, accumulation doubles)
#
# gpus: 4 8
# hardware: 4-8x A100 40/80 GB with ZeRO-3, as the original. OOM on 40 GB: --micro_batch_size=4.
# time: ~16 h on 8x A100 (~2.5 h pretrain + ~8.5 h share_pretrain on 1.2M long captions + ~4.5 h finetune), ~2x on 4.
#   A FLOP estimate at ~35% MFU, not measured.
# expected (TinyLLaVA Factory README, Table 1 row SigLIP-so400m / phi-2 / share, the released 3.1B):
#   VQAv2 80.1 | GQA 62.1 | SQA-I 73.0 | TextVQA 60.3 |
#   MM-Vet 37.5 | POPE 87.2 | MME 1466.4 | MMMU-val 38.4
#   The paper also tuned the vision tower from layer 12 in share_pretrain; the scripts (and recipes.py) keep it
#   frozen, which the maintainers say works as well (issue #102). For the paper's variant:
#   --share_pretrain.tune_vision_tower=partial:12
# batch (global = per GPU x GPUs x accumulation; recipes.py sets the globals and the learning rates):
#   finetune       128 = 8 x 8 x 2     4 GPUs: 128 = 8 x 4 x 4; the original: 128 = 8 x 4 x 4 (finetune_share.sh)
#   share_pretrain 256 = 8 x 8 x 4     4 GPUs: 256 = 8 x 4 x 8; the original: 256 = 8 x 4 x 8 (pretrain_share.sh)
#   pretrain       256 = 8 x 8 x 4     4 GPUs: 256 = 8 x 4 x 8; the original: 256 = 32 x 4 x 2 (pretrain.sh)
# stages (recipes.py "share"):
#   pretrain        connector only, lr 1e-3, "pretrain" template, LCS-558K          (data_pretrain)
#   share_pretrain  LLM + connector, lr 2e-5, "pretrain" template, ShareGPT4V-PT 1.2M (data_share)
#   finetune        LLM + connector, lr 2e-5, phi template, ShareGPT4V SFT mix       (data_share_finetune)

llm = "microsoft/phi-2"
vision_tower = "google/siglip-so400m-patch14-384"
connector = "mlp2x_gelu"
template = "phi"
recipe = "share"
micro_batch_size = 8        # per GPU, every stage; see the batch lines above
max_length = 3072           # the original's share scripts (and the released 3.1B's config)
bf16 = True                 # the original: fp16; bf16 needs no loss scaling (V100/T4: --bf16=false --fp16=true)
gradient_checkpointing = True
num_workers = 8             # the original's dataloader_num_workers
save_every = 1000           # resumable checkpoints (--resume); they hold the optimizer state: tens of GB for a 3B model
out_dir = "out/phi2_siglip_share"

# data, stage 1: LLaVA-1.5's LCS-558K (LLaVA README, "Train"); edit these paths to where yours are
data_pretrain = "data/llava/blip_laion_cc_sbu_558k.json"
images_pretrain = "data/llava/llava_pretrain/images"
# data, stages 2-3: ShareGPT4V's files. Image paths inside them are relative to one root holding coco/ sam/ llava/
# wikiart/ share_textvqa/ web-celebrity/ web-landmark/ gqa/ ocr_vqa/ textvqa/ vg/ (ShareGPT4V's data layout).
# TinyLLaVA used cleaned copies of both files: really_cleaned_share-captioner_... and cleaned_sharegpt4v_mix665k_...
data_share = "data/sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json"
images_share = "data/sharegpt4v"
data_share_finetune = "data/sharegpt4v/sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json"
images_share_finetune = "data/sharegpt4v"
