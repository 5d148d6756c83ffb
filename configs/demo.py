# The embedded demo (python demo.py): tiny random-init models, real handwritten digits shipped in demo/.
# Hardware: 2 CPU cores (1 used), no GPU, no network. Expected (README "The demo, measured"): 265-283 CPU-seconds in
# all (user + sys, seeds 42, 1, 2, 3 and AVX2 kernels), held-out accuracy 86-100 on the one- and two-image types and
# 91-93 on the tiled `detail` type (the best constant answer, 11.7, untiled).
# Batch arithmetic: 16 = 16 x 1 x 1 (global = micro x processes x accumulation), both stages.
# Pretrain as the paper: the LLM frozen, so the caption loss can only fall through the image tokens; the tower is
# random too, so it trains with the connector; the captions ("7, red on black.") name the digit first. Finetune
# as the paper: the tower frozen. Why the earlier recipe (everything trained in pretrain) was fragile: demo/README.md.
llm = "out/demo-base/llm"               # written by demo.py (or demo.py --only-base) from a LlamaConfig
vision_tower = "out/demo-base/siglip"   # written by demo.py from a SiglipVisionConfig
connector = "mlp2x_gelu"
template = "phi"                        # the demo tokenizer is phi-2 style: <|endoftext|> ends answers
max_length = 256
max_tiles = 4                           # issue 28: a 64x64 canvas is a 2x2 grid of 32-px tiles + the global view (23
                                        # tokens); a 32-px image is one view, as untiled (4); --max_tiles=0: untiled
data_pretrain = "demo/pretrain.json"
images_pretrain = "demo/images"
data_finetune = "demo/finetune.json"
images_finetune = "demo/images"
stages = [
    dict(name="pretrain", data="pretrain", template="pretrain", tune_llm="frozen", tune_vision_tower="full",
         tune_connector="full", lr=1e-3, epochs=12),   # 2,994 captions: 1,497 digits, each also drawn small
    dict(name="finetune", data="finetune", tune_llm="full", tune_vision_tower="frozen", tune_connector="full",
         lr=5e-4, epochs=5),   # 4 epochs: POPE-style F1 89.2 with AVX2 kernels (94.1 with AVX-512); 5: 94.2 / 95.3
]
global_batch_size = 16
micro_batch_size = 16
warmup_ratio = 0.05
bf16 = False                            # --bf16=true: autocast; as fast as fp32 at this size with AVX512-BF16
threads = 1                             # 2 threads took 5.7x the CPU time while other jobs ran (demo/README.md)
num_workers = 0                         # loading in this process: no worker's extra CPU time
feature_cache = "out/demo/features"     # finetune's frozen tower runs once per image, not per epoch: ~20 CPU-s less
                                        # (demo.py puts it in its --out_dir and clears earlier runs' on a fresh start)
log_every = 100
save_every = 300                        # ~25 s of steps here: Ctrl-C + `python demo.py --resume` loses at most that
out_dir = "out/demo"
