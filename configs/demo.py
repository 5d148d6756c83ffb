# The embedded demo (python demo.py): tiny random-init models, real handwritten digits shipped in demo/.
# Hardware: 2 CPU cores, no GPU, no network. Expected: about 3.5 minutes in all; held-out VQAv2-style accuracy
# far above the 29.8% per-question-type majority baseline (README "Demo" has the measured numbers).
# Batch arithmetic: 1 process x micro 16 x 1 accumulation = 16 global, both stages.
# Unlike the paper's recipe, the pretrain stage trains every component (LLM and tower start from random weights);
# the finetune stage then keeps the tower frozen, as the paper's: training it further there cost the digits (measured).
llm = "out/demo/base/llm"               # written by demo.py from a LlamaConfig (+ demo/tokenizer)
vision_tower = "out/demo/base/siglip"   # written by demo.py from a SiglipVisionConfig
connector = "mlp2x_gelu"
template = "phi"                        # the demo tokenizer is phi-2 style: <|endoftext|> ends answers
max_length = 256
data_pretrain = "demo/pretrain.json"
images_pretrain = "demo/images"
data_finetune = "demo/finetune.json"
images_finetune = "demo/images"
stages = [
    dict(name="pretrain", data="pretrain", template="pretrain", tune_llm="full", tune_vision_tower="full",
         tune_connector="full", lr=1e-3, lr_vision_tower=3e-4, epochs=10),
    dict(name="finetune", data="finetune", tune_llm="full", tune_vision_tower="frozen", tune_connector="full",
         lr=5e-4, epochs=6),
]
global_batch_size = 16
micro_batch_size = 16
warmup_ratio = 0.05
bf16 = False                            # CPUs without AVX512-BF16 run bf16 matmuls ~40x slower than fp32
num_workers = 1
log_every = 25
out_dir = "out/demo"
