"""Hugging Face remote code: a poelm directory loads with plain transformers in a fresh process,
gives poelm's logits, generates with the KV cache, and runs the seed card's quick start verbatim
with the same tokens as a plain greedy loop over the unpadded prompt."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from poelm.core.model import KVCache
from poelm.modeldir import load_model

# The seed card's quick start, verbatim but for the model id (filled in by format()).
QUICK_START = '''
from transformers import AutoModelForCausalLM, AutoTokenizer
import torch
model_id = "{model_id}"
tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(
model_id,
trust_remote_code=True,
torch_dtype=torch.bfloat16,
device_map="auto",
)
model.eval()
BOS, USR_S, USR_E, ASS_S = 32759, 32760, 32761, 32762
q = "Write a Python function that returns the sum of a list."
ids = [BOS, USR_S] + tokenizer.encode(q) + [USR_E, ASS_S]
input_ids = torch.tensor([ids], device=model.device)
with torch.no_grad():
    out = model.generate(
input_ids, max_new_tokens=160, do_sample=False,
repetition_penalty=1.15, pad_token_id=BOS,
)
print(tokenizer.decode(out[0, len(ids):]))
'''


def run_python(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def plain_greedy(model, prompt: list[int], max_new: int, penalty: float, eos: set[int], cached: bool) -> list[int]:
    """Greedy decoding with transformers' repetition penalty, over the unpadded prompt."""
    seq = list(prompt)
    cache = KVCache() if cached else None
    fed = 0
    with torch.no_grad():
        for _ in range(max_new):
            x = torch.tensor([seq[fed:] if cached else seq])
            logits = model(x, cache=cache).logits[0, -1].float()
            fed = len(seq)
            seen = torch.tensor(sorted(set(seq)))
            score = logits[seen]
            logits[seen] = torch.where(score < 0, score * penalty, score / penalty)
            token = int(logits.argmax())
            seq.append(token)
            if token in eos:
                break
    return seq[len(prompt):]


# The init model runs the card verbatim (bf16). The trained-like model runs it in float32: in bf16 a
# cached step (T=1 matmuls) and an uncached one round differently, so near-tied random logits can
# legitimately flip; in float32 all three decodings must agree token for token.
@pytest.mark.parametrize("which, dtype", [("seed_model_dir", "bfloat16"), ("trained_like_model_dir", "float32")])
def test_seed_quick_start_verbatim_equals_plain_greedy(which, dtype, request, seed_vocab_tokenizer):
    model_dir = request.getfixturevalue(which)
    code = QUICK_START.format(model_id=model_dir).replace("torch.bfloat16", f"torch.{dtype}") + (
        "import json\nprint('IDS', json.dumps([out[0, len(ids):].tolist(), tokenizer.decode(out[0, len(ids):])]))\n")
    stdout = run_python(code)
    ids_line = [l for l in stdout.splitlines() if l.startswith("IDS ")][-1]
    hf_ids, text = json.loads(ids_line[4:])
    assert text == seed_vocab_tokenizer.decode(hf_ids)

    tok = seed_vocab_tokenizer
    q = "Write a Python function that returns the sum of a list."
    prompt = [32759, 32760] + tok.encode(q) + [32761, 32762]
    model = load_model(model_dir, dtype=getattr(torch, dtype))
    eos = {tok.token_id("<|assistant_end|>"), tok.bos_id}
    uncached = plain_greedy(model, prompt, 160, 1.15, eos, cached=False)
    cached = plain_greedy(model, prompt, 160, 1.15, eos, cached=True)
    assert hf_ids == uncached == cached
    assert len(hf_ids) > 10


def test_fresh_process_logits_generate_pipeline_and_save(trained_like_model_dir, tmp_path):
    model = load_model(trained_like_model_dir)
    x = torch.randint(0, 32759, (1, 40), generator=torch.Generator().manual_seed(0))
    x[0, 0] = 32759
    with torch.no_grad():
        want = model(x).logits
        stage0 = model(x, exit_stage=0).logits
        cache = KVCache()
        model(x[:, :30], cache=cache)
    torch.save({"x": x}, tmp_path / "x.pt")
    code = textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
        d = "{trained_like_model_dir}"
        m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
        x = torch.load("{tmp_path / 'x.pt'}")["x"]
        with torch.no_grad():
            out = m(x)
            torch.save({{"logits": out.logits, "stage0": m(x, exit_stage=0).logits,
                         "loss": m(x, labels=x).loss}}, "{tmp_path / 'hf.pt'}")
            a = m.generate(x[:, :12], max_new_tokens=20, do_sample=False)
            b = m.generate(x[:, :12], max_new_tokens=20, do_sample=False, use_cache=False)
        print("SAME", a.tolist() == b.tolist(), a.shape[1])
        tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
        pipe = pipeline("text-generation", model=d, trust_remote_code=True)
        r = pipe("<|bos|><|user_start|>hello<|user_end|><|assistant_start|>", max_new_tokens=5, do_sample=False)
        print("PIPE", type(r[0]["generated_text"]).__name__)
        m.save_pretrained("{tmp_path / 'resaved'}")
        m2 = AutoModelForCausalLM.from_pretrained("{tmp_path / 'resaved'}", trust_remote_code=True).eval()
        with torch.no_grad():
            print("RESAVED", (m2(x).logits - out.logits).abs().max().item() < 1e-4)
    """)
    stdout = run_python(code)
    hf = torch.load(tmp_path / "hf.pt")
    # Same code and weights; only float rounding may differ (transformers keeps the weights in
    # differently aligned memory, and the matmul kernels follow alignment).
    assert (hf["logits"] - want).abs().max() < 1e-4
    assert (hf["stage0"] - stage0).abs().max() < 1e-4
    shifted = torch.nn.functional.cross_entropy(want[0, :-1], x[0, 1:])
    assert torch.allclose(hf["loss"], shifted, atol=1e-5)
    assert "SAME True 32" in stdout
    assert "PIPE str" in stdout
    assert "RESAVED True" in stdout
    # What transformers saved is a poelm directory too (nanochat tensor names, no prefix).
    resaved = load_model(tmp_path / "resaved")
    with torch.no_grad():
        assert (resaved(x).logits - want).abs().max() < 1e-4


def test_directory_contents(seed_model_dir):
    names = {p.name for p in seed_model_dir.iterdir()}
    from poelm.modeldir import shipped_code_files

    code = {p.name for p in shipped_code_files()}
    assert {"modeling_poelm.py", "configuration_poelm.py", "tokenization_poelm.py", "model.py", "config.py",
            "cascade.py", "files.py", "errors.py", "tokenizer.py"} <= code and "__init__.py" not in code
    for f in ("config.json", "model.safetensors", "generation_config.json", "README.md", "poelm_tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "digests.json", *code):
        assert f in names, f
    for p in shipped_code_files():  # every shipped file is the package's own, byte for byte
        assert (seed_model_dir / p.name).read_bytes() == p.read_bytes(), p.name
    assert not any(n.endswith((".pkl", ".pt", ".bin")) for n in names)
    config = json.loads((seed_model_dir / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_poelm.PoelmConfig",
                                  "AutoModelForCausalLM": "modeling_poelm.PoelmForCausalLM"}
    assert "AutoTokenizer" not in json.dumps(config)  # belongs in tokenizer_config.json (docs/transformers.md)
    assert config["bos_token_id"] == 32759 and config["poe_stage_layers"] == [1, 1]


def test_padded_batch_is_refused_not_silently_wrong(trained_like_model_dir):
    code = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained("{trained_like_model_dir}", trust_remote_code=True)
        x = torch.tensor([[5, 6, 7, 8], [32759, 9, 10, 11]])
        mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
        try:
            m(x, attention_mask=mask)
        except ValueError as e:
            print("REFUSED", e)
    """)
    assert "REFUSED attention_mask hides tokens in row 0" in run_python(code)
