"""The normalization study: ``python -m normkernels study [--quick] [--out DIR] ...``.

Trains the same small CNN (``normkernels.models.SmallCNN``) on scikit-learn's digits (1797 8x8
images, bundled, no download; bilinearly upsampled to 16x16 so that SBN's spectrum has room) with
BN, BN+SBN (``nk.BatchNormSBN2d`` in the later stages), L2BN (``nk.L2BatchNorm2d``) and no
normalization, over several seeds, and reports:

- test accuracy (mean +- sample std over seeds);
- the diagnostics of ``normkernels.diagnostics`` on the held-out set for every block's output,
  at initialization (batch statistics, i.e. train mode, running statistics left untouched) and
  after training (eval mode, running statistics).

Writes into ``--out`` (default ``study_results/``): ``summary.md`` (tables), ``runs.csv`` (one row
per norm and seed), ``layers.csv`` (one row per norm, seed, phase and layer) and figures
``accuracy.png``, ``norm_by_depth.png``, ``sparsity_by_layer.png``, ``silhouette_by_layer.png``,
``spectral_entropy.png``.

The train/test split is fixed (stratified, 20% test, random_state=0); a seed sets the weight
initialization and the batch order. Given the seeds (and device / thread count), runs are
deterministic.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .diagnostics import METRICS, diagnose
from .models import NORMS, SmallCNN

__all__ = ["main", "run_study", "load_data", "train_one", "QUICK", "FULL"]

NORM_LABELS = {"bn": "BN", "bn_sbn": "BN+SBN", "l2bn": "L2BN", "none": "none"}
#: defaults of a full run and of --quick (explicit --seeds / --epochs override either)
FULL = {"seeds": [0, 1, 2, 3, 4], "epochs": 30}
QUICK = {"seeds": [0, 1, 2], "epochs": 6}


# ----------------------------------------------------------------------------- data


def load_data(size: int = 16, test_fraction: float = 0.2, split_seed: int = 0):
    """Digits as float32 tensors ``(x_train, y_train, x_test, y_test)``, x of shape (N, 1, size,
    size), standardized with the training set's mean and std."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=split_seed,
                              stratify=y.numpy())
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]


def _batches(x, y, batch_size):
    for i in range(0, len(y), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


@torch.no_grad()
def evaluate(model, x, y, batch_size=512) -> float:
    model.eval()
    correct = 0
    for xb, yb in _batches(x, y, batch_size):
        correct += (model(xb).argmax(1) == yb).sum().item()
    return correct / len(y)


def train_one(model, x, y, *, epochs: int, seed: int, batch_size: int = 32, lr: float = 0.05,
              weight_decay: float = 5e-4, progress=None) -> Dict[str, float]:
    """SGD (momentum 0.9, nesterov) with a linear warm-up then cosine learning rate, ``epochs`` passes over (x, y) in
    seeded random order, dropping the last incomplete batch. Returns loss and train accuracy of
    the last epoch."""
    g = torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=weight_decay)
    steps_per_epoch = len(y) // batch_size
    total = max(1, epochs * steps_per_epoch)
    warm = max(1, min(steps_per_epoch, total // 5))  # linear warm-up: one epoch at most

    def lr_at(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    loss_sum, correct, seen = float("nan"), 0, 0
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g).to(y.device)
        loss_sum, correct, seen = 0.0, 0, 0
        for s in range(steps_per_epoch):
            b = perm[s * batch_size:(s + 1) * batch_size]
            xb, yb = x[b], y[b]
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            seen += len(yb)
        if progress is not None:
            progress(ep + 1, loss_sum / max(seen, 1))
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1)}


# ----------------------------------------------------------------------------- the study


def _layer_impl(model) -> str:
    """The classes in the model's normalization slots (recorded, so a table says what ran)."""
    names = []
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("norm", "norm1", "norm2") or name.endswith("shortcut.1"):
            t = type(m)
            label = ("nk." if t.__module__.startswith("normkernels") else "") + t.__name__
            if label not in names:
                names.append(label)
    return "+".join(names) or "-"


#: the study's optional dependencies (import name -> package), installed by normkernels[study]
EXTRAS = {"sklearn": "scikit-learn", "tqdm": "tqdm", "matplotlib": "matplotlib"}


def require_extras() -> None:
    """Fail before any work, naming the extra, when an optional dependency is missing."""
    import importlib.util

    missing = [pkg for mod, pkg in EXTRAS.items() if _find(importlib.util, mod) is None]
    if missing:
        raise ModuleNotFoundError(f"the study needs {', '.join(missing)}, not installed: "
                                  f"pip install 'normkernels[study]'", name=missing[0])


def _find(util, module: str):
    try:
        return util.find_spec(module)
    except ValueError:  # a module set to None in sys.modules (how tests hide a package)
        return None


def run_study(out: str = "study_results", *, seeds: Sequence[int] = (0, 1, 2), epochs: int = 6,
              norms: Sequence[str] = NORMS, device: str = "cpu", block: str = "plain",
              widths: Sequence[int] = (16, 32, 64), blocks: int = 2, batch_size: int = 32,
              lr: float = 0.05, size: int = 16, max_rows: int = 1024, progress: bool = True,
              threads: Optional[int] = 1, log=print) -> Dict[str, object]:
    """Run the study and write its files into ``out``; returns ``{"runs": [...], "layers": [...],
    "files": [...], "markdown": str}`` (lists of row dicts as written to the CSVs).

    ``threads``: torch intra-op threads while it runs (restored afterwards; None leaves it). The
    default 1 is deliberate: the convolutions are tiny, extra threads barely help, and on a busy
    machine OpenMP threads oversubscribe the cores and slow training down by 10x and more."""
    require_extras()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_study(out, seeds, epochs, norms, device, block, widths, blocks, batch_size, lr,
                          size, max_rows, progress, log)
    finally:
        torch.set_num_threads(old_threads)


def _run_study(out, seeds, epochs, norms, device, block, widths, blocks, batch_size, lr, size,
               max_rows, progress, log):
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    x_tr, y_tr, x_te, y_te = (t.to(dev) for t in load_data(size))
    n_classes = int(y_tr.max().item()) + 1
    runs: List[dict] = []
    layers: List[dict] = []
    bar = tqdm(total=len(norms) * len(seeds) * epochs, disable=not progress, unit="epoch",
               desc="study", file=sys.stderr, dynamic_ncols=True)
    try:
        for norm in norms:
            for seed in seeds:
                torch.manual_seed(seed)
                model = SmallCNN(n_classes, 1, norm=norm, widths=widths, blocks=blocks,
                                 block=block).to(dev)
                probe_kw = dict(max_samples=len(y_te), max_rows=max_rows, seed=seed)
                test_batches = list(_batches(x_te, y_te, batch_size))
                init = diagnose(model, test_batches, mode="train", **probe_kw)

                def tick(ep, loss, norm=norm, seed=seed):
                    bar.set_postfix_str(f"{NORM_LABELS[norm]} seed {seed} ep {ep} loss {loss:.3f}")
                    bar.update(1)

                t0 = time.perf_counter()
                tr = train_one(model, x_tr, y_tr, epochs=epochs, seed=seed, batch_size=batch_size,
                               lr=lr, progress=tick)
                train_s = time.perf_counter() - t0
                acc = evaluate(model, x_te, y_te)
                trained = diagnose(model, test_batches, mode="eval", **probe_kw)
                runs.append({"norm": norm, "seed": seed, "test_acc": acc,
                             "train_acc": tr["train_acc"], "train_loss": tr["train_loss"],
                             "train_seconds": train_s, "layer_impl": _layer_impl(model)})
                for phase, res in (("init", init), ("trained", trained)):
                    for depth, (lname, r) in enumerate(res.items()):
                        row = {"norm": norm, "seed": seed, "phase": phase, "depth": depth,
                               "layer": lname, "channels": r["shape"][0],
                               "size": "x".join(map(str, r["shape"][1:])), "samples": r["samples"]}
                        row.update({k: r[k] for k in METRICS})
                        layers.append(row)
    finally:
        bar.close()

    os.makedirs(out, exist_ok=True)
    files = [_write_csv(os.path.join(out, "runs.csv"), runs),
             _write_csv(os.path.join(out, "layers.csv"), layers)]
    config = {"seeds": list(seeds), "epochs": epochs, "norms": list(norms), "device": str(dev),
              "block": block, "widths": list(widths), "blocks": blocks, "batch_size": batch_size,
              "lr": lr, "size": size, "train": len(y_tr), "test": len(y_te),
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    md = _summary_markdown(runs, layers, norms, config, time.perf_counter() - t_start)
    path = os.path.join(out, "summary.md")
    with open(path, "w") as f:
        f.write(md)
    files.append(path)
    files += _figures(out, runs, layers, norms)
    if log is not None:
        log(md)
        log(f"wrote {', '.join(files)}")
    return {"runs": runs, "layers": layers, "files": files, "markdown": md}


# ----------------------------------------------------------------------------- reporting


def _write_csv(path, rows):
    fields = list(rows[0].keys()) if rows else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def _mean_std(vals):
    vals = [v for v in vals if not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and (abs(v) >= 1e4 or (0 < abs(v) < 1e-3)):
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def _layer_means(layers, norm, phase, key):
    """Per depth: mean over seeds of ``key``; returns (depths, layer names, means)."""
    by_depth: Dict[int, list] = {}
    names: Dict[int, str] = {}
    for r in layers:
        if r["norm"] == norm and r["phase"] == phase:
            by_depth.setdefault(r["depth"], []).append(r[key])
            names[r["depth"]] = r["layer"]
    ds = sorted(by_depth)
    return ds, [names[d] for d in ds], [_mean_std(by_depth[d])[0] for d in ds]


def _summary_markdown(runs, layers, norms, config, seconds) -> str:
    lines = ["# Normalization study: digits (sklearn), SmallCNN", ""]
    lines.append("Config: " + ", ".join(f"{k}={v}" for k, v in config.items())
                 + f"; wall time {seconds:.1f} s.")
    lines.append("")
    lines.append("Init diagnostics use batch statistics (train mode); trained diagnostics use "
                 "running statistics (eval mode); both on the held-out set. Norm = mean per-sample "
                 "L2 norm of a block's output; sparsity = fraction of exact zeros after ReLU; "
                 "silhouette (cosine) and k-means NMI on globally pooled features vs. labels; "
                 "spectral entropy = normalized entropy of each channel's mean power spectrum "
                 "(DC removed; 0 = one frequency, 1 = white).")
    lines.append("")
    lines.append("## Test accuracy")
    lines.append("")
    lines.append("| norm | test acc (mean ± std) | seeds | train acc | s / run | layers used |")
    lines.append("|---|---|---|---|---|---|")
    for norm in norms:
        rs = [r for r in runs if r["norm"] == norm]
        m, s = _mean_std([r["test_acc"] for r in rs])
        tm, _ = _mean_std([r["train_acc"] for r in rs])
        ts, _ = _mean_std([r["train_seconds"] for r in rs])
        impl = rs[0]["layer_impl"] if rs else "-"
        lines.append(f"| {NORM_LABELS[norm]} | {100 * m:.2f} ± {100 * s:.2f} | {len(rs)} | "
                     f"{100 * tm:.2f} | {ts:.1f} | {impl} |")
    lines.append("")
    # deepest layer, init -> trained
    lines.append("## Deepest block, init → trained (mean over seeds)")
    lines.append("")
    keys = ["norm_mean", "absmax", "sparsity", "channel_sparsity", "silhouette", "nmi",
            "spectral_entropy"]
    lines.append("| norm | " + " | ".join(keys) + " |")
    lines.append("|---" * (len(keys) + 1) + "|")
    for norm in norms:
        cells = []
        for k in keys:
            vals = []
            for phase in ("init", "trained"):
                _, _, ms = _layer_means(layers, norm, phase, k)
                vals.append(ms[-1] if ms else float("nan"))
            cells.append(f"{_fmt(vals[0])} → {_fmt(vals[1])}")
        lines.append(f"| {NORM_LABELS[norm]} | " + " | ".join(cells) + " |")
    lines.append("")
    # per layer
    for phase in ("init", "trained"):
        lines.append(f"## Per block ({phase}; mean over seeds): norm / sparsity / silhouette / "
                     "spectral entropy")
        lines.append("")
        _, names, _ = _layer_means(layers, norms[0], phase, "norm_mean")
        lines.append("| norm | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for norm in norms:
            cols = [_layer_means(layers, norm, phase, k)[2]
                    for k in ("norm_mean", "sparsity", "silhouette", "spectral_entropy")]
            cells = [" / ".join(_fmt(c[i], 2) for c in cols) for i in range(len(cols[0]))]
            lines.append(f"| {NORM_LABELS[norm]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _short(name: str) -> str:
    return name.replace("stages.", "s")


def _figures(out, runs, layers, norms) -> List[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    files = []

    def save(fig, name):
        FigureCanvasAgg(fig)
        fig.tight_layout()
        p = os.path.join(out, name)
        fig.savefig(p, dpi=110)
        files.append(p)

    labels = [NORM_LABELS[n] for n in norms]
    # accuracy
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot(111)
    for i, norm in enumerate(norms):
        accs = [100 * r["test_acc"] for r in runs if r["norm"] == norm]
        m, s = _mean_std(accs)
        ax.bar(i, m, yerr=s, capsize=4, color=f"C{i}", alpha=0.7)
        ax.scatter([i] * len(accs), accs, color="k", s=10, zorder=3)
    lo = min([100 * r["test_acc"] for r in runs] + [100.0])
    ax.set_ylim(max(0, lo - 5), 100)
    ax.set_xticks(range(len(norms)), labels)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits, mean ± std over seeds")
    save(fig, "accuracy.png")

    def by_layer(key, fname, title, logy=False):
        fig = Figure(figsize=(10, 3.8))
        for j, phase in enumerate(("init", "trained")):
            ax = fig.add_subplot(1, 2, j + 1)
            names = []
            for i, norm in enumerate(norms):
                ds, names_n, ms = _layer_means(layers, norm, phase, key)
                names = names_n or names
                ax.plot(ds, ms, "o-", color=f"C{i}", label=NORM_LABELS[norm])
            ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=30)
            if logy:
                ax.set_yscale("log")
            ax.set_title(f"{title} ({phase})")
            ax.set_xlabel("block (shallow → deep)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, fname)

    by_layer("norm_mean", "norm_by_depth.png", "mean per-sample feature-map L2 norm", logy=True)
    by_layer("sparsity", "sparsity_by_layer.png", "fraction of zeros after ReLU")
    by_layer("silhouette", "silhouette_by_layer.png", "silhouette (cosine) vs labels")
    by_layer("spectral_entropy", "spectral_entropy.png", "normalized spectral entropy")
    return files


# ----------------------------------------------------------------------------- command line


def _int_list(s: str) -> List[int]:
    return [int(v) for v in s.replace(",", " ").split()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m normkernels study",
        description="Train a small CNN on sklearn digits with BN, BN+SBN, L2BN and no "
                    "normalization; report accuracy and representation diagnostics.")
    p.add_argument("--out", default="study_results", help="output directory (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"small budget: seeds {QUICK['seeds']}, {QUICK['epochs']} epochs "
                        f"(full: seeds {FULL['seeds']}, {FULL['epochs']} epochs)")
    p.add_argument("--seeds", type=_int_list, default=None, help='e.g. "0,1,2" or "0 1 2"')
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--norms", default=",".join(NORMS),
                   help="comma-separated subset of " + ",".join(NORMS))
    p.add_argument("--device", default="cpu", help='"cpu", "cuda", "cuda:1", or "auto"')
    p.add_argument("--block", choices=("plain", "resnet"), default="plain")
    p.add_argument("--widths", type=_int_list, default=[16, 32, 64])
    p.add_argument("--blocks", type=int, default=2, help="blocks per stage")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--size", type=int, default=16, help="images are upsampled to size x size")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the convolutions are tiny, and more "
                        "threads oversubscribe a busy machine; 0 = leave torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["study"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    preset = QUICK if args.quick else FULL
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    epochs = args.epochs if args.epochs is not None else preset["epochs"]
    norms = [n.strip() for n in args.norms.split(",") if n.strip()]
    bad = [n for n in norms if n not in NORMS]
    if bad or not norms or not seeds or epochs < 0:
        build_parser().error(f"bad --norms {bad}" if bad else "need norms, seeds, epochs >= 0")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        build_parser().error("--device cuda given but torch.cuda.is_available() is False")
    run_study(args.out, seeds=seeds, epochs=epochs, norms=norms, device=device, block=args.block,
              widths=args.widths, blocks=args.blocks, batch_size=args.batch_size, lr=args.lr,
              size=args.size, progress=not args.no_progress, threads=args.threads or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
