"""The drop-in adapted image encoder (DESIGN.md sections 4.4 and 4.5).

One pass of the ViT; at every layer the pooled row of the attention output
before ``out_proj`` goes through the per-head ``q x q`` factors of the lean
readout (:mod:`residual_fast.lean`) and the model's **own** out-projection into a
width-space accumulator; adapted MLPs add ``r_l @ M_l`` into an output-space
accumulator. The final LayerNorm's ``1/s`` and ``mu/s`` and the model's own
projection are applied once at the end. No (n, U, D) or (n, U, k) tensor exists.

Two modules:

* :class:`ResiDualVisual` wraps a model and a trainable :class:`ResiDual`; it
  re-folds when the lambdas change (any change: in-place, ``.data``,
  ``load_state_dict``) and lets gradients reach them.
* :meth:`ResiDualVisual.merge` returns a :class:`MergedResiDualVisual`: frozen,
  holding only the lean readout in the model's dtype (the PEFT
  ``merge_and_unload`` of this package); exportable and CUDA-graph friendly.

Both watch the wrapped model's parameters (identity and ``_version``, read
without a device sync): a cast or move is followed; after an in-place weight
change the readout weights are fingerprinted again, and a change there raises
(the maps were derived from the old weights) - never stale maps in eager mode.
A ``torch.compile``-d or exported module captures the maps as they are (Dynamo
does not guard on ``_version``): merge and compile again after changing weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .lean import LeanReadout, LeanSink, fold_lean
from .models import fingerprint_mismatch, get_adapter
from .models.hf import adapted_output, features_output, own_output, refuse_unadapted_options
from .ops.spectral_reweight import acc_dtype
from .residual import ResiDual


def _compiling() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


class _AdaptedEncoder(nn.Module):
    """A model with a lean readout fused into its forward (shared by the merged and un-merged forms)."""

    def __init__(self, visual: nn.Module, backend: str = "auto"):
        super().__init__()
        model_adapter = get_adapter(visual)
        if getattr(visual, "output_tokens", False):
            raise ValueError("ResiDualVisual returns pooled features only; build the model with output_tokens=False")
        self.backend = backend
        self.wrapped_visual = visual
        self._walker = model_adapter
        spec = model_adapter.spec()
        self._num_heads = spec.num_heads
        self._fingerprint = spec.fingerprint(readout_only=True)
        self._seen = self._weights_state()
        self._adapter_disabled = False

    # methods of the wrapped model that compute no image features: forwarded as they are
    FORWARDED_METHODS = frozenset({"get_text_features", "lock", "lock_image_tower", "set_grad_checkpointing",
                                   "gradient_checkpointing_enable", "gradient_checkpointing_disable",
                                   "get_input_embeddings", "num_parameters"})

    def __getattr__(self, name: str):
        """Attributes of the wrapped model (``image_size``, ``config``, ...), never its unadapted image paths.

        Data attributes, the methods in :attr:`FORWARDED_METHODS` and submodules off the
        vision path (a CLIP text tower) are forwarded. Other methods and vision submodules
        (``forward_features``, ``vision_model``, ...) would compute the base model's image
        features: they raise, naming ``.wrapped_visual`` for explicit access to the base model.
        """
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        inner = super().__getattr__("wrapped_visual")
        value = getattr(inner, name)
        if not callable(value) or name in self.FORWARDED_METHODS:
            return value
        if isinstance(value, nn.Module) and not any(id(p) in self._vision_params() for p in value.parameters()):
            return value
        raise AttributeError(
            f"{type(self).__name__} does not forward {name!r} of the wrapped {type(inner).__name__}: it would "
            f"compute the base model's (unadapted) image features. Call the adapted module itself (or "
            f"get_image_features), or .wrapped_visual.{name} for the base model explicitly")

    def _vision_params(self) -> set[int]:
        parts = getattr(self._walker, "vision_parts", None)  # set where the model also has a text tower
        mods = [m for _, m in parts if m is not None] if parts else [self.wrapped_visual]
        return {id(p) for m in mods for p in m.parameters()}

    # -- watching the wrapped model -------------------------------------------------------------
    def _weights_state(self) -> tuple:
        return tuple((id(p), p._version, p.dtype, p.device) for p in self.wrapped_visual.parameters())

    def _check_model(self) -> None:
        """Follow casts and moves of the wrapped model; refuse changed readout weights. Host-only, no sync."""
        if _compiling():
            return
        state = self._weights_state()
        if state == self._seen:
            return
        walker = get_adapter(self.wrapped_visual)  # re-read the modules: a cast swaps parameter data
        if len(state) != len(self._seen) or any(a[:2] != b[:2] for a, b in zip(self._seen, state, strict=True)):
            # written in place (load_state_dict, an optimizer step, p.copy_): do the maps still hold?
            why = fingerprint_mismatch(self._fingerprint, walker.spec().fingerprint(readout_only=True))
            if why:
                raise RuntimeError(
                    f"the wrapped model's readout weights changed after wrapping ({why}); the adapter's maps were "
                    "derived from the old weights. Fit bases on the changed model and build a new adapter"
                )
            self._weights_changed()
        else:  # a cast or a move: later comparisons are between equal dtypes again (exact)
            self._fingerprint = walker.spec().fingerprint(readout_only=True)
        self._walker, self._seen = walker, state

    def _weights_changed(self) -> None:
        """Weights other than the readout's changed: the lean maps still hold."""

    def _apply(self, fn, *args, **kwargs):
        if hasattr(self, "_seen"):
            self._check_model()  # an in-place change made before this cast must not be absorbed by it
        out = super()._apply(fn, *args, **kwargs)
        self._walker = get_adapter(self.wrapped_visual)
        self._seen = self._weights_state()
        self._fingerprint = self._walker.spec().fingerprint(readout_only=True)
        return out

    # -- the forward ------------------------------------------------------------------------------
    def _lean(self, dtype: torch.dtype, acc_dtype: torch.dtype, device: torch.device) -> LeanReadout:
        raise NotImplementedError

    def forward(self, images: torch.Tensor | None = None, *, pixel_values: torch.Tensor | None = None, **kwargs):
        """Adapted features of ``images``.

        A positional call returns the feature tensor ``(n, D)`` (what the model's decomposed
        output is, for every family). A keyword call ``(pixel_values=..., **kwargs)`` behaves
        like the wrapped HF model: its own output class with the adapted features in the
        decomposed field (``pooler_output``, ``image_embeds``, ``logits``; a ``CLIPModel`` needs
        ``input_ids`` and scores the adapted image embeddings), see
        :func:`residual_fast.models.hf.adapted_output`.
        """
        if pixel_values is None:
            if images is None:
                raise TypeError("no images: call with the image tensor (positionally) or pixel_values=")
            if kwargs:
                raise TypeError(f"unexpected arguments {sorted(kwargs)}: HF-style calls pass pixel_values=")
            return self._features(images)
        if images is not None:
            raise TypeError("give the images positionally or as pixel_values=, not both")
        if not self._walker.family.startswith("hf_"):
            if kwargs:
                raise TypeError(f"unexpected arguments {sorted(kwargs)} for a {self._walker.family} model")
            return self._features(pixel_values)
        return adapted_output(self.wrapped_visual, self._features, pixel_values, kwargs)

    def get_image_features(self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool = False,
                           return_dict: bool | None = None, **kwargs):
        """The adapted ``get_image_features`` of a wrapped HF ``CLIPModel`` (same return type as the model's)."""
        if not hasattr(self.wrapped_visual, "get_image_features"):
            raise TypeError(f"the wrapped {type(self.wrapped_visual).__name__} has no get_image_features; call the "
                            "adapted module itself")
        if pixel_values is None:
            raise TypeError("get_image_features needs pixel_values")
        kwargs["interpolate_pos_encoding"] = interpolate_pos_encoding
        refuse_unadapted_options(kwargs)
        if kwargs:
            raise TypeError(f"get_image_features of the adapted model does not take {sorted(kwargs)}")
        return features_output(self._features(pixel_values), return_dict)

    # -- the PEFT-style surface ----------------------------------------------------------------------
    def unload(self) -> nn.Module:
        """The base model, untouched (wrapping never changes it): like PEFT's ``unload``."""
        return self.wrapped_visual

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within this context, calls return the base model's own output (like PEFT's ``disable_adapter``)."""
        was = self._adapter_disabled
        self._adapter_disabled = True
        try:
            yield
        finally:
            self._adapter_disabled = was

    def _base_output(self, images: torch.Tensor) -> torch.Tensor:
        """The base model's own forward for the output the adapter replaces."""
        if self._walker.family.startswith("hf_"):
            return own_output(self.wrapped_visual, images)
        return self.wrapped_visual(images)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        if self._adapter_disabled:
            return self._base_output(images)
        self._check_model()
        self._walker.check_images(images)
        dtype = next(self.wrapped_visual.parameters()).dtype
        acc = acc_dtype(dtype)
        lean = self._lean(dtype, acc, images.device)
        sink = LeanSink(lean, self._walker.readout(), images.shape[0], self._num_heads, acc, images.device,
                        self.backend)
        z, out = self._walker.walk(images, sink)
        return sink.finish(z, out)


class ResiDualVisual(_AdaptedEncoder):
    """``visual`` with a trainable :class:`ResiDual` adapter fused into its forward.

    ``model.visual = ResiDualVisual(model.visual, adapter)`` makes
    ``model.encode_image`` return adapted features. Attributes not defined here
    (``image_size``, ``output_dim``, ...) are read from the wrapped encoder.
    ``backend`` selects the MLP readout kernels (see :mod:`residual_fast.ops.backends`).

    The lean readout is re-folded from the lambdas whenever they change (checked by
    value, so ``p.data`` edits and ``load_state_dict`` count) and on every call that
    needs gradients or runs under ``torch.compile`` / ``torch.export``. Use
    :meth:`merge` for deployment: it drops the training objects and the check.
    """

    def __init__(self, visual: nn.Module, adapter: ResiDual, backend: str = "auto"):
        if not isinstance(adapter, ResiDual):
            raise TypeError(f"adapter must be a residual_fast.ResiDual, got {type(adapter).__name__}")
        why = fingerprint_mismatch(adapter.fingerprint, get_adapter(visual).spec().fingerprint())
        if why:
            raise ValueError(f"the adapter was fitted on another model: {why}")
        super().__init__(visual, backend)
        p = next(visual.parameters())
        self.adapter = adapter.to(p.device)
        self._cache: tuple | None = None  # (key, lambdas snapshot, lean)

    def _weights_changed(self) -> None:
        self._cache = None

    def _fold(self) -> LeanReadout:
        return fold_lean(self.adapter, self._walker.readout())

    def _lean(self, dtype, acc_dtype, device) -> LeanReadout:
        a = self.adapter
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in a.parameters())
        if needs_grad or _compiling():
            return self._fold().cast(dtype, acc_dtype, device)
        key = (dtype, device, a.padding, a.ablation, a.add_means, tuple(b._version for b in a.buffers()))
        lams = [p.detach() for p in a.parameters()]
        if self._cache is not None:
            ckey, snap, lean = self._cache
            # by value: a .data edit leaves _version unchanged (one small device comparison)
            same = len(snap) == len(lams) and all(torch.equal(x, y) for x, y in zip(lams, snap, strict=True))
            if ckey == key and same:
                return lean
        with torch.no_grad():
            lean = self._fold().cast(dtype, acc_dtype, device)
        self._cache = (key, [x.clone() for x in lams], lean)
        return lean

    def _apply(self, fn, *args, **kwargs):
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike, *, include_bases: bool = False,
                        base_model_name_or_path: str | None = None) -> Path:
        """Write the adapter (float32 safetensors + JSON) to ``directory``: :func:`residual_fast.save_pretrained`."""
        from .pretrained import save_pretrained

        return save_pretrained(self, directory, include_bases=include_bases,
                               base_model_name_or_path=base_model_name_or_path)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike, *, backend: str = "auto"
                        ) -> ResiDualVisual:
        """``model`` with the adapter saved in ``directory``; see :func:`residual_fast.from_pretrained`."""
        from .pretrained import from_pretrained

        return from_pretrained(model, directory, backend=backend)

    def adapter_state_dict(self, include_bases: bool = False) -> dict[str, torch.Tensor]:
        """What :meth:`save_pretrained` writes, under the file's keys (PEFT's ``get_peft_model_state_dict``).

        ``state_dict()`` stays the ``nn.Module`` one (the wrapped model's weights and the adapter's
        buffers, for ``load_state_dict`` and checkpoints of the whole module).
        """
        from .pretrained import adapter_tensors

        return adapter_tensors(self, include_bases)

    @torch.no_grad()
    def merge(self) -> MergedResiDualVisual:
        """A frozen inference module with the same forward, holding only the lean readout.

        Like PEFT's ``merge_and_unload``: the returned module wraps the same model
        (no weight copy) and keeps none of the training objects (bases, lambdas,
        float64 maps); its extra tensors are in the model's dtype.
        """
        self._check_model()
        dtype = next(self.wrapped_visual.parameters()).dtype
        lean = self._fold().cast(dtype, acc_dtype(dtype))
        info = {"variant": self.adapter.variant, "fingerprint": self.adapter.fingerprint}
        return MergedResiDualVisual(self.wrapped_visual, lean, info, backend=self.backend)


class MergedResiDualVisual(_AdaptedEncoder):
    """A merged ResiDual encoder (from :meth:`ResiDualVisual.merge`): model + lean readout buffers.

    Inference only: the adapted forward costs the plain forward plus ``H x hd x q``
    multiply-adds per head layer per image. If the wrapped model's readout weights
    change after merging, the next forward raises instead of serving old maps;
    casts and moves of the model or of this module are followed.
    """

    def __init__(self, visual: nn.Module, lean: LeanReadout, info: dict, backend: str = "auto"):
        super().__init__(visual, backend)
        for name in LeanReadout.TENSORS:
            t = getattr(lean, name)
            if t is not None:  # absent, not None: torch.export miscounts None buffers
                self.register_buffer(name, t.detach().clone())
        self._add_output = bool(lean.add_output)
        self._head_weight = float(lean.head_weight)
        self.info = dict(info)
        self.eval()

    def _apply(self, fn, *args, **kwargs):
        keep = {n: self._buffers[n] for n in ("v1", "v2", "c")}
        out = super()._apply(fn, *args, **kwargs)
        for n, old in keep.items():  # the epilogue stays in the accumulation dtype under .half() / .bfloat16()
            new = self._buffers[n]
            if new.dtype in (torch.float16, torch.bfloat16) and old.dtype in (torch.float32, torch.float64):
                self._buffers[n] = old.to(device=new.device, dtype=torch.float32)
        return out

    def _lean(self, dtype, acc_dtype, device) -> LeanReadout:
        b = self._buffers
        return LeanReadout(b.get("head_A"), b.get("head_scale"), b.get("mlp_M"), b.get("emb_M"), b["v1"], b["v2"],
                           b["c"], self._add_output, self._head_weight)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike, *, backend: str = "auto"
                        ) -> MergedResiDualVisual:
        """``model`` with the adapter saved in ``directory``, merged (inference only)."""
        from .pretrained import from_pretrained

        return from_pretrained(model, directory, merged=True, backend=backend)

    def save_pretrained(self, *args, **kwargs):
        raise TypeError("a merged module keeps no lambdas or bases: call save_pretrained on the ResiDualVisual it "
                        "was merged from")

    def extra_repr(self) -> str:
        shapes = {n: tuple(t.shape) for n, t in self._buffers.items() if n in LeanReadout.TENSORS}
        return f"variant={self.info.get('variant')!r}, lean={shapes}"
