"""The PyTorch + PEFT side of `bench/llm-lora`: one LoRA training step of SmolLM2-135M-Instruct loaded from the
same GGUF file (transformers dequantises it to float32), r 8, alpha 16 on all seven projections, no dropout,
the causal LM loss on every position of the same deterministic batch as mtl-bench's `llm-lora` workload,
backward, AdamW over the LoRA parameters. Prints one JSON line with the median and every step time (ms)."""
import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = LlamaForCausalLM.from_pretrained("assets/models/SmolLM2-135M-Instruct",
                                             gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config).train()
    vocab = model.config.vocab_size
    n = a.batch * a.seq
    ids = torch.tensor([100 + (i * 7919) % (vocab - 100) for i in range(n)]).reshape(a.batch, a.seq)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, weight_decay=0.0)
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"engine": "pytorch", "workload": "llm-lora", "batch": a.batch, "seq": a.seq,
                      "median_ms": sorted(times)[len(times) // 2], "times_ms": times}))


if __name__ == "__main__":
    main()
