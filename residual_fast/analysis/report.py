"""``residual-fast analyze``: every analysis for a model and one or more datasets, into a report folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from ..cache import fit_bases_from_cache
from ..classifiers import prototype_head, text_head
from ..data.datasets import dataset_slug
from ..loading import load
from ..pipeline import cache_splits, load_splits
from . import (
    HeadContributions,
    bases_similarity,
    correlation_scores,
    default_dictionary,
    greedy_selection,
    jaccard,
    per_head_accuracy,
    random_directions,
    somp,
    spectral_summary,
    textspan,
    twonn,
)


def plot_grid(values: torch.Tensor, layers: int, title: str, path: Path, label: str, fmt: str = ".2f") -> None:
    """A layer x head heatmap with readable labels and the values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = values.float().view(layers, -1).numpy()
    fig, ax = plt.subplots(figsize=(1.5 + 0.55 * grid.shape[1], 1.2 + 0.4 * grid.shape[0]))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    if grid.size <= 400:
        for (i, j), v in __import__("numpy").ndenumerate(grid):
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=6, color="w")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe_md(method: str, picks: list[tuple[str, float]]) -> str:
    """One markdown line of a head's text descriptions, each with what its number is.

    Both methods report, after each chosen description, the cumulative fraction of the head's
    (centered) output variance that the descriptions chosen so far explain.
    """
    steps = "; ".join(f"{i}. {text} (cumulative explained variance {e:.1%})" for i, (text, e) in
                      enumerate(picks, start=1))
    return f"- {method} (greedy order): {steps}"


def analyze(model: str, datasets: list[str], out: str | Path, *, root: str | None = None, max_images: int = 512,
            twonn_samples: int = 300, id_threshold: float = 0.99, ks=(1, 0.1, 0.25, 0.5), text_steps: int = 5,
            top_heads: int = 3, seed: int = 0, batch_size: int = 128, progress: bool = True,
            pretrained: bool = False, image_size: int | None = None, process_group=None,
            device: str | torch.device = "cpu") -> dict:
    """Run the analyses of the paper for ``model`` on ``datasets``; write PNG/markdown/CSV/JSON into ``out``.

    ``model`` is an open_clip name (random weights unless ``pretrained``) or an :func:`residual_fast.load` name.
    With ``process_group`` (``torchrun``) the one ViT pass (the caches) is sharded over the ranks; the
    analyses then run on rank 0 from the caches, and only rank 0 writes (the others return ``{}``).
    """
    from ..distributed import is_main

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = model if ":" in model else f"open_clip:{model}"
    kwargs = {"image_size": image_size} if image_size and name.startswith("open_clip:") and not pretrained else {}
    loaded = load(name, pretrained=pretrained, device=device, **kwargs)
    main = is_main(process_group)
    visual = loaded.visual
    metrics: dict = {"model": model, "weights": "pretrained" if pretrained else "random", "datasets": {}}
    md = [f"# residual-fast analyze: {model} ({metrics['weights']} weights)", ""]
    rows, bases_by_ds, selected = [], {}, {}
    dictionary = default_dictionary()
    dict_emb = None
    if loaded.encode_text is not None and main:
        with torch.no_grad():
            dict_emb = torch.cat([loaded.encode_text(dictionary[i:i + 128]).double()
                                  for i in range(0, len(dictionary), 128)])
    for dname in datasets:
        slug = dataset_slug(dname)  # an absolute folder path must not send outputs into the data
        parts = load_splits(dname, root=root, transform=loaded.preprocess, seed=seed)
        parts = {k: v for k, v in parts.items() if k in ("train", "test")}
        data = cache_splits(visual, parts, out / "cache" / slug, batch_size=batch_size, max_images=max_images,
                            progress=progress and main, seed=seed, process_group=process_group)
        if not main:
            continue
        train_ds = parts["train"][0]
        bases = fit_bases_from_cache(data.caches["train"], visual, ("head",), progress=progress)
        bases_by_ds[dname] = bases
        spec = bases.spec
        L = spec.num_layers
        summ = spectral_summary(bases, "head", id_threshold)
        heads = HeadContributions(data.splits["test"], spec)
        sample = torch.randperm(len(data.splits["test"]), generator=torch.Generator().manual_seed(seed))
        sample = sample[:twonn_samples]
        two = torch.tensor([twonn(heads(u)[sample]) if sample.numel() >= 3 else float("nan")
                            for u in range(heads.num_heads)])
        if dict_emb is not None:
            with torch.no_grad():
                classifier = text_head(loaded.encode_text, train_ds.classnames, train_ds.templates,
                                       progress=progress)
                class_dirs = loaded.encode_text([f"A photo of a {c}." for c in train_ds.classnames]).double()
        else:
            classifier = prototype_head(data.splits["train"].output, data.splits["train"].labels,
                                        len(train_ds.classnames))
            class_dirs = classifier.weights.double()
        acc = per_head_accuracy(heads, classifier)
        task = correlation_scores(heads, class_dirs)
        control = correlation_scores(heads, random_directions(class_dirs.shape[0], class_dirs.shape[1], seed))
        sel = {ab: greedy_selection(heads, task, ks, classifier, ablation=ab, bases=bases) for ab in ("zero", "mean")}
        top10 = sorted(torch.argsort(task, descending=True)[: max(1, heads.num_heads // 10)].tolist())
        selected[dname] = top10
        d_out = out / slug
        d_out.mkdir(exist_ok=True)
        for key, vals, title, label, fmt in (
            ("linear_id", summ["linear_id"], f"linear ID (EVR {id_threshold})", "components", ".0f"),
            ("participation_ratio", summ["participation_ratio"], "participation ratio", "PR", ".1f"),
            ("first_evr", summ["first_evr"], "first-component EVR", "EVR", ".2f"),
            ("twonn", two, f"TwoNN ID ({sample.numel()} samples)", "dimension", ".1f"),
            ("head_accuracy", acc, "accuracy of each head alone", "top-1", ".2f"),
            ("task_correlation", task, "correlation with class-name directions", "Pearson", ".2f"),
            ("random_correlation", control, "correlation with random directions (control)", "Pearson", ".2f"),
        ):
            plot_grid(vals, L, f"{dname}: {title}", d_out / f"{key}.png", label, fmt)
        for u in range(heads.num_heads):
            rows.append({"dataset": dname, "layer": u // spec.num_heads, "head": u % spec.num_heads,
                         "rank": int(summ["rank"][u]), "linear_id": int(summ["linear_id"][u]),
                         "first_evr": float(summ["first_evr"][u]),
                         "participation_ratio": float(summ["participation_ratio"][u]), "twonn": float(two[u]),
                         "accuracy": float(acc[u]), "task_correlation": float(task[u]),
                         "random_correlation": float(control[u])})
        full_acc = (classifier(data.splits["test"].output.float()).argmax(-1) == heads.labels).float().mean().item()
        md += [f"## {dname}", "",
               f"{len(data.splits['train'])} calibration / {len(data.splits['test'])} evaluation images; "
               f"head: {'zero-shot (text tower)' if dict_emb is not None else 'prototype'}; "
               f"accuracy of the full output {full_acc:.4f}.", "",
               f"- linear ID (EVR {id_threshold}): mean {summ['linear_id'].float().mean():.1f}, range "
               f"{int(summ['linear_id'].min())}-{int(summ['linear_id'].max())} (at most head_dim + 2 = "
               f"{spec.head_dim + 2}); participation ratio mean {summ['participation_ratio'].mean():.2f}; "
               f"TwoNN mean {two.nanmean():.2f}",
               f"- per-head accuracy: best {acc.max():.4f} (layer {int(acc.argmax()) // spec.num_heads}, head "
               f"{int(acc.argmax()) % spec.num_heads})",
               f"- correlation with class-name directions: mean {task.mean():.3f} vs random directions "
               f"{control.mean():.3f}", "",
               "| top-k heads | accuracy (others zero) | accuracy (others at calibration means) |", "|---|---|---|"]
        md += [f"| {z['k']} | {z['accuracy']:.4f} | {m['accuracy']:.4f} |" for z, m in zip(sel["zero"], sel["mean"],
                                                                                       strict=True)]
        md.append("")
        texts = {}
        if dict_emb is not None:
            for u in torch.argsort(task, descending=True)[:top_heads].tolist():
                C = heads(u)
                ts, sp = textspan(C, dict_emb, text_steps), somp(C - C.mean(0), dict_emb, text_steps)
                texts[f"L{u // spec.num_heads}H{u % spec.num_heads}"] = {
                    "textspan": ts.describe(dictionary), "somp": sp.describe(dictionary)}
                md += [f"**L{u // spec.num_heads}H{u % spec.num_heads}**", "",
                       describe_md("TextSpan", ts.describe(dictionary)),
                       describe_md("SOMP", sp.describe(dictionary)), ""]
        md += [f"![{k}]({slug}/{k}.png)" for k in ("linear_id", "twonn", "head_accuracy", "task_correlation")]
        md.append("")
        metrics["datasets"][dname] = {"full_accuracy": full_acc, "selection": sel, "top_heads_text": texts,
                                      "top10_percent_heads": top10}
    if not main:
        return {}
    if len(datasets) > 1:
        md += ["## Across datasets", ""]
        first = datasets[0]
        for other in datasets[1:]:
            sim = bases_similarity(bases_by_ds[first], bases_by_ds[other])
            sim_png = f"similarity_{dataset_slug(first)}_{dataset_slug(other)}.png"
            plot_grid(sim, bases_by_ds[first].spec.num_layers, f"spectral similarity {first} vs {other}",
                      out / sim_png, "similarity")
            jac = jaccard(selected[first], selected[other])
            metrics.setdefault("across", []).append({"a": first, "b": other, "mean_similarity": float(sim.mean()),
                                                     "jaccard_top10": jac})
            md.append(f"- {first} vs {other}: mean spectral similarity {sim.mean():.3f}; Jaccard overlap of the "
                      f"top-10% heads {jac:.2f} ![similarity]({sim_png})")
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    with open(out / "heads.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return metrics
