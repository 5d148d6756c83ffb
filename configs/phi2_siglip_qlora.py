# TinyLLaVA-Phi-2-SigLIP, base pretrain then QLoRA finetune: LoRA on a phi-2 quantised to 4-bit NF4 at load time.
#
#   accelerate launch --config_file configs/accelerate/1gpu.yaml train.py --config configs/phi2_siglip_qlora.py
#   accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 \
#       train.py --config configs/phi2_siglip_qlora.py
#
# gpus: 1 2 4 8
# hardware: one 40-48 GB GPU (A100-40G, A6000, L40S) or a few with ddp.yaml; needs bitsandbytes with CUDA. The finetune
#   stage alone (4-bit phi-2 + adapters) is the small one; the pretrain stage still holds the frozen full-precision
#   LLM. DeepSpeed with 4-bit weights is untested here: use 1gpu.yaml or ddp.yaml.
# time: ~2-3 days on 1x A100 (~20 h pretrain + ~30-40 h QLoRA finetune; dequantisation adds time), /N on N GPUs.
#   A FLOP estimate, not measured.
# expected: not reported. The original only had an 8-bit "qlora_int8" recipe (barely maintained) and published no
#   numbers for it; the nearest reported row is LoRA, configs/phi2_siglip_lora.py (MME 1413.2).
# batch (global = per GPU x GPUs x accumulation; recipes.py sets the globals and the learning rates):
#   finetune 128 = 4 x 1 x 32    2 GPUs: 128 = 4 x 2 x 16; 8 GPUs: 128 = 4 x 8 x 4
#   pretrain 256 = 4 x 1 x 64    2 GPUs: 256 = 4 x 2 x 32; 8 GPUs: 256 = 4 x 8 x 8
# stages (recipes.py "qlora"): pretrain = connector only, lr 1e-3, "pretrain" template, full-precision frozen LLM;
#   finetune = LLM loaded in 4-bit NF4 (double quantisation, bf16 compute) + LoRA r 128, alpha 256 on every Linear
#   except the head, connector in full, lr 2e-4. The merged model is written onto the full-precision base (merging
#   into 4-bit weights is lossy); the adapter alone goes to 2_finetune/adapter_llm/.

llm = "microsoft/phi-2"
vision_tower = "google/siglip-so400m-patch14-384"
connector = "mlp2x_gelu"
template = "phi"
recipe = "qlora"
qlora_bits = 4              # nf4 + double quant (QLoRA paper); 8 = bitsandbytes int8, the original's only option
micro_batch_size = 4        # per GPU, both stages; see the batch lines above
max_length = 3072           # the original's finetune_qlora.sh
bf16 = True                 # also the 4-bit compute dtype; the original trained in fp16
gradient_checkpointing = True
num_workers = 8             # the original's dataloader_num_workers
save_every = 1000           # resumable checkpoints (--resume)
out_dir = "out/phi2_siglip_qlora"

# data: LLaVA-1.5's files (LLaVA README, "Train"); edit these paths to where yours are
data_pretrain = "data/llava/blip_laion_cc_sbu_558k.json"        # LCS-558K captions
images_pretrain = "data/llava/llava_pretrain/images"
data_finetune = "data/llava/llava_v1_5_mix665k.json"            # LLaVA-1.5 instruction mix
images_finetune = "data/llava/finetune_images"                  # holds coco/ gqa/ ocr_vqa/ textvqa/ vg/
