"""Makes the reference fixtures under tests/fixtures/ that the Rust tests compare against.

Run with the bench virtual environment (bench/requirements.txt: torch 2.13.0, transformers 5.24.0,
seqeval 1.2.2), after scripts/fetch.sh:

    .venv/bin/python scripts/make_fixtures.py

It writes:
  tiny-bert/            a tiny random BertModel (seed 0): config.json, model.safetensors, a 50-token WordPiece
                        tokenizer.json (fixed padding/truncation at 16, like the default model's), and reference.json with
                        input ids, attention mask, transformers' last_hidden_state, and, for a [CLS] linear
                        head with cross-entropy (dropout off), the loss and each parameter's gradient L2 norm
  minilm-reference.json transformers' tokenization and last_hidden_state of all-MiniLM-L6-v2 on three
                        sentences (pretokenized words, as the token tasks feed them)
  seqeval.json          random BIO tag sequences with seqeval's precision/recall/f1/accuracy (default mode)
The tests themselves need none of these packages.
"""
import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertConfig, BertModel

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, type_vocab_size=2,
                     hidden_act="gelu", layer_norm_eps=1e-12)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    # Random LayerNorm parameters too, so that a wrong weight/bias order would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    d = OUT / "tiny-bert"
    d.mkdir(parents=True, exist_ok=True)
    cfg.to_json_file(d / "config.json")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, d / "model.safetensors")

    ids = torch.tensor([[2, 7, 9, 11, 3, 0, 0], [2, 5, 6, 7, 8, 9, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state

    head = torch.nn.Linear(32, 3)
    with torch.no_grad():
        head.weight.copy_(torch.linspace(-0.5, 0.5, 96).reshape(3, 32))
        head.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    labels = torch.tensor([2, 0])
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    loss = torch.nn.functional.cross_entropy(head(hidden[:, 0]), labels)
    loss.backward()
    grads = {k: p.grad.norm().item() for k, p in model.named_parameters()}
    ref = {
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "last_hidden_state": out.detach().tolist(),
        "head": {"weight": head.weight.detach().tolist(), "bias": head.bias.detach().tolist(),
                 "labels": labels.tolist(), "loss": loss.item()},
        "grad_norms": grads,
    }
    (d / "reference.json").write_text(json.dumps(ref))
    tiny_tokenizer(d / "tokenizer.json")


TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "to", "from", "flight", "flights", "show",
              "me", "fly", "want", "i", "boston", "denver", "dallas", "new", "york", "what", "is", "fare", "cheapest",
              "on", "monday", "morning", "paris", "john", "lives", "in", "london", "met", "mary", "at", "good", "bad",
              "movie", "great", "awful", "##s", "##ing", "##ed", ".", ",", "?", "!", "and", "of"]


def tiny_tokenizer(path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    assert len(TINY_VOCAB) == 50
    vocab = {t: i for i, t in enumerate(TINY_VOCAB)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    # Fixed padding and truncation, as all-MiniLM-L6-v2's tokenizer.json has: mtl must override both.
    tok.enable_padding(length=16, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=16)
    tok.save(str(path))


def minilm():
    path = ROOT / "assets" / "models" / "all-MiniLM-L6-v2"
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    sentences = [
        "show me flights from baltimore to dallas on june fourteenth".split(),
        "what's the cheapest round-trip fare , please ?".split(),
        "Zürich naïve café 1000 dollars".split(),
    ]
    enc = tok(sentences, is_split_into_words=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    ref = {
        "words": sentences,
        "input_ids": enc["input_ids"].tolist(),
        "attention_mask": enc["attention_mask"].tolist(),
        "word_ids": [enc.word_ids(i) for i in range(len(sentences))],
        "last_hidden_state": [[[round(x, 6) for x in tok_] for tok_ in s] for s in hidden.tolist()],
    }
    (OUT / "minilm-reference.json").write_text(json.dumps(ref))


def seqeval_fixture():
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    rng = random.Random(7)
    kinds = ["PER", "LOC", "fromloc.city_name"]
    tags = ["O"] + [f"{p}-{k}" for p in "BI" for k in kinds]
    cases = []
    for _ in range(30):
        gold, pred = [], []
        for _ in range(rng.randint(1, 6)):
            n = rng.randint(1, 12)
            g = [rng.choice(tags) for _ in range(n)]
            p = [t if rng.random() < 0.7 else rng.choice(tags) for t in g]
            gold.append(g)
            pred.append(p)
        cases.append({"gold": gold, "pred": pred,
                      "precision": precision_score(gold, pred), "recall": recall_score(gold, pred),
                      "f1": f1_score(gold, pred), "accuracy": accuracy_score(gold, pred)})
    (OUT / "seqeval.json").write_text(json.dumps(cases))


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    tiny_bert()
    minilm()
    seqeval_fixture()
    print("fixtures written to", OUT)
