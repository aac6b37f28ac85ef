"""Loading open_clip models by name (random weights offline, pretrained where reachable)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def load_open_clip(name: str, pretrained: str | None = None, *, image_size: int | None = None,
                   device: str | torch.device = "cpu", seed: int = 0) -> tuple[nn.Module, object, object]:
    """``(model, preprocess, tokenizer)`` for an open_clip model name such as ``"ViT-B-32"``.

    ``pretrained=None`` builds random weights (works offline); a tag such as
    ``"laion2b_s34b_b79k"`` downloads weights and fails with a clear error offline.
    ``image_size`` overrides the input resolution (random weights only). Random
    weights are drawn from ``seed`` (without touching the global RNG), so separate
    commands see the same model.
    """
    import open_clip

    if name.startswith("open_clip:"):
        name = name.split(":", 1)[1]
    if "/" in name and pretrained is None:
        name, pretrained = name.split("/", 1)
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    kwargs = {}
    if image_size is not None:
        if pretrained:
            raise ValueError("image_size can only be changed for random weights")
        kwargs["force_image_size"] = image_size
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device,
                                                                         **kwargs)
    except Exception as e:  # noqa: BLE001 - report any hub / file failure with the name that caused it
        raise RuntimeError(f"could not load open_clip {name!r} with pretrained={pretrained!r}: {e}") from e
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


PREFIXES = ("open_clip:", "hf:", "timm:")


@dataclass
class LoadedModel:
    """What :func:`load` returns.

    ``visual`` is the module to pass to ``decompose`` / ``fit_bases`` /
    ``ResiDualVisual``; ``encode_text(list_of_str) -> (n, D)`` exists for models
    with a text tower (open_clip CLIP, HF CLIP - also with random weights, through
    :class:`OfflineCLIPTokenizer` - and BLIP ITM with its tokenizer) and is None
    otherwise, with the reason in ``no_text_reason``.
    """

    name: str
    model: nn.Module
    visual: nn.Module
    preprocess: Callable | None
    tokenizer: Callable | None
    encode_text: Callable[[list[str]], torch.Tensor] | None
    no_text_reason: str | None = None  # why ``encode_text`` is None, for the error of whoever needs it


class OfflineCLIPTokenizer:
    """CLIP's BPE tokenizer for an HF CLIP text model, built offline (open_clip's bundled vocabulary is CLIP's).

    ``tokenizer(texts) -> {"input_ids", "attention_mask"}`` (long tensors, one row per text):
    ``<start> tokens <end>``, truncated to the model's ``max_position_embeddings`` with the end
    token kept last, padded with the config's ``pad_token_id`` (masked out). HF CLIP pools at the
    end token: at the first ``eos_token_id``, or (legacy configs with ``eos_token_id == 2``) at
    the largest id, which CLIP's end token (49407) is; other conventions are refused.
    """

    def __init__(self, text_config):
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = int(text_config.max_position_embeddings)
        self._bpe = SimpleTokenizer(context_length=self.context_length)
        self.sot_id, self.eot_id = self._bpe.sot_token_id, self._bpe.eot_token_id
        if text_config.vocab_size < self._bpe.vocab_size:
            raise ValueError(f"the text model's vocabulary ({text_config.vocab_size} ids) is smaller than CLIP's BPE "
                             f"({self._bpe.vocab_size}): not a CLIP tokenizer's model; pass its own tokenizer")
        eos = text_config.eos_token_id
        if eos not in (2, self.eot_id):
            raise ValueError(f"the text model pools at eos_token_id={eos}, but CLIP's BPE ends texts with "
                             f"{self.eot_id}; pass the model's own tokenizer")
        pad = text_config.pad_token_id
        self.pad_id = pad if isinstance(pad, int) and 0 <= pad < text_config.vocab_size else 0

    def __call__(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        ids = self._bpe([texts] if isinstance(texts, str) else list(texts))
        # the first end token closes each text (a truncated one keeps it last); after it is padding
        end = (ids == self.eot_id).int().argmax(dim=1, keepdim=True)
        mask = torch.arange(ids.shape[1])[None, :] <= end
        return {"input_ids": ids.masked_fill(~mask, self.pad_id), "attention_mask": mask.long()}


def tokenize_for(tokenizer: Callable, texts: list[str]) -> dict[str, torch.Tensor]:
    """``texts`` as the keyword inputs of an HF text model, from an HF tokenizer or a callable returning ids."""
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:
        PreTrainedTokenizerBase = ()  # noqa: N806
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return dict(tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))
    out = tokenizer(texts)
    return {"input_ids": out} if isinstance(out, torch.Tensor) else dict(out)


def hf_clip_text_encoder(model: nn.Module, tokenizer: Callable | None = None) -> Callable[[list[str]], torch.Tensor]:
    """``encode_text(list_of_str) -> (n, D)`` for an HF ``CLIPModel``: its ``get_text_features`` on tokenized texts.

    Without ``tokenizer``, an :class:`OfflineCLIPTokenizer` for the model's text config.
    """
    tok = tokenizer if tokenizer is not None else OfflineCLIPTokenizer(model.config.text_config)

    def encode_text(texts):
        device = next(model.parameters()).device
        out = model.get_text_features(**{k: v.to(device) for k, v in tokenize_for(tok, list(texts)).items()})
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    return encode_text


def load(name: str, *, pretrained: bool = True, config=None, device: str | torch.device = "cpu", seed: int = 0,
         **kwargs) -> LoadedModel:
    """Load a model by name.

    ``open_clip:ARCH[/TAG]`` (``pretrained=False`` or no tag: random weights),
    ``hf:REPO`` (HF transformers CLIP, BLIP image-text retrieval, DINOv2, ViT; with
    ``pretrained=False`` pass a transformers ``config=`` to build random weights
    offline), ``timm:NAME`` (any timm ``VisionTransformer``; ``pretrained=False``
    builds random weights offline; ``kwargs`` go to ``timm.create_model``).
    The architecture is checked against the adapters: an unsupported one raises
    :class:`residual_fast.UnsupportedModelError`. Random weights of every family are
    drawn from ``seed`` (without touching the global RNG), so separate commands see
    the same model.
    """
    from .models import get_adapter

    prefix, _, rest = name.partition(":")
    if not rest or prefix + ":" not in PREFIXES:
        raise ValueError(f"model names start with one of {PREFIXES}, e.g. 'open_clip:ViT-B-16/laion2b_s34b_b88k', "
                         f"'hf:openai/clip-vit-large-patch14', 'timm:vit_large_patch14_dinov2.lvd142m'; got {name!r}")
    if prefix == "open_clip":
        arch, _, tag = rest.partition("/")
        model, preprocess, tokenizer = load_open_clip(arch, (tag or None) if pretrained else None, device=device,
                                                      seed=seed, **kwargs)

        def encode_text(texts):
            return model.encode_text(tokenizer(texts).to(next(model.parameters()).device))

        loaded = LoadedModel(name, model, model.visual, preprocess, tokenizer, encode_text)
    elif prefix == "timm":
        import timm

        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = timm.create_model(rest, pretrained=pretrained, **kwargs).to(device).eval()
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"could not create timm model {rest!r} (pretrained={pretrained}): {e}") from e
        cfg = timm.data.resolve_data_config({}, model=model)
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if size is not None:  # an img_size= override: preprocess to the size the model takes
            cfg["input_size"] = (cfg["input_size"][0], *tuple(size))
        loaded = LoadedModel(name, model, model, timm.data.create_transform(**cfg), None, None,
                             "timm image models have no text tower")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loaded = _load_hf(name, rest, pretrained, config, device)
    get_adapter(loaded.visual)  # refuses unsupported architectures with the reason
    return loaded


def _default_hf_preprocess(config):
    """The family's own image processor with its default statistics, at the model's image size (for random
    weights, or a saved model without processor files)."""
    import transformers as tf
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    size = getattr(getattr(config, "vision_config", config), "image_size", 224)
    square = {"height": size, "width": size}
    makers = {
        "clip": lambda: tf.CLIPImageProcessor(size={"shortest_edge": size}, crop_size=square),
        "blip": lambda: tf.BlipImageProcessor(size=square),
        "vit": lambda: tf.ViTImageProcessor(size=square),
        "dinov2": lambda: tf.BitImageProcessor(size={"shortest_edge": size}, crop_size=square,
                                               image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD),
    }
    make = makers.get("dinov2" if config.model_type.startswith("dinov2") else config.model_type)
    if make is None:
        return None
    processor = make()

    def preprocess(img, _p=processor):
        return _p(images=img.convert("RGB") if hasattr(img, "convert") else img,
                  return_tensors="pt")["pixel_values"][0]

    return preprocess


def _load_hf(name: str, repo: str, pretrained: bool, config, device) -> LoadedModel:
    import transformers as tf

    if config is None:
        try:
            config = tf.AutoConfig.from_pretrained(repo)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"could not read the config of {repo!r} (offline? pass config= to build random "
                               f"weights): {e}") from e
    classes = {"clip": tf.CLIPModel, "blip": tf.BlipForImageTextRetrieval, "dinov2": tf.Dinov2Model,
               "dinov2_with_registers": tf.Dinov2WithRegistersModel, "vit": tf.ViTModel}
    cls = classes.get(config.model_type)
    if config.model_type == "vit" and any("Classification" in a for a in (config.architectures or [])):
        cls = tf.ViTForImageClassification
    if cls is None:
        raise ValueError(f"HF model type {config.model_type!r} is not supported; supported: {sorted(classes)}")
    try:
        model = cls.from_pretrained(repo) if pretrained else cls(config)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"could not load {repo!r} as {cls.__name__}: {e}") from e
    model = model.to(device).eval()
    preprocess = tokenizer = encode_text = None
    no_text = None if config.model_type in ("clip", "blip") else f"{cls.__name__} has no text tower"
    if pretrained:
        try:
            processor = tf.AutoImageProcessor.from_pretrained(repo)

            def preprocess(img, _p=processor):
                return _p(images=img, return_tensors="pt")["pixel_values"][0]
        except Exception:  # noqa: BLE001 - no processor files: the family's defaults below
            preprocess = None
    if preprocess is None:
        preprocess = _default_hf_preprocess(config)
        if config.model_type in ("clip", "blip"):
            try:
                tokenizer = tf.AutoTokenizer.from_pretrained(repo)
            except Exception as e:  # noqa: BLE001 - CLIP's can be built offline below; BLIP's cannot
                no_text = f"could not load the tokenizer of {repo!r}: {e}"
    if config.model_type == "clip":
        if tokenizer is None:  # random weights or no tokenizer files: CLIP's BPE ships with open_clip
            try:
                tokenizer = OfflineCLIPTokenizer(config.text_config)
            except (ImportError, ValueError) as e:
                no_text = f"no tokenizer for {repo!r}: {e}"
        if tokenizer is not None:
            encode_text, no_text = hf_clip_text_encoder(model, tokenizer), None
    elif config.model_type == "blip" and tokenizer is None:
        no_text = no_text or (f"BLIP's (BERT) tokenizer cannot be built offline; load {repo!r} with pretrained=True "
                              "where its tokenizer files are reachable")
    elif tokenizer is not None and config.model_type == "blip":
        def encode_text(texts, _m=model, _t=tokenizer):
            batch = _t(texts, padding=True, return_tensors="pt").to(next(_m.parameters()).device)
            hidden = _m.text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return _m.text_proj(hidden.last_hidden_state[:, 0])
    return LoadedModel(name, model, model, preprocess, tokenizer, encode_text, no_text)
