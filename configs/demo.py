# The embedded demo (python demo.py): tiny random-init models, real handwritten digits shipped in demo/.
# Hardware: 2 CPU cores (1 used), no GPU, no network. Expected: ~4.5 CPU-minutes in all (user + sys), held-out
# accuracy >= 95 on every question type and POPE-style F1 >= 93 for seeds 42, 1, 2 (README "The demo, measured").
# Batch arithmetic: 16 = 16 x 1 x 1 (global = micro x processes x accumulation), both stages.
# Pretrain as the paper: the LLM frozen; here the tower is random too, so it trains with the connector, and the
# captions ("7, red on black.") name the digit first. Training the random LLM on captions made it a digit emitter
# whose finetune began at loss 11-13 and found the image or not by rounding (demo/README.md has the measurements).
# Finetune as the paper: the tower frozen (training it there, even at 2e-4, erased the digits); lr 5e-4 (1e-3
# learned "Is there a D?" for some seeds only).
llm = "out/demo/base/llm"               # written by demo.py (or demo.py --only-base) from a LlamaConfig
vision_tower = "out/demo/base/siglip"   # written by demo.py from a SiglipVisionConfig
connector = "mlp2x_gelu"
template = "phi"                        # the demo tokenizer is phi-2 style: <|endoftext|> ends answers
max_length = 256
data_pretrain = "demo/pretrain.json"
images_pretrain = "demo/images"
data_finetune = "demo/finetune.json"
images_finetune = "demo/images"
stages = [
    dict(name="pretrain", data="pretrain", template="pretrain", tune_llm="frozen", tune_vision_tower="full",
         tune_connector="full", lr=1e-3, epochs=16),
    dict(name="finetune", data="finetune", tune_llm="full", tune_vision_tower="frozen", tune_connector="full",
         lr=5e-4, epochs=4),
]
global_batch_size = 16
micro_batch_size = 16
warmup_ratio = 0.05
bf16 = False                            # --bf16=true: autocast, fast only with AMX / AVX512-BF16 (measured: README)
threads = 1                             # 1 costs less CPU time than 2 at this size (measured); --threads=2 is faster
num_workers = 0                         # loading in this process: no worker's extra CPU time
log_every = 100
out_dir = "out/demo"
