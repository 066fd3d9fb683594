"""The PyTorch side of bench/vs-pytorch: the same workloads as `mtl-bench`, with transformers' own model class (AutoModel).

W1 (train): one training step on a batch of B x S tokens: forward with dropout 0.1, the sum of a [CLS]
cross-entropy (5 classes) and a token cross-entropy (9 classes), backward, gradient clipping at 1.0, and
AdamW (weight decay 0.01, none on biases and LayerNorm) over every parameter.
W3 (train --lora): W1 with the encoder frozen and a LoRA adapter from peft (r 8, alpha 16, dropout 0.1) on all six
linear layers of every block; AdamW over the adapter and the heads.
W2 (infer): one forward pass in eval mode under no_grad, with both heads' argmax.
--bf16 runs the forward pass (and the loss) under torch.autocast("cpu", torch.bfloat16): PyTorch's mixed precision
on the CPU, whose matrix products oneDNN runs on AMX where the CPU has it.
gemm: torch.matmul's GFLOP/s at the encoder's projection shapes (B x S tokens), f32 or with --bf16 bf16 operands.
Eager attention, 2 threads. Prints one JSON line: the median and every step time in milliseconds.
"""
import argparse
import json
import statistics
import time

import torch
from transformers import AutoModel


def batch(b, s, vocab):
    ids = torch.tensor([[101 if (i * s + j) % s == 0 else 1000 + ((i * s + j) * 7919) % (vocab - 1000)
                         for j in range(s)] for i in range(b)])
    return ids, torch.ones_like(ids)


def gemm(a):
    """Best GFLOP/s of torch.matmul over the encoder's projection products (both operand orders of each)."""
    import json as _json
    import os
    with open(os.path.join(a.model, "config.json")) as f:
        config = _json.load(f)
    h, inter, n = config["hidden_size"], config["intermediate_size"], a.batch * a.seq
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    rows = []
    for m, k, p in [(n, h, 3 * h), (n, h, h), (n, h, inter), (n, inter, h), (inter, n, h), (h, n, inter)]:
        x, w = torch.randn(m, k, dtype=dtype), torch.randn(p, k, dtype=dtype)
        times = []
        for i in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            torch.matmul(x, w.t())
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
        rows.append({"shape": [m, k, p], "gflops": 2 * m * k * p / statistics.median(times) / 1e9})
    print(json.dumps({"engine": "pytorch", "workload": "gemm", "bf16": a.bf16, "peak_gflops": max(r["gflops"] for r in rows),
                      "rows": rows}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workload", choices=["train", "infer", "gemm"])
    p.add_argument("--model", default="assets/models/all-MiniLM-L6-v2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.workload == "gemm":
        return gemm(a)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16)
    # The model's own class (BertModel for MiniLM, MPNetModel for all-mpnet-base-v2), without a pooler.
    model = AutoModel.from_pretrained(a.model, add_pooling_layer=False, attn_implementation="eager")
    if a.lora:
        from peft import LoraConfig, get_peft_model
        # "dense" is the attention output and both feed-forward layers (the model has no pooler).
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                 target_modules=["query", "key", "value", "dense"]))
    h = model.config.hidden_size
    cls_head, tok_head = torch.nn.Linear(h, 5), torch.nn.Linear(h, 9)
    drop = torch.nn.Dropout(0.1)
    ids, mask = batch(a.batch, a.seq, model.config.vocab_size)
    times = []
    if a.workload == "train":
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + [("cls." + n, p) for n, p in cls_head.named_parameters()] + \
            [("tok." + n, p) for n, p in tok_head.named_parameters()]
        decay = [p for n, p in params if not (n.endswith("bias") or "LayerNorm" in n)]
        no_decay = [p for n, p in params if n.endswith("bias") or "LayerNorm" in n]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-5)
        y_cls = torch.arange(a.batch) % 5
        y_tok = (torch.arange(a.batch * a.seq) % 9).reshape(a.batch, a.seq)
        model.train()
        for i in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            with autocast:
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
                loss = torch.nn.functional.cross_entropy(cls_head(drop(hidden[:, 0])), y_cls) + \
                    torch.nn.functional.cross_entropy(tok_head(drop(hidden)).reshape(-1, 9), y_tok.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
            opt.step()
            if i >= a.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    else:
        model.eval()
        with torch.no_grad(), autocast:
            for i in range(a.warmup + a.steps):
                t0 = time.perf_counter()
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
                cls_head(hidden[:, 0]).argmax(-1)
                tok_head(hidden).argmax(-1)
                if i >= a.warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"engine": "pytorch", "workload": a.workload, "median_ms": statistics.median(times), "times_ms": times}))


if __name__ == "__main__":
    main()
