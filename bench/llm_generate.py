"""The PyTorch side of `bench/llm-generate`: greedy generation of NEW tokens (no stop token) by transformers from
SmolLM2-135M-Instruct's GGUF file (dequantised to float32), after the chat template of the same question as
`mtl generate --chat`. Prints one JSON line: prompt and new tokens, seconds, tokens per second."""
import argparse
import json
import time

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

D, F = "assets/models/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(D, gguf_file=F)
    model = LlamaForCausalLM.from_pretrained(D, gguf_file=F, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=a.new,
                             min_new_tokens=a.new, pad_token_id=2)
        seconds = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    print(json.dumps({"engine": "pytorch", "prompt_tokens": ids.shape[1], "new_tokens": n, "seconds": seconds,
                      "tokens_per_second": n / seconds}))


if __name__ == "__main__":
    main()
