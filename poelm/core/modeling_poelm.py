"""Hugging Face model class for poelm (remote code): `PoEGPT` itself, plus only what transformers needs
(a config class, `GenerationMixin`, shifted-label loss, the `PoECache`), loaded and saved through the
cascade loader and the files' own tensor names (docs/model.md §9.7, docs/transformers.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cascade import CONFIG, DTYPES, WEIGHTS
from .config import STAGE_KEYS
from .configuration_poelm import PoelmConfig
from .files import GENERATION_CONFIG, read_json, verify_file, write_manifest
from .model import PoEGPT, to_disk
from .tensorfile import fingerprint_file


class PoECache(DynamicCache):
    """A DynamicCache that also carries the last token's normed embedding (for the smear) and which
    cached positions are real tokens (a padded batch); both follow the rows when generate() reorders,
    repeats or selects them."""

    ROW_STATE = ("prev_embedding", "attention_mask")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prev_embedding: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None

    def _rows(self, pick) -> None:
        for name in self.ROW_STATE:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, pick(value))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rows(lambda t: t[indices])

    def crop(self, max_length: int) -> None:
        raise RuntimeError(
            "PoECache cannot be cropped: the smear needs the embedding of the new last token; "
            "use poelm's engine for speculative decoding")


def bos_as_document_start(attention_mask: torch.Tensor, input_ids: torch.Tensor, bos_id) -> torch.Tensor:
    """The mask with a masked BOS right before a row's first real token counted as real: generate()
    masks every pad id, and the seed card's quick start pads with the BOS its prompt starts with
    (docs/transformers.md). That BOS is the document's start, not padding."""
    mask = attention_mask.bool().clone()
    if bos_id is None or not bool(mask.any()):
        return mask
    first = mask.int().argmax(dim=1)  # the first real position of each row
    rows = torch.arange(mask.size(0), device=mask.device)[(first > 0) & mask.any(dim=1)]
    before = first[rows] - 1
    start = input_ids[rows, before] == bos_id
    mask[rows[start], before[start]] = True
    return mask


class PoelmForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PoelmConfig
    base_model_prefix = "poe"
    _no_split_modules = ["Block"]
    _tied_weights_keys: dict = {}
    _supports_cache_class = True

    def __init__(self, config: PoelmConfig):
        super().__init__(config)
        self.poe = PoEGPT(config.to_poe_config())
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, verify: bool = True, **kwargs):
        """Every directory, base or stage, loads through the cascade loader (cascade.py): the same code
        poelm loads with. Each file is checked against the directory's digests before it is used
        (`verify=False` skips that); a stage's chain is resolved, fingerprint-checked and folded. The
        assembled weights are put into this class, so `generate()`, pipelines and the seed card's quick
        start work alike. Honoured: `dtype`/`torch_dtype` (None or "auto": the stored dtype, which the
        weights keep: on the CPU they are the mapped files' tensors, nothing copied) and `device_map`
        ("auto", a device, or None).
        """
        from pathlib import Path

        from transformers import GenerationConfig

        from .cascade import load_chain

        path = Path(str(pretrained_model_name_or_path))
        if not path.is_dir():
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(pretrained_model_name_or_path)))
        read_json(path / CONFIG, verify)  # checked before transformers reads it
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        device_map = kwargs.get("device_map")
        if isinstance(dtype, str) and dtype != "auto":
            dtype = DTYPES.get(dtype) or getattr(torch, dtype)
        poe = load_chain(path, dtype=None if dtype in (None, "auto") else dtype, verify=verify)
        config = cls.config_class.from_pretrained(str(path))
        with torch.device("meta"):
            model = cls(config)
        model.poe = poe
        if device_map == "auto":
            model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        elif isinstance(device_map, (str, torch.device)):
            model = model.to(device_map)
        if (path / GENERATION_CONFIG).is_file():
            if verify:
                verify_file(path / GENERATION_CONFIG)
            model.generation_config = GenerationConfig.from_pretrained(str(path))
        return model.eval()

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        """Save under the network's own (nanochat) tensor names, the format every poelm directory uses,
        then record the digests (and the content fingerprint) of what was written. An assembled stage
        chain is written as a standalone model: its stage fields are not carried into config.json."""
        from pathlib import Path

        if state_dict is None:
            state_dict = to_disk(self.poe.state_dict())  # the names the files use
        stage_fields = {k: getattr(self.config, k) for k in STAGE_KEYS if hasattr(self.config, k)}
        for k in stage_fields:
            delattr(self.config, k)
        try:
            result = super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        finally:
            for k, v in stage_fields.items():
                setattr(self.config, k, v)
        weights = Path(save_directory) / WEIGHTS
        fingerprint = fingerprint_file(weights) if weights.is_file() else None
        write_manifest(save_directory, fingerprint=fingerprint)
        return result

    def _init_weights(self, module) -> None:
        if isinstance(module, PoEGPT) and not module.lm_head.weight.is_meta:
            module.init_weights()

    def get_input_embeddings(self):
        return self.poe.transformer.wte

    def get_output_embeddings(self):
        return self.poe.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        past_key_values=None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        exit_stage: int | None = None,
        poe_output: str | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if input_ids is None:
            raise ValueError("poelm models take input_ids (inputs_embeds is not supported)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, PoECache):
            if cache.get_seq_length() > 0:
                raise ValueError("poelm needs its own PoECache (it keeps the smear's previous embedding); "
                                 f"got a filled {type(cache).__name__}")
            cache = PoECache(config=self.config)
        if cache is None and use_cache and labels is None:
            cache = PoECache(config=self.config)
        cache_len = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and cache_len == 0:  # the prefill: the cache keeps this mask
            attention_mask = bos_as_document_start(attention_mask[:, -input_ids.size(1):], input_ids,
                                                   self.config.bos_token_id)

        out = self.poe(input_ids, cache=cache, exit_stage=exit_stage, output=poe_output, attention_mask=attention_mask)
        logits = out.logits
        loss = None
        if labels is not None:  # HF convention: labels are the inputs, shifted here; -100 is ignored
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
