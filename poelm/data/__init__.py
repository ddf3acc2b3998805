"""Training data: text corpora for pretraining (`text`), conversations for stage SFT.

Import from the submodules (`from poelm.data.text import TextCorpus, TokenLoader`): this file
re-exports nothing, so importing one kind of data never imports another's dependencies.
"""
