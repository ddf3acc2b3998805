"""Hugging Face remote code: a poelm directory loads with plain transformers in a fresh process,
gives poelm's logits, generates with the KV cache, and runs the seed card's quick start verbatim
with the same tokens as plain greedy decoding over the unpadded prompt (a cached loop, and the
uncached choice at every step)."""

import json
import subprocess
import sys
import textwrap

import torch

from poelm.core.model import KVCache
from poelm import models

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


def penalised_argmax(logits: torch.Tensor, seen: list[int], penalty: float) -> int:
    """transformers' repetition penalty on the tokens seen so far, then the greedy choice."""
    logits = logits.float().clone()
    seen = torch.tensor(sorted(set(seen)))
    score = logits[seen]
    logits[seen] = torch.where(score < 0, score * penalty, score / penalty)
    return int(logits.argmax())


def plain_greedy(model, prompt: list[int], max_new: int, penalty: float, eos: set[int], cached: bool) -> list[int]:
    """Greedy decoding with transformers' repetition penalty, over the unpadded prompt."""
    seq = list(prompt)
    cache = KVCache() if cached else None
    fed = 0
    with torch.no_grad():
        for _ in range(max_new):
            x = torch.tensor([seq[fed:] if cached else seq])
            logits = model(x, cache=cache).logits[0, -1]
            fed = len(seq)
            token = penalised_argmax(logits, seq, penalty)
            seq.append(token)
            if token in eos:
                break
    return seq[len(prompt):]


def uncached_greedy_along(model, prompt: list[int], tokens: list[int], max_new: int, penalty: float,
                          eos: set[int]) -> list[int]:
    """What `plain_greedy(..., cached=False)` returns, found with one forward instead of one per token: the
    model is causal, so position t of an uncached forward over prompt + tokens sees exactly the prefix the
    loop's step would feed it. Each step's choice is taken from there; the result is the loop's tokens up
    to where it would stop (an eos, max_new) or leave `tokens` (its differing choice is the last one)."""
    seq = list(prompt) + list(tokens)
    with torch.no_grad():
        logits = model(torch.tensor([seq[:len(prompt) + max_new - 1]])).logits[0]
    out = []
    for i in range(max_new):
        token = penalised_argmax(logits[len(prompt) - 1 + i], seq[:len(prompt) + i], penalty)
        out.append(token)
        if token in eos or i >= len(tokens) or token != tokens[i]:
            break
    return out


# The init model runs the card verbatim (bf16). The trained-like model runs it in float32: in bf16 a
# cached step (T=1 matmuls) and an uncached one round differently, so near-tied random logits can
# legitimately flip; in float32 all three decodings must agree token for token.
QUICK_STARTS = (("seed_model_dir", "bfloat16"), ("trained_like_model_dir", "float32"))


def test_seed_quick_start_verbatim_equals_plain_greedy(request, seed_vocab_tokenizer):
    """The quick start, verbatim, on both models in one fresh process (each in a namespace of its own: the
    two runs share nothing but the interpreter): its 160 tokens equal a plain cached greedy loop's and, at
    every step, the uncached forward's greedy choice (uncached_greedy_along)."""
    dirs = {which: request.getfixturevalue(which) for which, _ in QUICK_STARTS}
    code = "".join(
        "exec(%r, {})\n" % (QUICK_START.format(model_id=dirs[which]).replace("torch.bfloat16", f"torch.{dtype}") + (
            "import json\nprint('IDS', json.dumps([model_id, out[0, len(ids):].tolist(), "
            "tokenizer.decode(out[0, len(ids):])]))\n"))
        for which, dtype in QUICK_STARTS)
    results = {}
    for line in run_python(code).splitlines():
        if line.startswith("IDS "):
            model_id, hf_ids, text = json.loads(line[4:])
            results[model_id] = hf_ids, text
    assert sorted(results) == sorted(str(d) for d in dirs.values())

    tok = seed_vocab_tokenizer
    q = "Write a Python function that returns the sum of a list."
    prompt = [32759, 32760] + tok.encode(q) + [32761, 32762]
    eos = {tok.token_id("<|assistant_end|>"), tok.bos_id}
    for which, dtype in QUICK_STARTS:
        hf_ids, text = results[str(dirs[which])]
        assert text == tok.decode(hf_ids), which
        model = models.open(dirs[which]).model(dtype=getattr(torch, dtype))
        uncached = uncached_greedy_along(model, prompt, hf_ids, 160, 1.15, eos)
        cached = plain_greedy(model, prompt, 160, 1.15, eos, cached=True)
        assert hf_ids == uncached == cached, which
        assert len(hf_ids) > 10, which


def test_fresh_process_logits_generate_pipeline_and_save(trained_like_model_dir, tmp_path):
    model = models.open(trained_like_model_dir).model()
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
    resaved = models.open(tmp_path / "resaved").model()
    with torch.no_grad():
        assert (resaved(x).logits - want).abs().max() < 1e-4


def test_directory_contents(seed_model_dir):
    names = {p.name for p in seed_model_dir.iterdir()}
    from poelm.models.directory import shipped_code_files

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


def test_padded_batches_through_transformers_equal_rows_alone(trained_like_model_dir):
    """In a fresh process, with plain transformers: the tokenizer pads (left or right) and returns
    tensors; a right-padded forward without a mask and a left-padded one with it equal the rows alone;
    greedy `generate` on a left-padded batch gives each prompt's own output (finished rows emit the pad
    id); `pipeline(..., batch_size=4)` gives each prompt's single-prompt text; seeded sampling on a
    batch is reproducible."""
    code = textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
        d = "{trained_like_model_dir}"
        tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
        m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
        texts = ["def add(a, b):", "The model", "x = [1, 2, 3] and the stage of the model", "import"]
        res = {{"pad": tok.pad_token_id, "max_len": m.config.max_position_embeddings}}
        alone = [tok.encode(t) for t in texts]
        with torch.no_grad():
            tok.padding_side = "right"
            right = tok(texts, padding=True, return_tensors="pt")
            res["right_ok"] = all(torch.allclose(m(right["input_ids"]).logits[r, :len(ids)],
                                                 m(torch.tensor([ids])).logits[0], atol=1e-4)
                                  for r, ids in enumerate(alone))
            tok.padding_side = "left"
            left = tok(texts, padding=True, return_tensors="pt")
            res["left_ids"] = left["input_ids"].tolist()
            res["left_ok"] = all(torch.allclose(m(**left).logits[r, -len(ids):], m(torch.tensor([ids])).logits[0],
                                                atol=1e-4) for r, ids in enumerate(alone))
            out = m.generate(**left, max_new_tokens=12, do_sample=False)
            res["batch"] = [out[r, left["input_ids"].size(1):].tolist() for r in range(len(texts))]
            res["single"] = [m.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
                             for ids in alone]
            runs = []
            for _ in range(2):
                torch.manual_seed(3)
                runs.append(m.generate(**left, max_new_tokens=8, do_sample=True, top_k=20).tolist())
            res["sampling_reproducible"] = runs[0] == runs[1]
        pipe = pipeline("text-generation", model=m, tokenizer=tok)
        batched = pipe(texts, batch_size=4, max_new_tokens=8, do_sample=False)
        single = [pipe(t, max_new_tokens=8, do_sample=False) for t in texts]
        res["pipeline"] = [b[0]["generated_text"] == s[0]["generated_text"] for b, s in zip(batched, single)]
        res["decoded"] = tok.batch_decode(out[:, -12:])
        print(json.dumps(res))
    """)
    res = json.loads(run_python(code).strip().splitlines()[-1])
    assert res["pad"] is not None and res["max_len"] == 256
    assert res["left_ids"][1][0] == res["pad"]  # really left-padded
    assert res["right_ok"] and res["left_ok"]
    for got, want in zip(res["batch"], res["single"]):
        n = len(want)
        assert got[:n] == want and all(t == res["pad"] for t in got[n:]), (got, want)
    assert res["sampling_reproducible"] and all(res["pipeline"]) and len(res["decoded"]) == 4
