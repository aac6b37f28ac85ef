"""``residual-fast``: the command line.

    residual-fast demo                       # offline: small open_clip ViT, sklearn digits, prototype head
    residual-fast calibrate --dataset digits --out bases/
    residual-fast cache --dataset digits --split train --out cache/train
    residual-fast fit --train-cache cache/train --val-cache cache/val --method fine --out fit/
    residual-fast eval --fit fit/ --cache cache/test
    residual-fast bench --model ViT-B-16 --batch 8
    residual-fast reproduce --models ViT-B-16/laion2b_s34b_b88k --datasets cifar10 mnist --out results/
    residual-fast analyze --model ViT-B-32 --datasets digits --out analysis/

Models are open_clip names (``ViT-B-32``), optionally ``name/pretrained-tag``;
without a tag the weights are random (works offline). Run any command with
``--help`` for its options.

Scale out with ``torchrun --nproc_per_node N -m residual_fast <command> ...``
(calibrate, cache, fit, eval, analyze, reproduce): each rank reads a disjoint
block of the data; rank 0 prints and writes the outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ._version import __version__
from .serialization import CorruptFileError


class UserError(Exception):
    """A mistake in the command's arguments or inputs: one line on stderr, exit code 2."""


def int_at_least(lo: int):
    """An argparse type: an integer ``>= lo``, with a clear message otherwise."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
        return v

    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def _model_args(p: argparse.ArgumentParser, image_size_default: int | None = None) -> None:
    p.add_argument("--model", default="ViT-B-32",
                   help="open_clip ARCH[/pretrained-tag], or hf:REPO / timm:NAME (as rf.load)")
    p.add_argument("--pretrained", nargs="?", const=PRETRAINED, default=None, metavar="TAG",
                   help="load pretrained weights (needs network or a local hf:/timm: path): the open_clip tag "
                        "(or --model ARCH/TAG); for hf:/timm: names the flag alone; default random weights")
    p.add_argument("--image-size", type=positive_int, default=image_size_default,
                   help="input resolution override (random weights only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help="dataset name (digits, cifar10, ...) or an image folder")
    p.add_argument("--split", default="train", choices=["train", "val", "test"],
                   help="val is carved from train; datasets without a test split are split 60/10/30")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits")
    p.add_argument("--root", default=None, help="where datasets are (downloaded)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--workers", type=non_negative_int, default=0)
    p.add_argument("--max-images", type=positive_int, default=None)


class _Loaded:
    """The CLI's view of a model of any family: ``.visual`` and, with a text tower, ``.encode_text``."""

    def __init__(self, model, visual, encode_text=None):
        self.model, self.visual = model, visual
        if encode_text is not None:
            self.encode_text = encode_text
            scale = getattr(model, "logit_scale", None)
            if scale is not None:
                self.logit_scale = scale


PRETRAINED = "pretrained"  # --pretrained given without a tag


def _model_name(args) -> tuple[str, str | None]:
    """``(model name, pretrained tag or None)`` with one meaning of ``--pretrained`` for every family."""
    name, tag = args.model, args.pretrained
    if not name.startswith(("hf:", "timm:", "open_clip:")):
        if "/" in name and tag is None:
            name, tag = name.split("/", 1)
        if tag == PRETRAINED:
            raise UserError("open_clip models need the pretrained tag: --pretrained TAG or --model ARCH/TAG "
                            "(e.g. ViT-B-32/openai)")
    return name, tag


def _load(args):
    """``(model, preprocess, tokenizer)`` for ``open_clip`` names (``ARCH[/TAG]``) and ``hf:`` / ``timm:`` names."""
    from .loading import load, load_open_clip

    name, pretrained = _model_name(args)
    if name.startswith(("hf:", "timm:")):
        kwargs = {}
        if name.startswith("timm:") and args.image_size is not None:
            if pretrained:
                raise UserError("--image-size can only be changed for random weights")
            kwargs["img_size"] = args.image_size
        loaded = load(name, pretrained=bool(pretrained), device=args.device, **kwargs)
        # rf.load's encode_text takes strings: the tokenizer is then the identity
        return (_Loaded(loaded.model, loaded.visual, loaded.encode_text), loaded.preprocess,
                (lambda texts: texts) if loaded.encode_text is not None else None)
    name = name.removeprefix("open_clip:")
    model, preprocess, tokenizer = load_open_clip(name, pretrained, image_size=args.image_size, device=args.device)
    return model, preprocess, tokenizer


def _loader(args, preprocess):
    """The split's loader; under torchrun, over this rank's contiguous block of it."""
    from .data.splits import stratified_subset
    from .distributed import shard_loader
    from .pipeline import load_splits

    data, idx = load_splits(args.dataset, root=args.root, transform=preprocess, seed=args.seed)[args.split]
    if args.max_images is not None:  # every class keeps its share (the split is sorted by class)
        idx = stratified_subset(data.labels, idx, args.max_images, seed=args.seed)
    return data, shard_loader(data.dataset, idx, args.batch_size, args.process_group, args.workers)


def _main_rank(args) -> bool:
    """Only rank 0 prints results and writes the outputs every rank computed alike."""
    from .distributed import is_main

    return is_main(args.process_group)


def _source(args) -> dict:
    """What a cache's rows depend on besides the model's weights (the preprocessing follows from the model
    and the image size): refused on resume or reuse if any of it differs."""
    dataset = args.dataset
    if Path(dataset).is_dir():
        dataset = str(Path(dataset).resolve())
    return {"dataset": dataset, "split": args.split, "seed": args.seed, "image_size": args.image_size,
            "batch_size": args.batch_size, "max_images": args.max_images, "model": args.model,
            "pretrained": args.pretrained}


def _prepare_out(path: str) -> None:
    """Create the output folder first: a bad ``--out`` fails before any model is built."""
    Path(path).mkdir(parents=True, exist_ok=True)


def cmd_demo(args) -> None:
    _prepare_out(args.out)
    from .pipeline import demo

    result = demo(args.out, model=args.model, pretrained=args.pretrained, image_size=args.image_size,
                  variant=args.variant, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size,
                  progress=not args.no_progress)
    print((Path(result["report"]) / "report.md").read_text())
    print(f"report folder: {result['report']} (report.md, results.json/csv, lambdas.png, spectra.png, adapter/)")


def cmd_calibrate(args) -> None:
    _prepare_out(args.out)
    from .spectral import fit_bases

    model, preprocess, _ = _load(args)
    _, loader = _loader(args, preprocess)
    bases = fit_bases(model.visual, loader, units=tuple(args.units), progress=not args.no_progress,
                      process_group=args.process_group)
    if _main_rank(args):
        bases.save(args.out)
        print(json.dumps({"out": args.out, **bases.summary()}, indent=1))


def cmd_cache(args) -> None:
    _prepare_out(args.out)
    from .cache import MANIFEST, ActivationCache, build_cache, source_difference

    source = _source(args)
    if (Path(args.out) / MANIFEST).is_file():  # refuse other settings before building the model
        diff = source_difference(ActivationCache(args.out).manifest.get("source"), source)
        if diff:
            raise UserError(f"{args.out} holds a cache of other data or loader settings ({diff}); use a new folder")
    model, preprocess, _ = _load(args)
    data, loader = _loader(args, preprocess)
    cache = build_cache(model.visual, loader, args.out, progress=not args.no_progress, source=source,
                        classes=data.classnames, templates=data.templates, process_group=args.process_group)
    if _main_rank(args):
        print(json.dumps({"out": args.out, "images": cache.num_images, "seconds": round(cache.seconds, 3)}))


def _save_head(head, folder: Path, classes: list[str] | None) -> None:
    from .serialization import save_bundle

    save_bundle(folder / "head", {"weights": head.weights},
                {"kind": "classifier", "logit_scale": head.logit_scale, "normalize": head.normalize,
                 "classes": classes})


def _load_head(folder: Path):
    """``(classifier, class names or None)`` saved by ``fit``."""
    from .classifiers import Classifier
    from .serialization import check_meta, check_tensor, is_bool, is_float, is_str, list_of, load_bundle, may_be_absent

    t, meta = load_bundle(folder / "head", "classifier")
    where = f"classifier at {folder / 'head'}"
    check_meta(meta, {"logit_scale": is_float(0, open_lo=True), "normalize": is_bool,
                      "classes": may_be_absent(list_of(is_str))}, where)
    weights = check_tensor(t, "weights", where, (None, None))
    classes = meta.get("classes")
    if classes is not None and len(classes) != weights.shape[0]:
        raise CorruptFileError(f"{where}: {weights.shape[0]} class weights but {len(classes)} class names")
    return Classifier(weights, meta["logit_scale"], meta["normalize"]), classes


def _short(names: list[str]) -> str:
    return f"{len(names)} classes [{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}]"


def _cache_classes(args, *caches) -> tuple[list[str] | None, list[str] | None]:
    """Class names and templates: those the caches recorded, checked against each other and ``--dataset``."""
    from .data import load_dataset

    recorded = [(c.path, c.classes) for c in caches if c.classes is not None]
    for path, names in recorded[1:]:
        if names != recorded[0][1]:
            raise UserError(f"the caches disagree on the classes: {recorded[0][0]} has {_short(recorded[0][1])}, "
                            f"{path} has {_short(names)}")
    classes = recorded[0][1] if recorded else None
    templates = next((c.templates for c in caches if c.templates), None)
    if getattr(args, "dataset", None):
        data = load_dataset(args.dataset, "train", root=args.root, download=False)
        if classes is not None and list(data.classnames) != classes:
            raise UserError(f"--dataset {args.dataset} has {_short(list(data.classnames))} but the caches were "
                            f"built with {_short(classes)}")
        classes = classes or list(data.classnames)
        templates = templates or list(data.templates)
    return classes, templates


RESIDUAL_METHODS = ("coarse", "fine", "full")


def cmd_fit(args) -> None:
    _prepare_out(args.out)
    from safetensors.torch import save_file

    from .cache import ActivationCache, fit_bases_from_cache
    from .classifiers import prototype_head, text_head, zero_shot_head
    from .report import plot_lambdas, plot_spectra
    from .serialization import write_json_atomic
    from .spectral import SpectralBases
    from .train import evaluate, fit_method, method_forward

    train_cache, val_cache = ActivationCache(args.train_cache), ActivationCache(args.val_cache)
    classes, templates = _cache_classes(args, train_cache, val_cache)
    if args.head == "zeroshot" and classes is None:
        raise UserError(f"--head zeroshot needs class names: {args.train_cache} records none (built by an older "
                        "version or from unnamed data); pass --dataset")
    if args.head == "zeroshot" and not templates:
        raise UserError("--head zeroshot needs prompt templates: pass --dataset")
    model = tokenizer = None
    if args.head == "zeroshot" or args.method in RESIDUAL_METHODS:  # only these need the model itself
        model, _, tokenizer = _load(args)
        for c in (train_cache, val_cache):
            c.check_model(model.visual)
    train, val = train_cache.load(), val_cache.load()
    if args.head == "prototype":
        head = prototype_head(train.output, train.labels, len(classes) if classes else None)
    elif isinstance(model, _Loaded):
        if not hasattr(model, "encode_text"):
            raise UserError(f"{args.model} has no text tower (or no offline tokenizer): use --head prototype")
        scale = getattr(model, "logit_scale", None)
        with torch.no_grad():
            head = text_head(model.encode_text, classes, templates,
                             logit_scale=scale.exp().item() if scale is not None else 100.0,
                             progress=not args.no_progress)
    else:
        head = zero_shot_head(model, tokenizer, classes, templates, progress=not args.no_progress)
    base_acc = evaluate(method_forward("zeroshot", None), val, head, process_group=args.process_group)
    bases = None
    if args.method in RESIDUAL_METHODS:
        from .residual import VARIANTS

        units = VARIANTS[args.method]["units"]
        bases = (SpectralBases.load(args.bases, model.visual) if args.bases
                 else fit_bases_from_cache(train_cache, model.visual, units, progress=not args.no_progress,
                                           process_group=args.process_group))
    module, result = fit_method(args.method, train, val, head, bases=bases, epochs=args.epochs, seed=args.seed,
                                progress=not args.no_progress, process_group=args.process_group)
    if not _main_rank(args):
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _save_head(head, out, classes)
    if module is not None and args.method in RESIDUAL_METHODS:
        module.save(out / "adapter", base_model_name_or_path=args.model)
        plot_lambdas(module, out / "lambdas.png")
        plot_spectra(bases, out / "spectra.png")
    elif module is not None:
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(out / "module.safetensors"))
    summary = {"method": args.method, "model": args.model, "pretrained": args.pretrained, "head": args.head,
               "classes": classes, "base_val_accuracy": base_acc, **result.to_dict()}
    write_json_atomic(out / "fit.json", summary)
    _fit_report(out, summary, len(train), len(val))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "classes")}))
    print(f"validation accuracy: base {base_acc:.4f} -> {args.method} {result.best_val_accuracy:.4f} "
          f"(best epoch {result.best_epoch}); report: {out / 'report.md'}")


def _fit_report(out: Path, s: dict, n_train: int, n_val: int) -> None:
    lines = [f"# residual-fast fit: {s['method']} on {s['model']}", "",
             f"{n_train} train / {n_val} validation images; head: {s['head']}"
             + (f" over {_short(s['classes'])}" if s["classes"] else ""), "",
             "| | trainable parameters | validation accuracy |", "|---|---|---|",
             f"| base (model output) | 0 | {s['base_val_accuracy']:.4f} |",
             f"| {s['method']} | {s['trainable_parameters']} | {s['best_val_accuracy']:.4f} |", "",
             f"best epoch {s['best_epoch']} of {len(s['history']) - 1} run; {s['seconds']:.2f} s of training.", ""]
    if (out / "lambdas.png").is_file():
        lines += ["![lambdas](lambdas.png) ![spectra](spectra.png)", ""]
    lines += ["| epoch | train loss | validation accuracy |", "|---|---|---|"]
    for h in s["history"]:
        loss = "-" if h["train_loss"] is None else f"{h['train_loss']:.4f}"
        lines.append(f"| {h['epoch']} | {loss} | {h['val_accuracy']:.4f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def cmd_eval(args) -> None:
    from .cache import ActivationCache
    from .residual import ResiDual
    from .serialization import check_meta, is_str, load_bundle, load_tensors, one_of, read_json
    from .train import METHODS, LinearAdapter, OutputSpectralAdapter, evaluate, method_forward

    fit_dir = Path(args.fit)
    if not (fit_dir / "fit.json").is_file():
        raise FileNotFoundError(f"{fit_dir} has no fit.json: pass the folder written by `residual-fast fit`")
    # every file is checked before the model is built
    meta = read_json(fit_dir / "fit.json", "fit.json")
    check_meta(meta, {"method": one_of(*METHODS), "model": is_str}, f"{fit_dir / 'fit.json'}")
    if meta["model"] != args.model:
        raise UserError(f"{fit_dir} was fitted with --model {meta['model']} but this evaluation uses --model "
                        f"{args.model}")
    if meta["method"] in RESIDUAL_METHODS:
        load_bundle(fit_dir / "adapter", "residual_adapter")
    head, classes = _load_head(fit_dir)
    cache = ActivationCache(args.cache)
    if classes is not None and cache.classes is not None and classes != cache.classes:
        raise UserError(f"the head of {fit_dir} was fitted for {_short(classes)} but {args.cache} holds "
                        f"{_short(cache.classes)}")
    method = meta["method"]
    model = None
    if method in RESIDUAL_METHODS:  # only the adapter needs the model (its readout); the rest reads the cache
        model, _, _ = _load(args)
        cache.check_model(model.visual)
    split = cache.load()
    module = None
    if method in RESIDUAL_METHODS:
        module = ResiDual.load(fit_dir / "adapter", model.visual)
    elif method in ("linear", "spectral_output"):
        state = load_tensors(fit_dir / "module.safetensors")
        module = LinearAdapter(split.output.shape[1]) if method == "linear" else OutputSpectralAdapter(split.output)
        module.load_state_dict(state)
    acc = evaluate(method_forward(method, module), split, head, process_group=args.process_group)
    base = evaluate(method_forward("zeroshot", None), split, head, process_group=args.process_group)
    if _main_rank(args):
        print(json.dumps({"method": method, "images": len(split), "accuracy": acc, "base_accuracy": base}))


def cmd_bench(args) -> None:
    from .bench import measure

    torch.set_num_threads(args.threads)
    print("| model | variant | batch | path | median time (s) | time / plain | peak MiB | peak / plain "
          "| at rest MiB | at rest / weights |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in measure(args.model, args.variant, args.batch, args.rounds, args.device):
        print(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['path']} | {r['median_s']:.4f} | "
              f"{r['time_ratio']:.3f}x | {r['peak_mib']:.2f} | {r['mem_ratio']:.3f}x | {r['at_rest_mib']:.2f} | "
              f"{100 * r['at_rest_frac']:.3f}% |")


def cmd_reproduce(args) -> None:
    _prepare_out(args.out)
    from .pipeline import reproduce

    rows = reproduce(args.models, args.datasets, args.methods, args.out, root=args.root, epochs=args.epochs,
                     seed=args.seed, batch_size=args.batch_size, workers=args.workers, max_images=args.max_images,
                     progress=not args.no_progress, bases_dataset=None if args.bases_dataset == "none" else
                     args.bases_dataset, bases_images=args.bases_images, process_group=args.process_group,
                     device=args.device)
    if not _main_rank(args):
        return
    print("| model | weights | dataset | method | parameters | accuracy | bases | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{r['accuracy']:.4f}" if "accuracy" in r else "-"
        bases = f"{r['bases']} ({r['bases_images']} images)" if "bases" in r else "-"
        print(f"| {r['model']} | {r['weights']} | {r['dataset']} | {r['method']} | "
              f"{r.get('trainable_parameters', '-')} | {acc} | {bases} | {r.get('error', r.get('bases_note', ''))} |")
    print(f"results: {args.out}/results.json, results.csv")
    if rows and all("error" in r for r in rows):
        raise UserError(f"every run failed (errors in {args.out}/results.json)")


def cmd_analyze(args) -> None:
    _prepare_out(args.out)
    from .analysis.report import analyze

    name, tag = _model_name(args)
    if tag and not name.startswith(("hf:", "timm:")):
        name = f"{name}/{tag}"
    analyze(name, args.datasets, args.out, root=args.root, max_images=args.max_images,
            twonn_samples=args.twonn_samples, id_threshold=args.id_threshold, seed=args.seed,
            batch_size=args.batch_size, progress=not args.no_progress, pretrained=bool(tag),
            image_size=args.image_size, process_group=args.process_group, device=args.device)
    if not _main_rank(args):
        return
    print((Path(args.out) / "report.md").read_text())
    print(f"report folder: {args.out} (report.md, metrics.json, heads.csv, per-dataset PNG heatmaps)")


HELP = argparse.ArgumentDefaultsHelpFormatter  # --help shows every default


def build_parser() -> argparse.ArgumentParser:
    from .train import METHODS

    p = argparse.ArgumentParser(prog="residual-fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"residual_fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", formatter_class=HELP,
                           help="offline demo: base vs ResiDual on sklearn digits, with a report folder")
    _model_args(d, image_size_default=64)
    d.add_argument("--variant", default="fine", choices=["coarse", "fine", "full"])
    d.add_argument("--epochs", type=positive_int, default=30)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--batch-size", type=positive_int, default=128)
    d.add_argument("--out", default="residual_fast_demo", help="report folder")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("calibrate", formatter_class=HELP, help="fit per-unit spectral bases by streaming a dataset")
    _model_args(c)
    _data_args(c)
    c.add_argument("--units", nargs="+", default=["head"], choices=["emb", "head", "mlp"])
    c.add_argument("--out", required=True, help="folder for the bases")
    c.set_defaults(func=cmd_calibrate)

    k = sub.add_parser("cache", formatter_class=HELP, help="one ViT pass over a split, written as an activation cache")
    _model_args(k)
    _data_args(k)
    k.add_argument("--out", required=True, help="cache folder (an interrupted build resumes)")
    k.set_defaults(func=cmd_cache)

    f = sub.add_parser("fit", formatter_class=HELP, help="train a method from caches (the ViT does not run)")
    _model_args(f)
    f.add_argument("--train-cache", required=True)
    f.add_argument("--val-cache", required=True)
    f.add_argument("--method", default="fine", choices=[m for m in METHODS if m != "zeroshot"] + ["zeroshot"])
    f.add_argument("--head", default="prototype", choices=["prototype", "zeroshot"])
    f.add_argument("--dataset", default=None,
                   help="dataset whose class names / templates the head uses (default: those the train cache "
                        "recorded); checked against the caches")
    f.add_argument("--root", default=None)
    f.add_argument("--bases", default=None, help="bases folder (default: fitted from the train cache)")
    f.add_argument("--epochs", type=positive_int, default=30)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", required=True)
    f.set_defaults(func=cmd_fit)

    e = sub.add_parser("eval", formatter_class=HELP, help="top-1 accuracy of a fitted method on a cached split")
    _model_args(e)
    e.add_argument("--fit", required=True, help="folder written by `residual-fast fit`")
    e.add_argument("--cache", required=True, help="cache of the split to evaluate")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", formatter_class=HELP,
                           help="time plain forward vs ResiDualVisual vs the eager reference")
    b.add_argument("--model", default="small", help="'small' or an open_clip name (random weights)")
    b.add_argument("--variant", default="fine", choices=["coarse", "fine", "full"])
    b.add_argument("--batch", type=positive_int, default=8)
    b.add_argument("--rounds", type=positive_int, default=5)
    b.add_argument("--threads", type=positive_int, default=2)
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("reproduce", formatter_class=HELP,
                           help="the paper's grid of models x datasets x methods, for what loads here")
    r.add_argument("--models", nargs="+", default=["ViT-B-16/laion2b_s34b_b88k", "ViT-L-14/laion2b_s32b_b82k",
                                                    "ViT-B-16/openai", "ViT-L-14/openai",
                                                    "hf:Salesforce/blip-itm-large-flickr", "hf:facebook/dinov2-large",
                                                    "timm:vit_large_patch16_224.augreg_in21k"],
                   help="open_clip ARCH[/TAG] or rf.load names (hf:REPO, timm:NAME)")
    r.add_argument("--datasets", nargs="+", default=["cifar10", "cifar100", "dtd", "eurosat", "gtsrb", "mnist",
                                                      "resisc45", "stanford_cars", "sun397", "svhn"])
    r.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    r.add_argument("--root", default=None)
    r.add_argument("--epochs", type=positive_int, default=30)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--batch-size", type=positive_int, default=128)
    r.add_argument("--workers", type=non_negative_int, default=0)
    r.add_argument("--max-images", type=positive_int, default=None, help="cap per split (quick runs)")
    r.add_argument("--bases-dataset", default="imagenet",
                   help="calibration set of the bases, fitted once per model and reused for every target (the "
                        "paper's protocol); falls back to the first target's train split when it is not "
                        "available; 'none' fits them on each target's train split")
    r.add_argument("--bases-images", type=positive_int, default=10_000,
                   help="images of --bases-dataset's train split (seeded, stratified)")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--out", default="residual_fast_results")
    r.set_defaults(func=cmd_reproduce)

    a = sub.add_parser("analyze", formatter_class=HELP,
                           help="intrinsic dimension, head specialization, text decomposition, spectral "
                                       "similarity: a report folder")
    _model_args(a)
    a.add_argument("--datasets", nargs="+", default=["digits"])
    a.add_argument("--root", default=None)
    a.add_argument("--max-images", type=positive_int, default=512, help="cap per split")
    a.add_argument("--twonn-samples", type=positive_int, default=300)
    a.add_argument("--id-threshold", type=float, default=0.99, help="cumulative EVR for the linear ID")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--batch-size", type=positive_int, default=128)
    a.add_argument("--out", default="residual_fast_analysis")
    a.set_defaults(func=cmd_analyze)

    for sp in (d, c, k, f, e, r, a):
        sp.add_argument("--no-progress", action="store_true", help="hide progress bars")
    for sp in (d, c, k, f, e, b, r, a):  # a help line for every option, so --help shows its default
        for action in sp._actions:
            if action.option_strings and not action.help and action.default not in (None, argparse.SUPPRESS):
                action.help = action.dest.replace("_", " ")
    return p


DISTRIBUTED = ("calibrate", "cache", "fit", "eval", "analyze", "reproduce")
USER_ERRORS = (UserError, ValueError, TypeError, KeyError, RuntimeError, OSError, ModuleNotFoundError,
               FloatingPointError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; user errors print one line and return 2, internal failures 1.

    ``RESIDUAL_FAST_DEBUG=1`` re-raises instead (for the traceback).
    """
    import os

    from .distributed import init_from_env, launched_by_torchrun

    args = build_parser().parse_args(argv)
    args.process_group = None
    try:
        if launched_by_torchrun():
            if args.command not in DISTRIBUTED:
                raise UserError(f"{args.command} does not run under torchrun; it runs in one process")
            args.process_group, args.device = init_from_env(args.device)
        args.func(args)
    except KeyboardInterrupt:
        print(f"residual-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("RESIDUAL_FAST_DEBUG") == "1":
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"residual-fast {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - anything else is our bug: one line, exit 1
        if os.environ.get("RESIDUAL_FAST_DEBUG") == "1":
            raise
        print(f"residual-fast {args.command}: internal error ({type(e).__name__}: {e}); rerun with "
              "RESIDUAL_FAST_DEBUG=1 for the traceback", file=sys.stderr)
        return 1
    finally:
        if args.process_group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
