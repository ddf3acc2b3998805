"""Training data (docs/data.md): text corpora for pretraining, conversations for stage SFT.

- records.py        records from every input format: JSONL, JSON arrays, Parquet, `datasets` folders, gz/zst
- documents.py      documents read from input paths (the one plain-text reader)
- corpus.py         documents encoded, the held-out split (`VAL_FRACTION`), the in-memory `TextCorpus`
- shards.py         tokenized data folders: `poelm data tokenize` (resumable) and the memory-mapped reader
- loader.py         the row loaders: rows of a token stream, one order shared by every rank
- conversations.py  conversation record shapes, checked into messages
- sources.py        SFT data SPECs read into sources, with a load report
- mixture.py        the SFT mixture: held-out split, epochs, case augmentation
- packing.py        rendered conversations packed into rows, and their loader
- embedded.py       the standard library as the embedded default data
- tokenizer_train.py  BPE training on documents

Import from the submodules (`from poelm.data.corpus import TextCorpus`): this file re-exports nothing,
so importing one kind of data never imports another's dependencies.
"""
