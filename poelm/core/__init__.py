"""What ships: exactly the files copied, as they are, into every model directory poelm writes.

The model (`model.py` and its pieces `layers.py`, `head.py`, `kvcache.py`: the one definition training,
every decoder and transformers run), its config (`config.py`), the cascade loader (`cascade.py`), files
written whole and read verified (`files.py`), the runtime tokenizer (`tokenizer.py`), the error type
(`errors.py`) and the transformers wrappers (`configuration_poelm.py`, `modeling_poelm.py`,
`tokenization_poelm.py`). They import each other relatively (the same import works here and inside a
model directory) and nothing else but the standard library, torch, transformers, huggingface_hub,
safetensors, tiktoken and xxhash (tests/test_shipped.py checks it). This `__init__.py` is the only file
here that does not ship. Design notes: docs/model.md.
"""
