"""PyTorch/transformers reference for examples/atis/config.toml: the same data, split, labels, model, heads and
hyper-parameters, so that mtl's scores can be compared with it (BENCHMARKS.md). Not part of the tests.

    scripts/fetch.sh && scripts/bench-env.sh
    .venv/bin/python bench/atis_reference.py [--epochs 15 --lr 2e-4 --head-lr 2e-4]
        [--recipe loop|tutorial|trainer] [--target-dev-frame 0.92]
        [--model assets/models/all-mpnet-base-v2 --batch 32 --warmup 0 --weight-decay 0]

`--model` takes any encoder directory `AutoModel` loads (all-MiniLM-L6-v2 when absent); with `--lr 5e-5
--warmup 0 --weight-decay 0 --epochs 10` it is JointBERT's recipe (batch 32, one rate for all, no warmup, no
weight decay, softmax slots) on that encoder, the recipe behind the published BERT-base scores that
examples/atis/config-mpnet.toml is held to.

Recipes, for the end-to-end time comparison (all with the same model, heads, loss, optimiser and schedule):
- `loop` (default): the recipe below, a plain loop with dynamic padding and length-grouped batches.
- `tutorial`: the common tutorial recipe: every input padded to max_length 128, batch 16, shuffled batches.
- `trainer`: transformers' `Trainer` with dynamic padding and length-grouped sampling, batch 32.
With --target-dev-frame, training stops after the first epoch whose dev frame accuracy reaches the target, and
the summary reports `time_to_target` (seconds from the start of training, dev evaluation included; the test
scores printed after each epoch are computed off the clock).

Recipe (as mtl's trainer): all-MiniLM-L6-v2 BertModel (eager attention; `--model` for another); a [CLS] intent head and a
first-sub-token slot head (dropout 0.1 + linear each); loss = intent CE + slot CE; AdamW (betas 0.9/0.999,
eps 1e-8, weight decay 0.01, none on biases and LayerNorm); linear warmup over 10% of steps then linear decay;
global gradient clipping at 1.0; batch 32; max_len 64; batches of similar length (shuffled pools of 50 batches
sorted by length, batch order shuffled); the epoch with the best dev frame accuracy is kept and scored on test.
Metrics: intent accuracy, seqeval entity F1 (default mode), frame accuracy. Prints a JSON summary.
"""
import argparse
import json
import random
import time
from pathlib import Path

import torch
from seqeval.metrics import f1_score
from transformers import AutoModel, AutoTokenizer, get_linear_schedule_with_warmup

DATA = Path("assets/data/atis")
MODEL = Path("assets/models/all-MiniLM-L6-v2")


def load(split, tok, intents, slots, max_len):
    rows = [json.loads(l) for l in (DATA / f"{split}.jsonl").read_text().splitlines() if l.strip()]
    out = []
    for r in rows:
        enc = tok(r["words"], is_split_into_words=True, truncation=True, max_length=max_len)
        word_ids = enc.word_ids()
        starts, seen = [], set()
        for pos, w in enumerate(word_ids):
            if w is not None and w not in seen:
                seen.add(w)
                starts.append((w, pos))
        out.append({"ids": enc["input_ids"], "intent": intents.index(r["intent"]),
                    "slots": [slots.index(t) for t in r["slots"]], "starts": dict(starts), "n": len(r["words"])})
    return out


PAD_ID = 0  # the tokenizer's padding id, set in main (MPNet's position ids skip it)


def collate(examples, pad_to=None):
    s = pad_to or max(len(e["ids"]) for e in examples)
    ids = torch.full((len(examples), s), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    tags = torch.full_like(ids, -100)
    for b, e in enumerate(examples):
        ids[b, :len(e["ids"])] = torch.tensor(e["ids"])
        mask[b, :len(e["ids"])] = 1
        for w, pos in e["starts"].items():
            tags[b, pos] = e["slots"][w]
    return ids, mask, torch.tensor([e["intent"] for e in examples]), tags


def batches(data, bs, rng):
    order = list(range(len(data)))
    rng.shuffle(order)
    out = []
    for i in range(0, len(order), bs * 50):
        pool = sorted(order[i:i + bs * 50], key=lambda j: -len(data[j]["ids"]))
        out += [pool[k:k + bs] for k in range(0, len(pool), bs)]
    rng.shuffle(out)
    return out


class Joint(torch.nn.Module):
    def __init__(self, model, n_intents, n_slots, dropout):
        super().__init__()
        self.bert = AutoModel.from_pretrained(model, add_pooling_layer=False, attn_implementation="eager",
                                              hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        h = self.bert.config.hidden_size
        self.drop = torch.nn.Dropout(dropout)
        self.intent = torch.nn.Linear(h, n_intents)
        self.slots = torch.nn.Linear(h, n_slots)
        for lin in (self.intent, self.slots):
            torch.nn.init.normal_(lin.weight, std=0.02)
            torch.nn.init.zeros_(lin.bias)

    def forward(self, ids, mask):
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.intent(self.drop(hidden[:, 0])), self.slots(self.drop(hidden))


@torch.no_grad()
def evaluate(model, data, intents, slots):
    model.eval()
    gold_i, pred_i, gold_s, pred_s, frames = [], [], [], [], 0
    order = sorted(range(len(data)), key=lambda j: len(data[j]["ids"]))
    for k in range(0, len(order), 64):
        exs = [data[j] for j in order[k:k + 64]]
        ids, mask, _, _ = collate(exs)
        li, ls = model(ids, mask)
        pi, ps = li.argmax(-1).tolist(), ls.argmax(-1).tolist()
        for b, e in enumerate(exs):
            tags = [slots[ps[b][e["starts"][w]]] if w in e["starts"] else "O" for w in range(e["n"])]
            gold = [slots[t] for t in e["slots"]]
            gold_i.append(e["intent"]); pred_i.append(pi[b]); gold_s.append(gold); pred_s.append(tags)
            frames += int(pi[b] == e["intent"] and tags == gold)
    n = len(data)
    return {"intent_accuracy": sum(g == p for g, p in zip(gold_i, pred_i)) / n,
            "slot_f1": f1_score(gold_s, pred_s), "frame_accuracy": frames / n}


def main():
    global PAD_ID
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--head-lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recipe", choices=["loop", "tutorial", "trainer"], default="loop")
    p.add_argument("--target-dev-frame", type=float, default=None)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--batch", type=int, default=None, help="32 (16 for the tutorial recipe) when absent")
    p.add_argument("--warmup", type=float, default=0.1, help="share of the steps with a linear warmup")
    p.add_argument("--weight-decay", type=float, default=0.01)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model)
    PAD_ID = tok.pad_token_id
    intents = (DATA / "intent_labels.txt").read_text().split()
    slots = (DATA / "slot_labels.txt").read_text().split()
    train, dev, test = (load(s, tok, intents, slots, 64) for s in ("train", "dev", "test"))
    model = Joint(a.model, len(intents), len(slots), 0.1)
    head_lr = a.head_lr or a.lr
    groups = {}
    for n, prm in model.named_parameters():
        decay = not (n.endswith("bias") or "LayerNorm" in n)
        lr = a.lr if n.startswith("bert.") else head_lr
        groups.setdefault((decay, lr), []).append(prm)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": a.weight_decay if d else 0.0, "lr": lr} for (d, lr), ps in groups.items()],
                            betas=(0.9, 0.999), eps=1e-8)
    bs = a.batch or (16 if a.recipe == "tutorial" else 32)
    pad_to = 128 if a.recipe == "tutorial" else None
    steps = a.epochs * ((len(train) + bs - 1) // bs)
    sched = get_linear_schedule_with_warmup(opt, int(a.warmup * steps + 0.999999), steps)
    best, history, started = None, [], time.time()
    reached = None
    test_seconds = 0.0  # scoring test after every epoch is for the report only: kept off the clock

    def end_of_epoch(epoch, train_s):
        nonlocal best, reached, test_seconds
        d = evaluate(model, dev, intents, slots)
        elapsed = time.time() - started - test_seconds
        t0 = time.time()
        t = evaluate(model, test, intents, slots)
        test_seconds += time.time() - t0
        history.append({"epoch": epoch, "train_seconds": round(train_s, 1), "elapsed": round(elapsed, 1),
                        "dev": d, "test": t})
        print(json.dumps(history[-1]), flush=True)
        if best is None or d["frame_accuracy"] > best["dev"]["frame_accuracy"]:
            best = history[-1]
        if a.target_dev_frame is not None and reached is None and d["frame_accuracy"] >= a.target_dev_frame:
            reached = history[-1]
        return reached is not None

    def loss_of(batch):
        ids, mask, yi, ys = batch
        li, ls = model(ids, mask)
        return torch.nn.functional.cross_entropy(li, yi) + \
            torch.nn.functional.cross_entropy(ls.reshape(-1, len(slots)), ys.reshape(-1), ignore_index=-100)

    if a.recipe == "trainer":
        run_trainer(a, model, opt, sched, train, loss_of, end_of_epoch)
    else:
        for epoch in range(1, a.epochs + 1):
            model.train()
            t0 = time.time()
            if a.recipe == "tutorial":
                order = list(range(len(train)))
                rng.shuffle(order)
                epoch_batches = [order[k:k + bs] for k in range(0, len(order), bs)]
            else:
                epoch_batches = batches(train, bs, rng)
            for batch in epoch_batches:
                loss = loss_of(collate([train[j] for j in batch], pad_to))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
            if end_of_epoch(epoch, time.time() - t0):
                break
    summary = {"recipe": a.recipe, "args": {k: str(v) for k, v in vars(a).items()}, "best_epoch": best["epoch"],
               "dev": best["dev"], "test": best["test"], "total_seconds": round(time.time() - started, 1)}
    if a.target_dev_frame is not None:
        summary["target_dev_frame"] = a.target_dev_frame
        summary["time_to_target"] = reached and reached["elapsed"]
        summary["epoch_of_target"] = reached and reached["epoch"]
        summary["test_at_target"] = reached and reached["test"]
    print(json.dumps(summary))


def run_trainer(a, model, opt, sched, train, loss_of, end_of_epoch):
    """transformers' Trainer (dynamic padding, group_by_length) with the same optimiser and schedule."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, mask, intent, tags):
            return {"loss": loss_of((ids, mask, intent, tags))}

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            return {**train[i], "input_ids": train[i]["ids"]}

    def collator(items):
        ids, mask, yi, ys = collate(items)
        return {"ids": ids, "mask": mask, "intent": yi, "tags": ys}

    class PerEpoch(TrainerCallback):
        def __init__(self):
            self.t0 = time.time()

        def on_epoch_end(self, args, state, control, **kwargs):
            stop = end_of_epoch(round(state.epoch), time.time() - self.t0)
            model.train()
            self.t0 = time.time()
            if stop:
                control.should_training_stop = True
            return control

    args = TrainingArguments(output_dir="runs/atis-trainer", per_device_train_batch_size=32, num_train_epochs=a.epochs,
                             max_grad_norm=1.0, train_sampling_strategy="group_by_length", eval_strategy="no", save_strategy="no",
                             logging_strategy="no", report_to="none", use_cpu=True, seed=a.seed,
                             dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    Trainer(model=Wrapped(model), args=args, train_dataset=Items(), data_collator=collator,
            optimizers=(opt, sched), callbacks=[PerEpoch()]).train()


if __name__ == "__main__":
    main()
