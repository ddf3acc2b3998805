"""--report-to: TensorBoard event files (read back with TensorBoard's own reader) and W&B offline run
files hold what metrics.jsonl holds, at the same steps, for pretraining and stage SFT; a resumed run
continues the same tracker run without duplicate steps; a missing extra is one line before any work.
Model FLOPs per token in metrics.jsonl equal the formula worked out here by hand; no MFU on CPU."""

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

from poelm import models
from poelm.app.cli import main
from poelm.core.config import PoEConfig
from poelm.core.errors import PoelmError
from poelm.core.model import PoEGPT
from poelm.train.metrics import MetricsLog
from poelm.train.pretrain import PretrainArgs, pretrain
from poelm.train.sft import StageTrainArgs, stage_train
from poelm.train.trackers import check_report_to


# The extras (pip install 'poelm[tensorboard,wandb]'); without them only their tests skip.
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard missing")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb missing")
SHAPE = dict(n_layer=3, n_head=2, n_kv_head=1, n_embd=64, sequence_len=64, poe_stage_layers=[2, 1])


def pretrain_args(tmp_path, tiny_tokenizer_dir, corpus_dir, name="run", **changes):
    base = dict(data=[str(corpus_dir)], out=str(tmp_path / name), tokenizer=str(tiny_tokenizer_dir),
                config=PoEConfig(vocab_size=512, **SHAPE), steps=6, device_batch_size=4, eval_every=3,
                eval_tokens=512, seq_len=32, sample_tokens=4, val_fraction=0.1, device="cpu")
    return PretrainArgs(**{**base, **changes})


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    lines = [{"messages": [{"role": "user", "content": f"Please add {i}."},
                           {"role": "assistant", "content": f"def f{i}(x):\n    return x + {i}\n"}]} for i in range(40)]
    (d / "train.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return d / "train.jsonl"


@pytest.fixture(scope="module")
def stage(tiny_stage):
    return tiny_stage[1]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def flat(record: dict) -> tuple[dict, dict]:
    """(scalars, texts) of a record: nested keys joined with "/" (the documented tracker keys)."""
    scalars, texts = {}, {}

    def walk(key, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{key}/{k}", x)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(f"{key}/{i}", x)
        elif isinstance(v, str):
            texts[key] = v
        else:
            scalars[key] = float(v)

    for k, v in record.items():
        if k != "step":
            walk(k, v)
    return scalars, texts


def expected(recs: list[dict]) -> tuple[dict, dict]:
    """{tag: [(step, value)]} of scalars and of texts, as metrics.jsonl has them."""
    scalars, texts = {}, {}
    for r in recs:
        s, t = flat(r)
        for k, v in s.items():
            scalars.setdefault(k, []).append((r["step"], v))
        for k, v in t.items():
            texts.setdefault(k, []).append((r["step"], v))
    return scalars, texts


def tensorboard(folder: Path) -> tuple:
    """What TensorBoard shows: scalars and texts per tag, with purged (orphaned) events dropped."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    scalars = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in tags["scalars"]}
    texts = {t.removesuffix("/text_summary"): [(e.step, e.tensor_proto.string_val[0].decode()) for e in ea.Tensors(t)]
             for t in tags["tensors"] if t.endswith("/text_summary")}
    return scalars, texts, ea


def check_tensorboard_equals_metrics(run: Path):
    want_scalars, want_texts = expected(records(run))
    scalars, texts, ea = tensorboard(run / "tensorboard")
    assert set(scalars) == set(want_scalars)
    for tag, want in want_scalars.items():  # float32 in the event files
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert all(g == pytest.approx(w, rel=1e-6, abs=1e-30) for (_, g), (_, w) in zip(got, want)), tag
    config = texts.pop("config")
    assert texts == want_texts
    assert config[0][0] == 0 and json.loads(config[0][1]) == json.loads((run / "run.json").read_text())
    return ea


def hparams(ea) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


class Killed(Exception):
    pass


def kill_after(monkeypatch, step: int) -> None:
    """The run dies right after metrics.jsonl (and the trackers) got the record of `step`."""
    real = MetricsLog.append

    def append(self, record):
        real(self, record)
        if record["step"] == step:
            raise Killed

    monkeypatch.setattr(MetricsLog, "append", append)


def linear_params(n_embd: int, n_head: int, n_kv_head: int) -> int:
    """One block's matmul weights: c_q, c_k, c_v, c_proj, MLP c_fc and c_proj (d -> 4d -> d)."""
    d, hd = n_embd, n_embd // n_head
    return d * n_head * hd + 2 * d * n_kv_head * hd + n_head * hd * d + 2 * d * 4 * d


# ----------------------------------------------------------------------------------------- pretrain
@needs_tensorboard
def test_pretrain_tensorboard_equals_metrics_and_flops(tmp_path, tiny_tokenizer_dir, corpus_dir):
    a = pretrain_args(tmp_path, tiny_tokenizer_dir, corpus_dir, report_to=("tensorboard",))
    pretrain(a)
    run = Path(a.out)
    ea = check_tensorboard_equals_metrics(run)
    hp = hparams(ea)
    assert hp["seed"] == 0 and hp["model/n_layer"] == 3 and hp["command"] == "pretrain"
    # flat PoE: 6 x (3 blocks + the value-embedding gates (12 -> n_kv_head) + the smear gate (24 -> 1)
    # + lm_head read out at both stages) + attention 12 h hd min(window, T) per layer.
    c = PoEConfig(vocab_size=512, **SHAPE)
    d, T = 64, 32
    matmul = 3 * linear_params(d, 2, 1) + 12 * 1 * len(c.value_embed_layers) + 24 + 2 * d * c.padded_vocab_size
    attention = sum(12 * 2 * 32 * min(w, T) for w in c.layer_windows)
    train = [r for r in records(run) if "tok_per_s" in r]
    assert len(train) == 6
    assert all(r["flops_per_token"] == 6 * matmul + attention for r in train)
    assert not any("mfu" in r for r in records(run))  # CPU: no peak, no MFU


@needs_tensorboard
def test_resumed_pretrain_continues_the_event_folder(tmp_path, tiny_tokenizer_dir, corpus_dir, monkeypatch):
    a = pretrain_args(tmp_path, tiny_tokenizer_dir, corpus_dir, report_to=("tensorboard",), save_every=3)
    with monkeypatch.context() as m:
        kill_after(m, 5)  # checkpoint at 3; steps 4 and 5 logged, then lost
        with pytest.raises(Killed):
            pretrain(a)
    run = Path(a.out)
    first = {s for s, _ in tensorboard(run / "tensorboard")[0]["train_loss"]}
    assert first == {1, 2, 3, 4, 5}
    killed_speed = dict(tensorboard(run / "tensorboard")[0]["tok_per_s"])
    pretrain(pretrain_args(tmp_path, tiny_tokenizer_dir, corpus_dir, report_to=("tensorboard",), save_every=3,
                           resume=True))
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one folder, a file per attempt
    check_tensorboard_equals_metrics(run)  # every step once, with the resumed run's values
    speed = dict(tensorboard(run / "tensorboard")[0]["tok_per_s"])
    assert speed[4] != killed_speed[4] or speed[5] != killed_speed[5]  # timings differ: the re-run's were kept


@needs_tensorboard
def test_tracker_added_on_resume_gets_the_whole_run(tmp_path, tiny_tokenizer_dir, corpus_dir, monkeypatch):
    with monkeypatch.context() as m:
        kill_after(m, 4)
        with pytest.raises(Killed):
            pretrain(pretrain_args(tmp_path, tiny_tokenizer_dir, corpus_dir, save_every=3))
    run = tmp_path / "run"
    assert not (run / "tensorboard").exists()
    pretrain(pretrain_args(tmp_path, tiny_tokenizer_dir, corpus_dir, save_every=3, resume=True,
                           report_to=("tensorboard",)))  # --report-to is free on resume
    check_tensorboard_equals_metrics(run)  # steps 0..3 replayed from metrics.jsonl


# --------------------------------------------------------------------------------------- stage train
@needs_tensorboard
def test_stage_train_tensorboard_equals_metrics_and_flops(stage, chat_data, tmp_path):
    run = tmp_path / "run"
    stage_train(StageTrainArgs(stage=str(stage), data=[str(chat_data)], out=str(run), steps=4, val_conversations=8,
                               seq_len=64, device_batch_size=4, eval_every=2, device="cpu",
                               report_to=("tensorboard",)))
    check_tensorboard_equals_metrics(run)
    # The parent's 3 layers (and the smear gate) run without autograd: 2 per weight, 4 per attention key;
    # the stage's block trains: 6 and 12; the stage reads out through lm_head + specialist_head, summed
    # into one d x V weight, which trains (6).
    c = models.open(stage).config
    ve = 12 * 1  # a value-embedding gate: 12 channels -> n_kv_head
    assert c.n_layer == 4 and c.poe_stage_layers == [2, 1, 1] and c.stage_head and not c.head_fold
    block = linear_params(64, 2, 1)
    frozen = 2 * (3 * block + ve * sum(i < 3 for i in c.value_embed_layers) + 24)
    trained = 6 * (block + ve * sum(i == 3 for i in c.value_embed_layers))
    heads = 6 * 64 * c.padded_vocab_size
    attention = sum((4 if i < 3 else 12) * 2 * 32 * min(w, 64) for i, w in enumerate(c.layer_windows))
    train = [r for r in records(run) if "tok_per_s" in r]
    assert train and all(r["flops_per_token"] == frozen + trained + heads + attention for r in train)
    assert not any("mfu" in r for r in records(run))


# ------------------------------------------------------------------------------------------------ W&B
def wandb_history(path: Path) -> dict[int, dict]:
    """{step: {key: value}} of a W&B run file: records in LevelDB log framing (32 KiB blocks, each
    chunk: crc32, length, type), after a 7-byte ":W&B" header; each record a wandb Record proto."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, out = path.read_bytes(), 7, b"", {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record.FromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                out[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    return out


@needs_tensorboard
@needs_wandb
def test_wandb_offline_run_resumes_the_same_run(tmp_path, tiny_tokenizer_dir, corpus_dir, monkeypatch):
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    a = pretrain_args(tmp_path, tiny_tokenizer_dir, corpus_dir, report_to=("wandb", "tensorboard"), save_every=3)
    with monkeypatch.context() as m:
        kill_after(m, 5)
        with pytest.raises(Killed):
            pretrain(a)
    run = Path(a.out)
    run_id = (run / "wandb_run_id").read_text().strip()
    pretrain(pretrain_args(tmp_path, tiny_tokenizer_dir, corpus_dir, report_to=("wandb", "tensorboard"),
                           save_every=3, resume=True))
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2  # the same run, resumed
    histories = [wandb_history(f) for f in files]
    killed, resumed = sorted(histories, key=len, reverse=True)
    assert sorted(killed) == [0, 1, 2, 3, 4, 5] and sorted(resumed) == [4, 5, 6]
    for r in records(run):
        scalars, texts = flat(r)
        got = (killed if r["step"] <= 3 else resumed)[r["step"]]
        assert got == {**scalars, **texts}
    check_tensorboard_equals_metrics(run)


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_missing_extra_is_one_line_before_any_work(backend, tmp_path, tiny_tokenizer_dir, corpus_dir, monkeypatch,
                                                   capsys):
    monkeypatch.setitem(sys.modules, backend, None)  # import fails as if not installed
    a = pretrain_args(tmp_path, tiny_tokenizer_dir, corpus_dir, report_to=(backend,))
    message = f"--report-to {backend} needs the {backend} package: pip install 'poelm[{backend}]'"
    with pytest.raises(PoelmError) as e:
        pretrain(a)
    assert str(e.value) == message
    assert not Path(a.out).exists()
    argv = ["pretrain", "--data", str(corpus_dir), "--tokenizer", str(tiny_tokenizer_dir), "--depth", "2",
            "--out", str(tmp_path / "cli"), "--device", "cpu", "--report-to", "tensorboard", backend]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"poelm: error: {message}" and "Traceback" not in err
    assert not (tmp_path / "cli").exists()


def test_report_to_choices():
    assert check_report_to(["none"]) == ()
    assert check_report_to(["tensorboard", "tensorboard"]) == ("tensorboard",)
    with pytest.raises(PoelmError, match="none means no tracker"):
        check_report_to(["none", "tensorboard"])
    with pytest.raises(PoelmError, match="expected one or more of none, tensorboard, wandb"):
        check_report_to(["mlflow"])


# ---------------------------------------------------------------------------------------------- MFU
@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("Tesla T4", None)])
def test_peak_by_device_name(name, peak, monkeypatch):
    import torch

    from poelm.train.flops import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == (name, peak)
    assert peak_flops(torch.device("cpu")) == ("cpu", None)


@needs_tensorboard
def test_mfu_is_flops_times_tokens_per_second_over_peak(tmp_path, tiny_tokenizer_dir, corpus_dir, monkeypatch):
    import poelm.train.loop

    monkeypatch.setattr(poelm.train.loop, "peak_flops", lambda device: ("a test device", 1e9))  # as on a GPU
    a = pretrain_args(tmp_path, tiny_tokenizer_dir, corpus_dir, steps=2, eval_every=2, report_to=("tensorboard",))
    pretrain(a)
    train = [r for r in records(Path(a.out)) if "tok_per_s" in r]
    assert len(train) == 2
    assert all(r["mfu"] == pytest.approx(r["flops_per_token"] * r["tok_per_s"] / 1e9, rel=1e-12) for r in train)
    check_tensorboard_equals_metrics(Path(a.out))  # mfu is a tracked figure too


@pytest.mark.parametrize("case", ["flat", "none", "specialist", "specialist_chat_rows"])
def test_flops_matmuls_equal_torch_flop_counter(case):
    """The matmul part of the formula == what FlopCounterMode counts in a fused-loss forward + backward
    (less the smear gate at position 0, which it skips); attention is the formula's own term."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from poelm.models.specialist import freeze_for_specialist, grow
    from poelm.train.flops import training_flops_per_token

    c = PoEConfig(vocab_size=512, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, sequence_len=64,
                  poe_stage_layers=[2, 1], poe_mode="none" if case == "none" else "flat")
    model = PoEGPT(c)
    model.init_weights(0)
    frozen = 0
    if case.startswith("specialist"):
        model = grow(model, 1, 0)
        freeze_for_specialist(model, [1, 2] if case == "specialist_chat_rows" else None)
        frozen = 0 if case == "specialist_chat_rows" else 3
    c, K, B, T = model.config, model.config.n_stages, 2, 48
    readouts = {k: 1.0 for k in range(K) if c.poe_mode != "none" or k == K - 1}
    formula = training_flops_per_token(model, T, readouts=readouts, frozen_layers=frozen)
    attention = sum((12 if i >= frozen else 4) * c.n_head * c.head_dim * min(w, T) for i, w in enumerate(c.layer_windows))
    smear_first = {"specialist": 2, "specialist_chat_rows": 4}.get(case, 6) * 24 / T  # frozen gate: 2 or 4
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 500, (B, T), generator=g), torch.randint(0, 500, (B, T), generator=g)
    with FlopCounterMode(display=False) as counter:
        model(x, targets=y, loss_reduction="sum", frozen_layers=frozen).loss.backward()
    mm = counter.get_flop_counts()["Global"][torch.ops.aten.mm] / (B * T)
    assert mm == pytest.approx(formula - attention - smear_first, rel=1e-12)
