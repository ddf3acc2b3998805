"""PoEConfig: derivation, JSON round trip, and every impossible shape refused with a named field."""

import dataclasses
import json

import pytest

from poelm.core.config import PoEConfig, nanochat_shape, short_window, split_stages, windows_from_pattern
from poelm.core.errors import PoelmError


def test_derived_structure_matches_nanochat():
    c = PoEConfig(n_layer=24, n_head=12, n_kv_head=12, n_embd=1536, sequence_len=2048, poe_stage_layers=[6] * 4)
    assert short_window(2048) == 512
    assert c.layer_windows == [512, 512, 512, 2048] * 6
    assert c.value_embed_layers == list(range(1, 24, 2))  # the seed card: layers 1, 3, ..., 23
    assert c.backout_layer == 12
    assert c.stage_ends == [5, 11, 17, 23] and c.stage_starts == [0, 6, 12, 18]
    assert c.poe_backout_stages == [3]
    assert c.padded_vocab_size == 32768 and c.head_dim == 128


def test_last_layer_always_long_and_padding():
    assert windows_from_pattern("S", 3, 1024) == [256, 256, 1024]
    assert short_window(100) == 128  # a quarter rounded up to a multiple of 128
    assert PoEConfig(vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64).padded_vocab_size == 320


def test_json_round_trip_is_explicit(tmp_path):
    c = PoEConfig(vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, sequence_len=256,
                  poe_stage_layers=[3, 1], poe_alpha=0.5, poe_stage_heads=True)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(c.to_dict()))
    back = PoEConfig.from_json_file(path)
    assert back == c
    # Structure is recorded, so changing the inputs it was derived from changes nothing.
    data = c.to_dict()
    data["window_pattern"] = "L"
    assert PoEConfig.from_dict(data).layer_windows == c.layer_windows


def test_truncated_keeps_recorded_structure():
    c = PoEConfig(vocab_size=300, n_layer=6, n_head=2, n_kv_head=2, n_embd=64, sequence_len=512,
                  poe_stage_layers=[2, 2, 2])
    t = c.truncated(1)
    assert t.n_layer == 4 and t.poe_stage_layers == [2, 2]
    assert t.layer_windows == c.layer_windows[:4]  # layer 3 stays short: nothing is recomputed
    assert t.value_embed_layers == [1, 3] and t.poe_backout_stages == [] and t.backout_layer == 3
    assert c.truncated(0).backout is False  # layer 3 is cut away, and with it the backout
    with pytest.raises(PoelmError, match="stage 3 out of range"):
        c.truncated(3)


@pytest.mark.parametrize("changes, field", [
    (dict(n_embd=65), "n_embd"),
    (dict(n_head=3, n_kv_head=3, n_embd=63), "n_embd"),  # head_dim 21: rotary needs it even
    (dict(n_kv_head=3), "n_kv_head"),
    (dict(n_kv_head=8), "n_kv_head"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(poe_stage_layers=[2, 3]), "poe_stage_layers"),
    (dict(poe_stage_layers=[4, 0]), "poe_stage_layers"),
    (dict(poe_mode="deep"), "poe_mode"),
    (dict(poe_alpha=1.5), "poe_alpha"),
    (dict(window_pattern="SXL"), "window_pattern"),
    (dict(layer_windows=[1, 2]), "layer_windows"),
    (dict(value_embed_layers=[3, 1]), "value_embed_layers"),
    (dict(value_embed_layers=[9]), "value_embed_layers"),
    (dict(poe_backout_stages=[5]), "poe_backout_stages"),
    (dict(backout=False, poe_backout_stages=[0]), "poe_backout_stages"),
    (dict(poe_stage_layers=[1, 3], poe_backout_stages=[0], backout_layer=2), "backout_layer"),
    (dict(n_embd=16, n_head=2, n_kv_head=2), "n_embd"),  # smear reads 24 channels
])
def test_impossible_configs_name_the_field(changes, field):
    base = dict(vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, sequence_len=256)
    base.update(changes)
    with pytest.raises(PoelmError, match=f"'{field}'"):
        PoEConfig(**base)


def test_from_dict_errors(tmp_path):
    with pytest.raises(PoelmError, match="unknown config field.*n_layers"):
        PoEConfig.from_dict({"n_layers": 4})
    PoEConfig.from_dict({"n_layer": 4, "n_head": 2, "n_kv_head": 2, "n_embd": 128, "model_type": "poelm",
                         "auto_map": {}, "converted_from": {"format": "nanochat"}})
    bad = tmp_path / "config.json"
    bad.write_text('{"n_layer": 4,\n "n_head": }')
    with pytest.raises(PoelmError, match=r"config.json: not valid JSON \(line 2"):
        PoEConfig.from_json_file(bad)
    with pytest.raises(PoelmError, match="nope.json: missing"):
        PoEConfig.from_json_file(tmp_path / "nope.json")
    with pytest.raises(PoelmError, match="expected a JSON object"):
        PoEConfig.from_dict([1, 2])


def test_nanochat_depth_shape_and_stage_split():
    assert nanochat_shape(24) == {"n_layer": 24, "n_embd": 1536, "n_head": 12, "n_kv_head": 12}
    assert nanochat_shape(3)["n_embd"] == 256  # 192 rounded up to a multiple of head_dim 128
    assert split_stages(10, 4) == [3, 3, 2, 2]
    with pytest.raises(PoelmError, match="depth"):
        nanochat_shape(0)


def test_every_field_survives_json():
    c = PoEConfig(vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, smear=False, backout=False,
                  value_embed_layers=[], window_pattern="L")
    again = PoEConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert dataclasses.asdict(again) == dataclasses.asdict(c)
