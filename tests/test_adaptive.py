"""Adaptive depth: infinite bounds == full-depth Log-OP greedy; zero bounds == stage 0 greedy;
calibration writes bounds beside the model; the CLI runs it."""

import json
import math

import pytest
import torch

from poelm.core.errors import PoelmError
from poelm.infer import SamplingParams
from poelm.infer.adaptive import AdaptiveDecoder, calibrate, load_calibration, save_calibration

from util import tiny_model


def greedy(model, prompt, n, **kw):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]), **kw).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("stages", [[1, 1, 2], [2, 2], [1, 3]])
def test_infinite_bounds_are_full_depth(stages):
    model = tiny_model(poe_stage_layers=stages, window_pattern="SL").eval()
    prompt = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    dec = AdaptiveDecoder(model, [math.inf] * len(stages))
    assert dec.generate(prompt, SamplingParams(max_new_tokens=30)) == greedy(model, prompt, 30, output="logop")
    assert dec.stats.exits[-1] == 29 and sum(dec.stats.exits[:-1]) == 0


def test_zero_bounds_exit_at_stage_zero_with_exact_deferred_keys():
    model = tiny_model(poe_stage_layers=[1, 1, 2]).eval()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    dec = AdaptiveDecoder(model, [0.0, 0.0, 0.0])
    got = dec.generate(prompt, SamplingParams(max_new_tokens=25))
    # Every token exits at stage 0 (margin > 0 unless tied), so the output is stage 0's greedy decoding
    # (Log-OP of one stage = that stage), computed over keys the skipped layers still fill later.
    assert got[1:] == greedy(model, prompt + got[:1], 24, exit_stage=0)
    assert dec.stats.exits[0] == 24


def test_calibration_file_round_trip(tmp_path):
    model = tiny_model(poe_stage_layers=[2, 2]).eval()
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    bounds = calibrate(model, [(x,)], 99.0)
    assert bounds[0] == 0.0 and bounds[1] > 0
    save_calibration(tmp_path, bounds, 99.0, x.numel())
    assert load_calibration(tmp_path, 2) == bounds
    with pytest.raises(PoelmError, match="2 bounds for a model of 3 stages"):
        load_calibration(tmp_path, 3)
    with pytest.raises(PoelmError, match="run `poelm calibrate"):
        load_calibration(tmp_path / "nope", 2)


@pytest.fixture(scope="module")
def stage(trained_like_model_dir, tmp_path_factory):
    """A one-block stage on the trained-like base, calibrated with `poelm calibrate` (a stage directory
    brings its whole chain); the tests only read it."""
    from poelm.app.cli import main
    from poelm.models.specialist import attach, save_specialist

    root = tmp_path_factory.mktemp("adaptive_stage")
    stage = save_specialist(attach(trained_like_model_dir, 1, seed=1)[0], trained_like_model_dir, root / "s", "s")
    (root / "c.txt").write_text("print('hello world')\n" * 40)
    assert main(["calibrate", str(stage), "--data", str(root / "c.txt"), "--max-tokens", "256"]) == 0
    return stage


def test_cli_adaptive_and_compose(trained_like_model_dir, stage, tmp_path, capsys):
    """calibrate + generate --adaptive, and generate --compose with two siblings (`stage` and another)."""
    from poelm.app.cli import main
    from poelm.models.specialist import attach, save_specialist

    text = tmp_path / "calib.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    import shutil
    model_dir = tmp_path / "m"
    shutil.copytree(trained_like_model_dir, model_dir)
    assert main(["calibrate", str(model_dir), "--data", str(text), "--max-tokens", "512"]) == 0
    written = json.loads((model_dir / "adaptive.json").read_text())
    assert len(written["bounds"]) == 2 and written["bounds"][0] == 0.0 and written["bounds"][1] > 0
    assert f"-> {model_dir / 'adaptive.json'}" in capsys.readouterr().out
    assert "adaptive.json" in json.loads((model_dir / "digests.json").read_text())["files"]  # recorded, verified
    assert main(["generate", str(model_dir), "--prompt", "def f(", "--max-new-tokens", "8", "--adaptive"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "Log-OP, exits per stage" in out.err
    b = save_specialist(attach(trained_like_model_dir, 1, seed=2)[0], trained_like_model_dir, tmp_path / "b", "b")
    assert main(["generate", str(stage), "--prompt", "def f(", "--max-new-tokens", "6", "--compose", str(b),
                 "--compose-weights", "1,0.5"]) == 0
    assert "2 siblings over one trunk pass" in capsys.readouterr().err
    assert main(["generate", str(stage), "--prompt", "x", "--adaptive", "--compose", str(b)]) == 2


def test_composition_of_one_sibling_decodes_as_that_sibling(stage):
    from poelm.infer.compose import ComposedDecoder, Composition
    from poelm.infer.engine import Engine
    from poelm.infer.sampling import SamplingParams
    from poelm import models

    params = SamplingParams(max_new_tokens=10)
    prompt = [32759, 100, 200, 300]
    want = Engine(models.open(stage).model(), stop_ids=set()).generate(prompt, params)
    assert ComposedDecoder(Composition([stage]), stop_ids=set()).generate(prompt, params) == want


def test_modes_on_a_stage_directory(stage, capsys):
    """The PoE modes work on a stage directory (its whole chain) as on a base."""
    from poelm.app.cli import main

    capsys.readouterr()
    for mode in (["--speculative", "2", "--draft-stage", "1"], ["--adaptive"], ["--exit-stage", "1"]):
        assert main(["generate", str(stage), "--prompt", "def f(", "--max-new-tokens", "5", *mode]) == 0, mode
    assert capsys.readouterr().err.count("tokens in") == 3
