"""The Python package `mtl` (pyproject.toml, crates/mtl-py, python/mtl), installed with `pip install .` into a
fresh virtual environment by scripts/test.sh, which runs this file with pytest from the repository root.

It trains the tiny random models of tests/fixtures through Python (an encoder from the TOML file and a decoder
from a dict), predicts, evaluates and reopens the runs, and checks that the package's `mtl` command and the
binary (MTL_BINARY, target/release/mtl by default) predict exactly what Python does; Ctrl-C during
`mtl.train` must raise KeyboardInterrupt and leave a checkpoint that `mtl train --resume` continues; errors
must be the library's, naming the file and field.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

import mtl

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests/python/tiny-run.toml"
DATA = ROOT / "tests/python/tiny-train.jsonl"
BINARY = Path(os.environ.get("MTL_BINARY", ROOT / "target/release/mtl"))
# The package's own command, next to the interpreter of this environment.
PACKAGE_CLI = Path(sys.executable).parent / "mtl"

TEXTS = [
    "show me flights from boston to denver",
    "what is the cheapest fare from denver",
    "i want to fly from dallas to boston on monday",
]


def tiny_config():
    """tests/python/tiny-run.toml as a dict, its paths (relative to its folder) made absolute."""
    config = tomllib.loads(TINY.read_text())
    config["model"]["path"] = str((TINY.parent / config["model"]["path"]).resolve())
    for task in config["tasks"].values():
        task["data"] = {split: str((TINY.parent / path).resolve()) for split, path in task["data"].items()}
    return config


def cli_predict(command, run_dir, texts, tmp_path):
    """`mtl predict` of `texts` (one per line) by `command`, as parsed JSON lines."""
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("".join(t + "\n" for t in texts))
    out = subprocess.run(
        [str(command), "predict", "--model", str(run_dir), "--input", str(inputs)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("encoder") / "run"
    run = mtl.train(str(TINY), out=out, overrides={"training.epochs": 3, "training.seed": 11}, progress=False)
    return run


def test_train_returns_the_run_with_its_metrics(encoder_run):
    assert isinstance(encoder_run, mtl.Run)
    assert encoder_run.tasks == ["intent", "slots"]
    assert encoder_run.manifest["architecture"] == "bert"
    assert encoder_run.capabilities["predict"] is None
    metrics = encoder_run.metrics
    assert 0.0 <= metrics["dev"]["intent"]["accuracy"] <= 1.0
    assert encoder_run.config["training"]["epochs"] == 3
    assert encoder_run.config["training"]["seed"] == 11


def test_python_and_both_command_lines_predict_the_same(encoder_run, tmp_path):
    ours = encoder_run.predict(TEXTS)
    assert [r["text"] for r in ours] == TEXTS
    assert {"intent", "slots"} <= set(ours[0]["predictions"])
    assert ours[0]["predictions"]["slots"]["words"] == TEXTS[0].split()
    for command in (PACKAGE_CLI, BINARY):
        assert cli_predict(command, encoder_run.dir, TEXTS, tmp_path) == ours, command
    # A reopened run answers the same; one input gives one record; dicts and word lists are inputs too.
    reopened = mtl.Run.open(encoder_run.dir)
    assert reopened.predict(TEXTS) == ours
    assert reopened.predict(TEXTS[0]) == ours[0]
    assert reopened.predict([{"text": TEXTS[1]}]) == [ours[1]]
    words = reopened.predict([TEXTS[0].split()])[0]
    assert words["predictions"]["slots"] == ours[0]["predictions"]["slots"]


def test_explain_matches_the_command_line(encoder_run, tmp_path):
    ours = encoder_run.explain(TEXTS, steps=20)
    assert [r["text"] for r in ours] == TEXTS
    intent = ours[0]["explanations"]["intent"][0]
    assert intent["target"]["score"] == "probability"
    assert len(intent["integrated_gradients"]["words"]) == len(intent["words"])
    # The same attributions as `mtl explain` on the same inputs.
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(TEXTS) + "\n")
    out = subprocess.run(
        [str(BINARY), "explain", "--model", str(encoder_run.dir), "--steps", "20", "--input", str(inputs)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert [json.loads(line) for line in out.splitlines()] == ours
    assert encoder_run.explain(TEXTS[0], tasks=["intent"], steps=20)["explanations"].keys() == {"intent"}
    with pytest.raises(mtl.MtlError, match="unknown baseline"):
        encoder_run.explain(TEXTS[0], baseline="noise")


def test_evaluate_matches_the_command_line(encoder_run):
    scores = encoder_run.evaluate()
    assert set(scores) == {"dev"}
    assert encoder_run.evaluate("dev") == scores["dev"]
    out = subprocess.run(
        [str(BINARY), "eval", "--model", str(encoder_run.dir)], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert json.loads(out.stdout) == scores
    # The scores of the best checkpoint are those training recorded.
    assert scores["dev"]["intent"] == pytest.approx(encoder_run.metrics["dev"]["intent"])
    with pytest.raises(mtl.MtlError, match="no test files"):
        encoder_run.evaluate("test")


def test_check_reads_the_data_without_training():
    report = mtl.check(TINY)
    assert report["tasks"]["intent"]["examples"]["train"] == len(DATA.read_text().splitlines())
    assert report["max_len"] == 12


def test_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(mtl.ConfigError, match="unknown field `epochz`"):
        mtl.train(TINY, out=tmp_path / "bad", overrides={"training.epochz": 2}, progress=False)
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.read_text().replace("lr = 5e-3", "lr = 5e-3\nwarmup = 0.1"))
    with pytest.raises(mtl.ConfigError) as e:
        mtl.check(bad)
    assert str(bad) in str(e.value) and "warmup" in str(e.value)
    config = tiny_config()
    config["tasks"]["intent"]["data"]["train"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(mtl.MtlError, match="missing.jsonl"):
        mtl.train(config, out=tmp_path / "missing", progress=False)
    assert not (tmp_path / "missing").exists(), "a run that failed at once leaves nothing behind"


def test_bad_inputs(encoder_run):
    with pytest.raises(mtl.MtlError, match="inputs:2: expected a `text` or `words` field"):
        encoder_run.predict(["fine", {"txt": "no text field"}])
    with pytest.raises(mtl.MtlError, match="inputs:1"):
        encoder_run.predict([42])
    with pytest.raises(mtl.MtlError, match="nonexistent/run: not a checkpoint"):
        mtl.Run.open("/nonexistent/run")


def test_a_config_dict_trains_like_its_file(tmp_path):
    sets = {"training.epochs": 2}
    from_file = mtl.train(TINY, out=tmp_path / "file", overrides=sets, progress=False)
    from_dict = mtl.train(tiny_config(), out=tmp_path / "dict", overrides=sets, progress=False)
    assert from_dict.metrics["dev"] == from_file.metrics["dev"]
    assert from_dict.predict(TEXTS) == from_file.predict(TEXTS)


def test_progress_and_logs_reach_python(tmp_path, capsys, caplog):
    events = []
    mtl._native.train(str(TINY), None, str(tmp_path / "run"), ["training.epochs=2"], [], False, False, False, False, events.append)
    kinds = [e[0] for e in events]
    assert kinds[0] == "start" and events[0][1:] == ("train", events[0][2], "steps")
    assert kinds[-1] == "finish" and "position" in kinds
    # One bar: the dev evaluations inside training send none of their own.
    training = events[: kinds.index("finish") + 1]
    assert [e for e in training if e[0] == "start"] == [events[0]], training
    assert [e[1] for e in training if e[0] == "position"][-1] == events[0][2], "the bar reaches its total"
    assert any(k == "line" and "epoch 1 dev:" in e[1] for k, e in zip(kinds, events))
    # The default display prints without tqdm, or draws with it.
    run = mtl.train(TINY, out=tmp_path / "shown", overrides={"training.epochs": 1})
    assert "epoch 1 dev:" in capsys.readouterr().err
    assert run.evaluate(progress=True)


def test_ctrl_c_stops_training_at_a_checkpoint_that_resumes(tmp_path):
    out = tmp_path / "run"
    # 10,000 steps of a few milliseconds: long enough not to finish before the signal, short to resume.
    sets = {"training.epochs": 5000, "training.patience": 1000000}

    finished = threading.Event()

    def interrupt_when_training():
        while not (out / "log.jsonl").exists():
            if finished.wait(0.05):
                return  # the call ended without training: no signal for the tests after this one
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)

    # A shell without job control starts its background commands with SIGINT ignored, and Python then installs
    # no handler for it (the signal would be lost): the test sets Python's own, whatever launched it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    thread = threading.Thread(target=interrupt_when_training, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt) as e:
            mtl.train(TINY, out=out, overrides=sets, progress=False)
    finally:
        finished.set()
        thread.join()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 120
    message = str(e.value)
    assert "training interrupted at step" in message and "--resume" in message
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints, list(out.iterdir())
    assert str(checkpoints[-1]) in message
    assert not (out / "metrics.json").exists()
    # The checkpoint continues with the command line (the same config, as a resume requires), to the end.
    state = json.loads((checkpoints[-1] / "state.json").read_text())
    done = state["step"]
    resumed = subprocess.run(
        [str(BINARY), "train", str(TINY), "--out", str(out), "--resume", "--set", "training.epochs=5000",
         "--set", "training.patience=1000000"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 10000 > done


def test_the_package_command_is_the_command_line(tmp_path):
    version = subprocess.run([str(PACKAGE_CLI), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"mtl {mtl.__version__}"
    bad = subprocess.run([str(PACKAGE_CLI), "train"], capture_output=True, text=True)
    assert bad.returncode == 2 and "CONFIG" in bad.stderr
    missing = subprocess.run([str(PACKAGE_CLI), "check", str(tmp_path / "none.toml")], capture_output=True, text=True)
    assert missing.returncode == 1 and "none.toml" in missing.stderr


WORDS = (
    "<pad> <s> </s> [UNK] = \n intent slots of none flight fare from to day show me flights boston denver i want "
    "fly dallas what is the cheapest new york paris london on monday a morning"
)


def tiny_decoder(tmp_path):
    """The tiny random Llama of tests/fixtures with a word-level tokenizer over the tiny data's words (as the
    Rust decoder tests make it)."""
    directory = tmp_path / "decoder"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ROOT / "tests/fixtures/tiny-llama" / name, directory / name)
    vocab = WORDS.split(" ")
    vocab[5] = "\n"
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 5, "content": "\n", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": False}],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(vocab)}, "unk_token": "[UNK]"},
    }
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    return directory


def test_a_decoder_trains_and_predicts_through_python(tmp_path):
    config = tiny_config()
    config["model"] = {"path": str(tiny_decoder(tmp_path)), "max_len": 40}
    config["training"].update({"epochs": 3, "lr": 2e-2})
    config["training"].pop("weighting")
    config["tasks"]["intent"]["prompt"] = "intent of {text}"
    config["tasks"]["slots"]["prompt"] = "slots of {text}"
    config["peft"] = {"method": "lora", "r": 4, "per_task": True}
    run = mtl.train(config, out=tmp_path / "run", progress=False)
    assert run.manifest["architecture"] == "llama"
    ours = run.predict(TEXTS[:2])
    assert set(ours[0]["predictions"]) == {"intent", "slots"}
    assert cli_predict(BINARY, run.dir, TEXTS[:2], tmp_path) == ours
    assert set(run.evaluate("dev")) >= {"intent", "slots"}


def test_the_gil_is_released_while_training(tmp_path):
    counted = [0]
    done = threading.Event()

    def count():
        while not done.is_set():
            counted[0] += 1

    thread = threading.Thread(target=count)
    thread.start()
    try:
        mtl.train(TINY, out=tmp_path / "run", overrides={"training.epochs": 300}, progress=False)
    finally:
        done.set()
        thread.join()
    # About a second of training: the counter reached 19 million on 2 cores with the GIL released; held
    # through the compute, the GIL would leave it the few switch intervals (5 ms each) of the Python parts.
    assert counted[0] > 1_000_000, counted[0]


def test_config_paths_are_read_from_the_config_folder(tmp_path, monkeypatch):
    # From another directory, the file's relative paths still name its folder's files; stored absolute.
    monkeypatch.chdir(tmp_path)
    run = mtl.train(TINY, out="run", overrides={"training.epochs": 1}, progress=False)
    assert Path(run.config["tasks"]["intent"]["data"]["train"]) == DATA
    assert mtl.Run.open(tmp_path / "run").evaluate("dev")
    # A dict's relative paths are read from the current directory.
    shutil.copy(DATA, tmp_path / "here.jsonl")
    config = tiny_config()
    config["tasks"]["intent"]["data"] = {"train": "here.jsonl"}
    config["tasks"]["slots"]["data"] = {"train": "here.jsonl"}
    assert mtl.check(config)["tasks"]["intent"]["examples"]["train"] == len(DATA.read_text().splitlines())


def test_init_writes_a_config_that_trains(tmp_path):
    shutil.copy(DATA, tmp_path / "train.jsonl")
    shutil.copy(DATA, tmp_path / "dev.jsonl")
    config = mtl.init([tmp_path / "train.jsonl", tmp_path / "dev.jsonl"], tmp_path / "c" / "init.toml",
                      model=ROOT / "tests/fixtures/tiny-bert")
    text = config.read_text()
    assert 'data = { train = "../train.jsonl", dev = "../dev.jsonl" }' in text
    run = mtl.train(config, out=tmp_path / "run", overrides={"training.epochs": 1}, progress=False)
    assert run.tasks == ["intent", "slots"]
    with pytest.raises(mtl.MtlError, match="force"):
        mtl.init([tmp_path / "train.jsonl"], config)
